"""What a stage prints while it works, on rank 0 only: a rich progress bar on a terminal, and in a log
file (or any pipe) one plain line every `train.log_every` steps (step/total, loss, key metrics, it/s,
ETA) plus a line at each stage's start and end, so a cluster log is never silent for long.

    aopd distill train.steps=5 | cat
"""

from __future__ import annotations

import os
import sys
import time
from contextlib import contextmanager

KEY_METRICS = ("grad_norm", "entropy", "intervention_ratio", "response_len")  # train/<name>, when present


def is_main() -> bool:
    # torchrun's RANK, read without importing torch: the first line comes before the heavy imports
    return int(os.environ.get("RANK", "0")) == 0


def say(message: str) -> None:
    """One line of what the stage is doing (rank 0)."""
    if is_main():
        print(f"aopd: {message}", flush=True)


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else \
        f"{seconds // 60}:{seconds % 60:02d}"


@contextmanager
def progress(label: str, total: int, start: int, every: int):
    """Yields `advance(step, metrics)` to call after each optimizer step (1-based step)."""
    if not is_main():
        yield lambda step, metrics: None
        return
    if sys.stdout.isatty():
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("loss {task.fields[loss]:.4f}"), TextColumn("eta"), TimeRemainingColumn())
        with Progress(*columns) as bar:
            task = bar.add_task(label, total=total, completed=start, loss=float("nan"))
            yield lambda step, metrics: bar.update(task, completed=step, loss=metrics.get("train/loss", float("nan")))
        return
    started, first = time.perf_counter(), start
    print(f"aopd: {label}: steps {start + 1}-{total} of {total}", flush=True)

    def advance(step: int, metrics: dict[str, float]) -> None:
        if step % every and step != total:
            return
        rate = (step - first) / max(time.perf_counter() - started, 1e-9)
        shown = " ".join(f"{name} {metrics[f'train/{name}']:.4g}" for name in KEY_METRICS if f"train/{name}" in metrics)
        eta = _duration((total - step) / rate) if rate > 0 else "?"
        print(f"aopd: {label} step {step}/{total} loss {metrics.get('train/loss', float('nan')):.4f} {shown} "
              f"{rate:.2f} it/s eta {eta}", flush=True)

    yield advance
    print(f"aopd: {label}: done, {total - first} steps in {_duration(time.perf_counter() - started)}", flush=True)
