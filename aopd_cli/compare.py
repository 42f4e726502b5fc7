"""`aopd compare`: a table of final metrics grouped by method and swept values (mean ± std over seeds),
exported as CSV and Markdown, and PNG plots of the paper's figures, from the MLflow store.

Runs are grouped by (stage, objective, swept values other than the seed); with `--parent` only the
descendants of that run count, and the plots are also logged to it.

    aopd compare --out outputs/compare
"""

from __future__ import annotations

import csv
import statistics
from collections import defaultdict
from pathlib import Path

from aopd_cli import metrics as names
from aopd_cli.errors import UserError

def _descendants(runs, parent_id: str) -> list:
    children = defaultdict(list)
    for run in runs:
        children[run.data.tags.get("mlflow.parentRunId")].append(run)
    found, frontier = [], [parent_id]
    while frontier:
        for run in children.get(frontier.pop(), []):
            found.append(run)
            frontier.append(run.info.run_id)
    return found


def group_label(run) -> str:
    """`stage:name` plus the swept values; seeds of the same configuration share a label."""
    tags = run.data.tags
    stage = tags.get("stage", "?")
    name = tags.get("mlflow.runName", stage).split()[0]  # run names end with the swept values and seed
    if name == stage:  # a stage run on its own (not a pipeline's stage): name it by its objective
        name = tags.get("objective", stage)
    # a swept key labels a training run only where the run has it (a pipeline's opd stage has no
    # objective.tau); an eval run keeps them all, since it evaluates that sweep point's checkpoint
    evaluates = stage == "eval"
    swept = [f"{k[len('sweep.'):].replace('objective.', '')}={v}" for k, v in sorted(tags.items())
             if k.startswith("sweep.") and k != "sweep.seed" and (evaluates or k[len("sweep."):] in run.data.params)]
    return " ".join([f"{stage}:{name}"] + swept)


def _fmt(values: list[float]) -> str:
    if not values:
        return "-"
    mean = statistics.fmean(values)
    return f"{mean:.4f} ± {statistics.stdev(values):.4f}" if len(values) > 1 else f"{mean:.4f}"


def run_compare(*, experiment: str, parent: str | None, metrics: list[str], out_dir: str,
                tracking_uri: str | None) -> Path:
    from rich.console import Console
    from rich.table import Table

    from aopd_cli.tracking import find_runs

    all_runs = [r for r in find_runs(tracking_uri, experiment) if r.info.status == "FINISHED"]
    runs = _descendants(all_runs, parent) if parent else all_runs
    runs = [r for r in runs if r.data.tags.get("stage") in ("distill", "continual", "eval")]
    if not runs:
        raise UserError(f"no finished distill/continual/eval runs in experiment {experiment!r}"
                        + (f" under run {parent}" if parent else "") + "; run a stage or a sweep first")
    keys = metrics or sorted({k for r in runs for k in r.data.metrics if names.is_final(k)})
    groups: dict[str, list] = defaultdict(list)
    for run in runs:
        groups[group_label(run)].append(run)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = [[label, str(len(members))] + [_fmt([r.data.metrics[k] for r in members if k in r.data.metrics])
                                          for k in keys] for label, members in sorted(groups.items())]
    header = ["group", "runs"] + keys
    with open(out / "compare.csv", "w", newline="") as handle:
        csv.writer(handle).writerows([header] + rows)
    markdown = "| " + " | ".join(header) + " |\n|" + "---|" * len(header) + "\n" + \
        "".join("| " + " | ".join(row) + " |\n" for row in rows)
    (out / "compare.md").write_text(markdown)
    table = Table(title=f"{experiment}: final metrics, mean ± std over seeds")
    for column in header:
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(*row)
    console = Console()
    if not console.is_terminal:  # a pipe or a log file: keep rows whole instead of folding them at 80 columns
        console = Console(width=max(120, 28 * len(header)))
    console.print(table)
    from aopd_cli.plots import write_plots

    plots = write_plots(runs, groups, out, tracking_uri)
    if parent:
        from aopd_cli.tracking import run_tracker

        tracker = run_tracker(tracking_uri, parent)
        for path in [out / "compare.csv", out / "compare.md", *plots]:
            tracker.log_artifact(path, "compare")
    console.print(f"wrote {out / 'compare.csv'}, {out / 'compare.md'} and {len(plots)} plots to {out}")
    return out
