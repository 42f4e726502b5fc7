"""Metric names, built and parsed here and nowhere else.

- `eval/<benchmark>/pass_at_<k>`, `eval/math_avg/pass_at_<k>`, `eval/<tool benchmark>/success` and
  `.../first_call`: evaluations (at a training step, or the eval stage's step 0); `eval/<benchmark>/greedy`:
  accuracy (math) or success (tools) of greedy decoding, where `eval.greedy` asks for it;
- `retention/math_pass_at_<k>_{before,after,change}`: the continual stage's math around it (Table 2);
- `train/<name>`: per optimizer step; `time/<name>_s`: wall seconds of a phase;
- `rollout/<name>`: the rollout engine against the trainer (`rollout/logprob_diff_max`, `_mean`: |the
  engine's log-prob of a sampled token - the trainer's|, over a step's samples).

    python -c "from aopd_cli import metrics; print(metrics.parse_eval(metrics.pass_at('aime24', 4)))"
"""

from __future__ import annotations

import re
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterable, Literal

MATH_AVG = "math_avg"
EvalKind = Literal["pass_at", "success", "first_call", "greedy"]
Retention = Literal["before", "after", "change"]

_EVAL_RE = re.compile(r"^eval/(?P<bench>[^/]+)/(?:pass_at_(?P<k>\d+)|(?P<kind>success|first_call|greedy))$")
_RETENTION_RE = re.compile(r"^retention/math_pass_at_(?P<k>\d+)_(?P<which>before|after|change)$")


def pass_at(bench: str, k: int) -> str:
    return f"eval/{bench}/pass_at_{k}"


def tool(bench: str, kind: Literal["success", "first_call"]) -> str:
    """Tool-call success rate (whole golden sequence matched) or first-call accuracy."""
    return f"eval/{bench}/{kind}"


def greedy(bench: str) -> str:
    """Greedy decoding's accuracy (math) or success rate (tools): one sample, no sampling noise."""
    return f"eval/{bench}/greedy"


@dataclass(frozen=True)
class EvalKey:
    bench: str
    kind: EvalKind
    k: int | None = None  # for pass_at


def parse_eval(key: str) -> EvalKey | None:
    match = _EVAL_RE.match(key)
    if match is None:
        return None
    if match["k"] is not None:
        return EvalKey(match["bench"], "pass_at", int(match["k"]))
    return EvalKey(match["bench"], match["kind"])


def retention(k: int, which: Retention) -> str:
    return f"retention/math_pass_at_{k}_{which}"


def parse_retention(key: str) -> tuple[int, Retention] | None:
    match = _RETENTION_RE.match(key)
    return (int(match["k"]), match["which"]) if match else None


def train(name: str) -> str:
    return f"train/{name}"


def rollout(name: str) -> str:
    return f"rollout/{name}"


def seconds(name: str) -> str:
    return f"time/{name}_s"


def is_final(key: str) -> bool:
    """An evaluation or retention result (what comparison tables show)."""
    return parse_eval(key) is not None or parse_retention(key) is not None


def pass_at_ks(keys: Iterable[str]) -> list[int]:
    """The k of every Pass@k among `keys`, ascending."""
    return sorted({p.k for p in map(parse_eval, keys) if p is not None and p.kind == "pass_at"})


def largest_k(keys: Iterable[str]) -> int | None:
    ks = pass_at_ks(keys)
    return ks[-1] if ks else None


def retention_ks(keys: Iterable[str]) -> list[int]:
    return sorted({r[0] for r in map(parse_retention, keys) if r is not None})


def math_benchmarks(keys: Iterable[str]) -> list[str]:
    """Benchmarks with a Pass@k among `keys`, the average excluded."""
    return sorted({p.bench for p in map(parse_eval, keys)
                   if p is not None and p.kind == "pass_at" and p.bench != MATH_AVG})


def tool_benchmarks(keys: Iterable[str]) -> list[str]:
    return sorted({p.bench for p in map(parse_eval, keys) if p is not None and p.kind == "success"})


@contextmanager
def timed(name: str, metrics: dict[str, float]):
    """Adds the block's wall seconds to `metrics` as `time/<name>_s`."""
    started = time.perf_counter()
    try:
        yield
    finally:
        metrics[seconds(name)] = time.perf_counter() - started
