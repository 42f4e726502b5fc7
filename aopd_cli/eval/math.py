"""Math grading with math-verify (the last `\\boxed{}` has priority) and the unbiased pass@k.

math-verify bounds its own parsing and comparison time with `signal.alarm`, which works only in the main
thread. Elsewhere (a thread pool, a web server) each grading runs in a one-process worker pool, where
the alarm works, and is abandoned after a hard deadline, so a pathological expression never hangs.

    python -c "from aopd_cli.eval import grade_math; print(grade_math('so \\\\boxed{0.5}', '\\\\frac{1}{2}'))"
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import threading

import numpy as np

TIMEOUT_S = 5
_pool: concurrent.futures.ProcessPoolExecutor | None = None


def extract_boxed(text: str) -> str | None:
    """The content of the last `\\boxed{...}` (balanced braces), or None."""
    start = text.rfind("\\boxed")
    if start < 0:
        return None
    brace = text.find("{", start)
    if brace < 0:
        return None
    depth = 0
    for position in range(brace, len(text)):
        depth += {"{": 1, "}": -1}.get(text[position], 0)
        if depth == 0:
            return text[brace + 1:position]
    return None


def _grade_here(response: str, gold: str, require_boxed: bool = False) -> bool:
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    boxed = extract_boxed(response)
    if boxed is None and require_boxed:
        return False
    target = f"\\boxed{{{boxed}}}" if boxed is not None else response
    pred = parse(target, extraction_config=[LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()],
                 parsing_timeout=TIMEOUT_S)
    gold_text = gold if any(m in gold for m in ("$", "\\(", "\\[", "\\boxed")) else f"${gold}$"
    gold_parsed = parse(gold_text, extraction_config=[LatexExtractionConfig(), ExprExtractionConfig()],
                        parsing_timeout=TIMEOUT_S)
    if not gold_parsed or not pred:
        return False
    return bool(verify(gold_parsed, pred, timeout_seconds=TIMEOUT_S))


def grade_math(response: str, gold: str, *, require_boxed: bool = False) -> bool:
    """True when the response's final answer equals the gold answer (math-verify equivalence). With
    `require_boxed`, a response without `\\boxed{}` (a truncated one, say) is wrong whatever its text."""
    if threading.current_thread() is threading.main_thread():
        try:
            return _grade_here(response, gold, require_boxed)
        except Exception:  # noqa: BLE001 - an unparsable answer is a wrong answer, never a crash
            return False
    global _pool
    if _pool is None:
        _pool = concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
    future = _pool.submit(_grade_here, response, gold, require_boxed)
    try:
        return future.result(timeout=3 * TIMEOUT_S)
    except Exception:  # noqa: BLE001 - timed out or failed: wrong
        return False


def pass_at_k(n: int, c: int, k: int) -> float:
    """1 - C(n-c, k) / C(n, k) (Chen et al. 2021), as a stable product."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))
