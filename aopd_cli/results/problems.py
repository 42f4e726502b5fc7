"""Per-problem results of the lab's runs, what the report's intervals are drawn from: an eval stage's
samples (its `samples.jsonl` artifact: each problem's Pass@k from its n samples, each tool instruction's
success over its episodes) and a training stage's evaluations along its curve (`eval_problems.jsonl`).
Downloads are cached for the command.

    aopd report --parent RUN_ID --out docs/lab.md
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from aopd_cli.results.stats import pass_at_k


class Problems:
    """Reads (and keeps) the per-problem artifacts of runs of one store."""

    def __init__(self, client):
        self.client, self._rows = client, {}

    def _artifact(self, run, name: str) -> list[dict]:
        key = (run.info.run_id, name)
        if key not in self._rows:
            try:
                path = Path(self.client.download_artifacts(run.info.run_id, name))
                self._rows[key] = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            except Exception:  # noqa: BLE001 - a run that logged none (an older one, a reused warm-up)
                self._rows[key] = []
        return self._rows[key]

    def math(self, run, bench: str, k: int = 1) -> dict[str, float]:
        """{problem: Pass@k} of an eval run on a math benchmark (sampled decoding)."""
        counts = defaultdict(lambda: [0, 0])
        for row in self._artifact(run, "samples.jsonl"):
            if row["benchmark"] == bench and row["decoding"] == "sampled":
                counts[row["id"]][0] += bool(row["correct"])
                counts[row["id"]][1] += 1
        return {problem: pass_at_k(n, c, k) for problem, (c, n) in counts.items()}

    def tools(self, run, bench: str) -> dict[str, float]:
        """{instruction: share of its sampled episodes that succeed} of an eval run on a tool benchmark."""
        counts = defaultdict(lambda: [0, 0])
        for row in self._artifact(run, "samples.jsonl"):
            if row["benchmark"] == bench and row["decoding"] == "sampled":
                counts[row["id"]][0] += bool(row["correct"])
                counts[row["id"]][1] += 1
        return {instruction: c / n for instruction, (c, n) in counts.items()}

    def curve(self, run, bench: str) -> dict[int, dict[str, float]]:
        """{step: {problem: Pass@1}} of a training run's evaluations (a step evaluated again: the last)."""
        found: dict[int, dict[str, float]] = defaultdict(dict)
        for row in self._artifact(run, "eval_problems.jsonl"):
            if row["benchmark"] == bench:
                found[row["step"]][row["id"]] = row["correct"] / row["n"]
        return dict(sorted(found.items()))


def by_seed(sweep, stage: str, read) -> dict[str, dict]:
    """{seed: read(run)} over the seeds that ran `stage` (and read something)."""
    found = {}
    for seed, by_name in sweep.seeds.items():
        if stage in by_name:
            value = read(by_name[stage])
            if value:
                found[seed] = value
    return found
