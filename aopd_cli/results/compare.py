"""`aopd compare`: final metrics per configuration, mean ± std over its seeds, from the MLflow store: a
terminal table of a few key metrics (100 columns), every final metric in CSV and Markdown, and the
paper's figures as PNG plots (plots.py).

Which runs: by default those under the latest sweep or pipeline run of the experiment (it says which);
`--parent RUN` those under another, `--all` every finished run. How they are grouped: runs whose whole
resolved config (their MLflow params) is the same but for the seed are seeds of one configuration;
keys that differ per run by construction are left out (`output_dir`, `tracking.*`, `resume`) and paths
under a run's own pipeline folder are compared relative to it (an eval stage's `student.path` points
into its sweep child's folder). An eval run also keeps its sweep values (`tau=...`): its config does not
say which checkpoint of the sweep it evaluated. A metric a run did not log is left blank, never 0.

    aopd compare --out outputs/compare
"""

from __future__ import annotations

import csv
import statistics
from collections import defaultdict
from datetime import datetime
from pathlib import Path, PurePosixPath

from aopd_cli import metrics as names
from aopd_cli.errors import UserError

COMPARED_STAGES = ("distill", "continual", "eval")
RUN_LOCAL_KEYS = ("seed", "output_dir", "resume")  # differ per run by construction, never the method
TABLE_WIDTH = 100


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


def select_runs(all_runs, parent: str | None, every: bool) -> tuple[list, str]:
    """The finished stage runs to compare, and a line saying which they are."""
    def finished(runs):
        return [r for r in runs if r.info.status == "FINISHED" and r.data.tags.get("stage") in COMPARED_STAGES]

    if parent:
        return finished(_descendants(all_runs, parent)), f"the runs under run {parent}"
    tops = [r for r in all_runs if r.data.tags.get("stage") in ("sweep", "pipeline")
            and "mlflow.parentRunId" not in r.data.tags]
    if every or not tops:
        why = "" if every else " (no sweep or pipeline run found)"
        return finished(all_runs), f"every finished run of the experiment{why}"
    latest = max(tops, key=lambda r: r.info.start_time)
    started = datetime.fromtimestamp(latest.info.start_time / 1000).strftime("%Y-%m-%d %H:%M")
    status = "" if latest.info.status == "FINISHED" else f", {latest.info.status}"
    return finished(_descendants(all_runs, latest.info.run_id)), (
        f"the latest {latest.data.tags['stage']}, {latest.data.tags.get('mlflow.runName', '')} "
        f"(run {latest.info.run_id}, started {started}{status}); --all for every run, --parent RUN for another")


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


def config_key(run) -> tuple:
    """The run's config less what differs per run by construction: seeds of one configuration share it."""
    params = run.data.params
    root = PurePosixPath(params.get("output_dir", "")).parent
    kept = []
    for key, value in sorted(params.items()):
        if key in RUN_LOCAL_KEYS or key.startswith("tracking."):
            continue
        path = PurePosixPath(value)
        if str(root) not in ("", ".") and path.is_relative_to(root) and path != root:
            value = "<run folder>/" + str(path.relative_to(root))
        kept.append((key, value))
    return group_label(run), tuple(kept)


def group_runs(runs) -> tuple[dict[str, list], list[str]]:
    """Label -> one run per seed of one configuration, and notes on what was set aside."""
    by_key: dict[tuple, dict[str, object]] = defaultdict(dict)
    notes = []
    for run in sorted(runs, key=lambda r: r.info.start_time):
        seeds = by_key[config_key(run)]
        seed = run.data.params.get("seed", run.data.tags.get("seed", "?"))
        if seed in seeds:
            notes.append(f"{group_label(run)}: seed {seed} ran twice with the same config; the later run counts")
        seeds[seed] = run
    labels: dict[str, list[tuple]] = defaultdict(list)
    for key in by_key:
        labels[key[0]].append(key)
    groups = {}
    for label, keys in labels.items():
        for key in keys:  # one label, several configs (different steps, lr, ...): name what differs
            groups[label + _difference(key, keys)] = list(by_key[key].values())
    return groups, notes


def _difference(key: tuple, keys: list[tuple]) -> str:
    if len(keys) == 1:
        return ""
    values = [dict(k[1]) for k in keys]
    own = dict(key[1])
    differing = sorted({p for v in values for p in v if any(v.get(p) != w.get(p) for w in values)})
    shown = [f"{p}={own.get(p, '-')}" for p in differing[:3]]
    return " [" + " ".join(shown) + (" ..." if len(differing) > 3 else "") + "]"


def _stats(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def _cell(values: list[float], seeds: int, digits: int) -> str:
    """`mean ± std` over the seeds that logged it; blank when none did."""
    mean, std = _stats(values)
    if mean is None:
        return ""
    text = f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if std is not None else "")
    return text + (f" (n={len(values)})" if len(values) < seeds else "")


def key_metrics(runs) -> list[tuple[str, str]]:
    """(metric, short header) for the terminal: math Pass@1 and Pass@k, tool success, math change."""
    keys = {k for r in runs for k in r.data.metrics}
    benches = names.math_benchmarks(keys)
    math = names.MATH_AVG if names.pass_at(names.MATH_AVG, 1) in keys else (benches[0] if benches else None)
    chosen = []
    if math is not None:
        chosen += [(names.pass_at(math, k), f"Pass@{k}") for k in sorted({1, names.largest_k(keys) or 1})
                   if names.pass_at(math, k) in keys]
    chosen += [(names.tool(bench, "success"), f"{bench} success") for bench in names.tool_benchmarks(keys)[:1]]
    retention = names.retention_ks(keys)
    if retention:
        chosen.append((names.retention(retention[-1], "change"), f"math Δ Pass@{retention[-1]}"))
    return chosen


def _write_tables(groups: dict[str, list], keys: list[str], out: Path) -> None:
    header = ["group", "stage", "seeds", "seed values"]
    rows_csv, rows_md = [], []
    for label, members in groups.items():
        seeds = ",".join(sorted(str(r.data.params.get("seed", "?")) for r in members))
        cells_csv, cells_md = [], []
        for key in keys:
            values = [r.data.metrics[key] for r in members if key in r.data.metrics]
            mean, std = _stats(values)
            cells_csv += ["" if mean is None else f"{mean:.6g}", "" if std is None else f"{std:.6g}",
                          str(len(values))]
            cells_md.append(_cell(values, len(members), 4))
        stage = members[0].data.tags.get("stage", "")
        rows_csv.append([label, stage, str(len(members)), seeds] + cells_csv)
        rows_md.append([label, stage, str(len(members)), seeds] + cells_md)
    with open(out / "compare.csv", "w", newline="") as handle:
        csv.writer(handle).writerows([header + [c for k in keys for c in (k, f"{k} std", f"{k} n")]] + rows_csv)
    md_header = header + [f"{k} (mean ± std)" for k in keys]
    (out / "compare.md").write_text(
        "Mean ± std over the seeds of each configuration; n = the seeds that logged a metric where fewer than "
        "all; a blank cell: not logged.\n\n| " + " | ".join(md_header) + " |\n|" + "---|" * len(md_header) + "\n"
        + "".join("| " + " | ".join(row) + " |\n" for row in rows_md))


def terminal_table(groups: dict[str, list], columns: list[tuple[str, str]], title: str):
    from rich import box
    from rich.table import Table
    from rich.text import Text

    caption = "; ".join([f"{header}: {key}" for key, header in columns if header != key]
                        + ["mean ± std over seeds; blank: not logged"])
    table = Table(title=Text(title), box=box.SIMPLE_HEAD, caption=Text(caption), caption_justify="left")
    # a label stays on one line up to 20 characters: with four metric columns the table keeps to 100
    table.add_column("method (stage:run swept values)", overflow="fold", ratio=1,
                     min_width=min(20, max((len(label) for label in groups), default=10)))
    table.add_column("seeds", justify="right", no_wrap=True)
    for _, header in columns:
        table.add_column(header, justify="right", overflow="fold")
    for label, members in groups.items():
        table.add_row(Text(label), str(len(members)), *[  # Text: a label's "[train.steps=3]" is not markup
            _cell([r.data.metrics[key] for r in members if key in r.data.metrics], len(members), 3)
            for key, _ in columns])
    return table


def run_compare(*, experiment: str, parent: str | None, metrics: list[str], out_dir: str,
                tracking_uri: str | None, every: bool = False) -> Path:
    from rich.console import Console

    from aopd_cli.tracking.store import find_runs

    every_run = find_runs(tracking_uri, experiment)
    if parent and not any(run.info.run_id == parent for run in every_run):
        from aopd_cli.config.suggest import did_you_mean

        parents = [run.info.run_id for run in every_run if run.data.tags.get("stage") in ("sweep", "pipeline")]
        raise UserError(f"--parent {parent}: no such run in experiment {experiment!r}{did_you_mean(parent, parents)}; "
                        "a sweep or pipeline ends with the `aopd compare --parent RUN` to use")
    runs, scope = select_runs(every_run, parent, every)
    if not runs:
        raise UserError(f"no finished distill/continual/eval runs in experiment {experiment!r}"
                        + (f" under run {parent}" if parent else "") + "; run a stage or a sweep first")
    groups, notes = group_runs(runs)
    order = {stage: i for i, stage in enumerate(COMPARED_STAGES)}
    groups = dict(sorted(groups.items(), key=lambda kv: (order[kv[1][0].data.tags["stage"]], kv[0])))
    keys = sorted({k for r in runs for k in r.data.metrics if names.is_final(k)} | set(metrics))
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:  # one line naming the folder, not a traceback
        raise UserError(f"--out {out_dir}: cannot create it ({err.strerror})") from None
    _write_tables(groups, keys, out)
    terminal = Console()
    console = Console(width=min(TABLE_WIDTH, terminal.width) if terminal.is_terminal else TABLE_WIDTH)
    console.print(f"Comparing {scope}: {len(runs)} runs in {len(groups)} configurations.", highlight=False,
                  markup=False)
    columns = [(m, m) for m in metrics] if metrics else key_metrics(runs)
    console.print(terminal_table(groups, columns, f"{experiment}: final metrics"))
    for note in notes:
        console.print(f"note: {note}", highlight=False, markup=False)
    from aopd_cli.results.plots import write_plots

    plots = write_plots(runs, groups, out, tracking_uri)
    if parent:
        from aopd_cli.tracking.store import run_tracker

        tracker = run_tracker(tracking_uri, parent)
        for path in [out / "compare.csv", out / "compare.md", *plots]:
            tracker.log_artifact(path, "compare")
    console.print(f"wrote every final metric to {out / 'compare.csv'} and {out / 'compare.md'}, "
                  f"and {len(plots)} plots to {out}", highlight=False, markup=False)
    return out
