"""The report's statistics: every comparison a verdict uses is a paired difference over the same problems
and seeds, with a 95% interval from a bootstrap that resamples both (problems are crossed with seeds: a
replicate draws seeds with replacement and problems with replacement, the same problems for each of its
seeds). Training curves (entropy, intervention ratio) have no problems: their bootstrap resamples seeds
and, within a seed, blocks of consecutive steps (neighbouring steps are correlated).

The rule a verdict follows, printed in the report:
- a part of a claim *holds* when its interval excludes zero in the claimed direction, is *reversed* when it
  excludes zero the other way, *fails* when it is exactly zero everywhere (a rate that never moved), and is
  *unclear* otherwise;
- a claim is *reproduced* when every part holds, *not reproduced* when a part is reversed or fails or none
  holds, and *inconclusive* otherwise.

    python -m pytest tests/test_report.py -q
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

REPLICATES = 4000
BLOCK = 10  # steps per block in the curves' bootstrap
RULE = ("A part holds when its 95% interval (a paired bootstrap over problems and seeds) excludes zero in the "
        "claimed direction, is reversed when it excludes zero the other way, fails when it is exactly zero in every "
        "seed and problem, and is unclear otherwise. A claim is reproduced when every part holds, not reproduced "
        "when a part is reversed or fails or none holds, inconclusive otherwise.")


@dataclass(frozen=True)
class Diff:
    estimate: float  # mean over seeds and problems (or steps)
    low: float  # the 95% interval
    high: float
    per_seed: tuple[float, ...]  # the estimate of each seed on its own
    problems: int

    def fmt(self, scale: float = 100.0, digits: int = 1) -> str:
        """`-2.8 [-4.1, -1.5]` (percentage points by default)."""
        return f"{scale * self.estimate:+.{digits}f} [{scale * self.low:+.{digits}f}, {scale * self.high:+.{digits}f}]"


def _interval(replicates: np.ndarray) -> tuple[float, float]:
    low, high = np.percentile(replicates, [2.5, 97.5])
    return float(low), float(high)


def mean_difference(a: dict[str, dict[str, float]], b: dict[str, dict[str, float]] | None = None,
                    seed: int = 0) -> Diff | None:
    """a - b (or a alone), each {seed: {problem: value}}, paired on the seeds and problems both have."""
    seeds = sorted(set(a) & set(b)) if b is not None else sorted(a)
    if not seeds:
        return None
    problems = sorted(set.intersection(*(set(a[s]) & (set(b[s]) if b is not None else set(a[s])) for s in seeds)))
    if not problems:
        return None
    d = np.array([[a[s][p] - (b[s][p] if b is not None else 0.0) for p in problems] for s in seeds])  # [S, I]
    rng = np.random.default_rng(seed)
    seed_draw = rng.integers(0, len(seeds), (REPLICATES, len(seeds)))
    problem_draw = rng.integers(0, len(problems), (REPLICATES, len(problems)))
    by_seed = np.stack([d[:, draw].mean(axis=1) for draw in problem_draw])  # [R, S]: each seed on the drawn problems
    replicates = np.take_along_axis(by_seed, seed_draw, axis=1).mean(axis=1)
    return Diff(float(d.mean()), *_interval(replicates), tuple(float(x) for x in d.mean(axis=1)), len(problems))


def series_difference(a: dict[str, list[float]], b: dict[str, list[float]] | None = None, seed: int = 0
                      ) -> Diff | None:
    """Mean over steps of a - b (or a alone), each {seed: values by step}, paired on seeds and steps; the
    interval from seeds and blocks of `BLOCK` steps resampled."""
    seeds = sorted(set(a) & set(b)) if b is not None else sorted(a)
    seeds = [s for s in seeds if a[s] and (b is None or b[s])]
    if not seeds:
        return None
    length = min(len(a[s]) for s in seeds) if b is None else min(min(len(a[s]), len(b[s])) for s in seeds)
    d = np.array([np.array(a[s][:length]) - (np.array(b[s][:length]) if b is not None else 0.0) for s in seeds])
    rng = np.random.default_rng(seed)
    blocks = max(1, length // BLOCK)
    replicates = np.empty(REPLICATES)
    for r in range(REPLICATES):
        chosen = rng.integers(0, len(seeds), len(seeds))
        starts = rng.integers(0, max(1, length - BLOCK + 1), (len(seeds), blocks))
        values = [d[s, start:start + BLOCK].mean() for s, row in zip(chosen, starts) for start in row]
        replicates[r] = float(np.mean(values))
    return Diff(float(d.mean()), *_interval(replicates), tuple(float(x) for x in d.mean(axis=1)), length)


def part_state(diff: Diff | None, direction: int) -> str:
    """holds / reversed / unclear (no data: unclear) for a part claiming the sign `direction` (+1 or -1)."""
    if diff is None:
        return "unclear"
    if diff.low == diff.high == 0.0:  # exactly nothing in every seed and problem (a rate that never moved)
        return "fails"
    if direction * diff.low > 0 and direction * diff.high > 0:
        return "holds"
    if direction * diff.low < 0 and direction * diff.high < 0:
        return "reversed"
    return "unclear"


def claim_verdict(states: list[str]) -> str:
    if states and all(s == "holds" for s in states):
        return "reproduced"
    if "reversed" in states or "fails" in states or not any(s == "holds" for s in states):
        return "not reproduced"
    return "inconclusive"


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased estimate of a problem's Pass@k from c correct of n samples."""
    if n - c < k:
        return 1.0
    return 1.0 - float(np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))
