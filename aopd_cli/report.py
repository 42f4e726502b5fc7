"""`aopd report`: the lab report (docs/lab.md and its PNGs) generated from the MLflow runs of a sweep of
`experiments/lab_full.yaml` over seeds, plus the ablation sweeps where they exist. Nothing in it is typed
by hand: rerun it after a new sweep and the tables, figures and verdicts follow the runs.

What it reads: a sweep parent run (`aopd sweep pipeline experiment=lab_full --seeds 3`), its pipeline
runs (one per seed) and their stage runs, named as in the experiment file. Table 1 rows are the
experiment's `table1` labels, written `<block>: <method>` (block `weak` or `strong`); a distillation
stage is found from its eval stage's `student.path=@STAGE`. Ablations are the newest finished sweeps
of `experiments/ablation_{beta,topk,tau,location}.yaml` in the same store, or the parents given.

    aopd report --parent RUN_ID --out docs/lab.md
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from aopd_cli import metrics as names
from aopd_cli.errors import ConfigError, UserError

ABLATIONS = ("ablation_beta", "ablation_topk", "ablation_tau", "ablation_location")
MATH_BENCH = "lab_math"  # the curves' benchmark: the held-out test split, as the paper's App. D


@dataclass
class Sweep:
    """One sweep of a pipeline experiment: per seed, the stage runs by stage name."""

    experiment: object  # config.schema.Experiment
    parent: object  # the sweep's MLflow run
    seeds: dict[str, dict[str, object]] = field(default_factory=dict)

    def runs(self, stage: str) -> list:
        return [by_name[stage] for by_name in self.seeds.values() if stage in by_name]

    def finals(self, stage: str, key: str) -> list[float]:
        return [run.data.metrics[key] for run in self.runs(stage) if key in run.data.metrics]

    def source(self, eval_stage: str) -> str | None:
        """The stage whose checkpoint an eval stage evaluates (`student.path=@STAGE`)."""
        for stage in self.experiment.stages:
            if stage.name == eval_stage:
                for override in stage.overrides:
                    key, _, value = override.partition("=")
                    if key == "student.path" and value.startswith("@"):
                        return value[1:]
        return None


def _children(runs) -> dict[str, list]:
    found = defaultdict(list)
    for run in runs:
        found[run.data.tags.get("mlflow.parentRunId")].append(run)
    return found


def _sweep_experiment(run) -> str | None:
    import json

    try:
        stage, _, _, overrides = json.loads(run.data.tags.get("sweep_command", "null"))
    except (TypeError, ValueError):
        return None
    if stage != "pipeline":
        return None
    named = [o.partition("=")[2] for o in overrides if o.startswith("experiment=")]
    return named[-1] if named else "lab"


def _experiment_name(run) -> str | None:
    """The `name` of the experiment a sweep ran (its file may be a path: a smoke copy, say)."""
    from aopd_cli.config.compose import load_experiment

    found = _sweep_experiment(run)
    try:
        return load_experiment(found).name if found else None
    except ConfigError:  # the file is gone
        return None


def load_sweep(all_runs, parent_id: str | None, experiment: str) -> Sweep | None:
    """The sweep `parent_id`, or the newest finished sweep of `experiment`; None when there is none."""
    from aopd_cli.config.compose import load_experiment

    if parent_id is None:
        parents = [r for r in all_runs if r.data.tags.get("stage") == "sweep" and r.info.status == "FINISHED"
                   and _experiment_name(r) == experiment]
        if not parents:
            return None
        parent = max(parents, key=lambda r: r.info.start_time)
    else:
        parent = next((r for r in all_runs if r.info.run_id == parent_id), None)
        if parent is None:
            raise UserError(f"no run {parent_id} in the tracking store")
    children = _children(all_runs)
    sweep = Sweep(load_experiment(_sweep_experiment(parent) or experiment), parent)
    for pipeline in children[parent.info.run_id]:
        if pipeline.info.status != "FINISHED":
            continue
        seed = pipeline.data.tags.get("sweep.seed", pipeline.info.run_id)
        # runs are named by what they are (`opd_weak seed=1`); the stage's name in the experiment is a tag
        sweep.seeds[seed] = {r.data.tags.get("pipeline_stage", r.data.tags.get("mlflow.runName")): r
                             for r in children[pipeline.info.run_id]}
    if not sweep.seeds:
        raise UserError(f"sweep {parent.info.run_id} has no finished pipeline run")
    return sweep


# ---------------------------------------------------------------- numbers
def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def fmt(values: list[float], sign: bool = False) -> str:
    """Percent, mean ± std over seeds (`-` when no run logged it)."""
    mean, std = mean_std(values)
    if mean is None:
        return "-"
    if len(values) == 1:  # one run has no spread to show
        return f"{100 * mean:+.1f} (1 run)" if sign else f"{100 * mean:.1f} (1 run)"
    return f"{100 * mean:+.1f} ± {100 * std:.1f}" if sign else f"{100 * mean:.1f} ± {100 * std:.1f}"


def rows_by_block(sweep: Sweep) -> dict[str, dict[str, str]]:
    """{block: {method: eval stage}} from the `table1` labels `<block>: <method>` (no block: `all`)."""
    blocks: dict[str, dict[str, str]] = defaultdict(dict)
    for label, stage in sweep.experiment.table1.items():
        block, sep, method = label.partition(": ")
        blocks[block if sep else "all"][method if sep else label] = stage
    return blocks


def table1(sweep: Sweep) -> str:
    k = 4
    lines = [f"| block | model | Pass@1 | Pass@{k} | greedy | seeds |", "|---|---|---|---|---|---|"]
    for block, methods in rows_by_block(sweep).items():
        for method, stage in methods.items():
            cells = [fmt(sweep.finals(stage, names.pass_at(names.MATH_AVG, kk))) for kk in (1, k)]
            cells.append(fmt(sweep.finals(stage, names.greedy(names.MATH_AVG))))
            lines.append(f"| {block} | {method} | " + " | ".join(cells) + f" | {len(sweep.runs(stage))} |")
    return "\n".join(lines)


def _tool_key(metrics: dict, kind: str) -> str | None:
    for key in metrics:
        parsed = names.parse_eval(key)
        if parsed is not None and parsed.kind == kind and parsed.bench.startswith("lab_tools"):
            return key
    return None


def tool_values(sweep: Sweep, stage: str, kind: str) -> list[float]:
    values = []
    for run in sweep.runs(stage):
        key = _tool_key(run.data.metrics, kind)
        if kind == "greedy":  # math and tools both have a greedy key: take the tool benchmark's
            key = next((k for k in run.data.metrics if k.startswith("eval/lab_tools") and k.endswith("/greedy")), None)
        if key is not None:
            values.append(run.data.metrics[key])
    return values


def table2_rows(sweep: Sweep) -> dict[str, dict[str, list[float]]]:
    """Per method: tool success (sampled, greedy), math Pass@4 before / after / change, per seed."""
    rows = {}
    key = names.pass_at(names.MATH_AVG, 4)
    for method, (before, after) in sweep.experiment.table2.items():
        pairs = [(s[before].data.metrics.get(key), s[after].data.metrics.get(key)) for s in sweep.seeds.values()
                 if before in s and after in s]
        pairs = [(b, a) for b, a in pairs if b is not None and a is not None]
        rows[method] = {"success": tool_values(sweep, after, "success"), "greedy": tool_values(sweep, after, "greedy"),
                        "first_call": tool_values(sweep, after, "first_call"), "before": [b for b, _ in pairs],
                        "after": [a for _, a in pairs], "change": [a - b for b, a in pairs]}
    return rows


def table2(sweep: Sweep) -> str:
    lines = ["| method | tool success | tool greedy | first call | math Pass@4 before | after | change |",
             "|---|---|---|---|---|---|---|"]
    for method, row in table2_rows(sweep).items():
        lines.append(f"| {method} | {fmt(row['success'])} | {fmt(row['greedy'])} | {fmt(row['first_call'])} | "
                     f"{fmt(row['before'])} | {fmt(row['after'])} | {fmt(row['change'], sign=True)} |")
    return "\n".join(lines)


def curve(client, runs: list, key: str) -> tuple[list[int], list[float], list[float]]:
    """(steps, mean, std) of one metric over the runs (seeds), on the steps every run logged."""
    from aopd_cli.tracking import metric_history

    by_step = defaultdict(list)
    for run in runs:
        for step, value in metric_history(client, run.info.run_id, key):
            by_step[step].append(value)
    steps = sorted(s for s, v in by_step.items() if len(v) == len(runs))
    return steps, [mean_std(by_step[s])[0] for s in steps], [mean_std(by_step[s])[1] for s in steps]


def training_stages(sweep: Sweep, block: str) -> dict[str, str]:
    """{method: distillation stage} of a block (methods whose eval stage evaluates a training stage)."""
    found = {}
    for method, stage in rows_by_block(sweep).get(block, {}).items():
        source = sweep.source(stage)
        if source and any(r.data.tags.get("stage") in ("distill", "continual") for r in sweep.runs(source)):
            found[method] = source
    return found


def wall_time(sweep: Sweep) -> float:
    """Seconds from the sweep's start to its end (the parent run's)."""
    info = sweep.parent.info
    return ((info.end_time or info.start_time) - info.start_time) / 1000.0


def stage_seconds(sweep: Sweep) -> dict[str, float]:
    """Mean wall seconds per stage over seeds (a reused warm-up takes about none)."""
    per_stage = defaultdict(list)
    for by_name in sweep.seeds.values():
        for name, run in by_name.items():
            if run.info.end_time:
                per_stage[name].append((run.info.end_time - run.info.start_time) / 1000.0)
    return {name: statistics.fmean(values) for name, values in per_stage.items()}


# ---------------------------------------------------------------- the document
def _settings(sweep: Sweep) -> str:
    """What each kind of stage ran with, read back from the first seed's params (not from the YAML)."""
    first = next(iter(sweep.seeds.values()))
    keys = ["train.steps", "train.lr", "train.batch_size", "objective.top_k", "rollout.n", "rollout.max_new_tokens",
            "train.eval_every"]
    lines = ["| stage | kind | " + " | ".join(keys) + " |", "|---" * (len(keys) + 2) + "|"]
    for name, run in first.items():
        if run.data.tags.get("stage") in ("warmup", "distill", "continual") and not run.data.tags.get("reused_checkpoint"):
            lines.append(f"| {name} | {run.data.tags.get('stage')} | " + " | ".join(
                run.data.params.get(k, "") for k in keys) + " |")
    return "\n".join(lines)


def _eval_settings(sweep: Sweep) -> tuple[str, str, str]:
    """(samples per problem, temperature, how many test problems) as the eval runs logged them."""
    run = next((r for by_name in sweep.seeds.values() for r in by_name.values()
                if r.data.tags.get("stage") == "eval"), None)
    params = run.data.params if run else {}
    limit = params.get("eval.limit", "None")
    return params.get("eval.n", "?"), params.get("eval.temperature", "?"), "all" if limit == "None" else f"the first {limit}"


def write_report(*, tracking_uri: str | None, experiment: str = "aopd", parent: str | None = None,
                 ablation_parents: dict[str, str] | None = None, out: str | Path = "docs/lab.md",
                 figures: str | Path | None = None) -> Path:
    """Write the report `out` and its PNGs (default: a folder named like `out` without `.md`)."""
    from aopd_cli.report_claims import ablation_finals, claims
    from aopd_cli.report_figures import (ablation_bars, advantage_histogram, pass_at_1_curves, table2_bars,
                                         training_curves)
    from aopd_cli.tracking import connect, find_runs

    out = Path(out)
    fig_dir = Path(figures) if figures else out.with_suffix("")
    fig_dir.mkdir(parents=True, exist_ok=True)
    client, all_runs = connect(tracking_uri), find_runs(tracking_uri, experiment)
    sweep = load_sweep(all_runs, parent, "lab_full")
    if sweep is None:
        raise UserError(f"no finished sweep of lab_full in experiment {experiment!r}: run "
                        "`aopd sweep pipeline experiment=lab_full --seeds 3` first, or pass --parent")
    ablations = {}
    for name in ABLATIONS:
        found = load_sweep(all_runs, (ablation_parents or {}).get(name), name)
        if found is not None:
            ablations[name] = found
    pngs = pass_at_1_curves(client, sweep, fig_dir) + training_curves(client, sweep, fig_dir)
    pngs.append(advantage_histogram(client, sweep, fig_dir))
    if sweep.experiment.table2:
        pngs.append(table2_bars(sweep, fig_dir))
    for name, ablation in ablations.items():
        pngs += ablation_bars(client, name, ablation, fig_dir)
    link = {p.name: Path(p).relative_to(out.parent) if p.is_relative_to(out.parent) else p for p in pngs}
    seeds, commit = len(sweep.seeds), next(iter(next(iter(sweep.seeds.values())).values())).data.tags.get("git_commit")
    n, temperature, problems = _eval_settings(sweep)
    parts = [
        f"# The lab: {sweep.experiment.name}, {seeds} seeds", "",
        f"Generated by `aopd report --parent {sweep.parent.info.run_id}` from the MLflow runs of sweep "
        f"`{sweep.parent.data.tags.get('sweep_parent', '?')}` (git {str(commit)[:10]}); do not edit by hand, rerun it. "
        "Numbers are percentages, mean ± std over seeds (the warm-ups are shared: the seeds vary the "
        f"distillation, continual and evaluation sampling). Pass@1 / Pass@4 from {n} samples per problem at "
        f"temperature {temperature} on {problems} held-out test problems; greedy is one greedy answer per problem. How the "
        "settings were chosen (on the development split), and what was tried: [lab-search.md](lab-search.md).", "",
        sweep.experiment.description, "",
        "## Table 1: math after distillation (paper Table 1)", "", table1(sweep), "",
    ]
    if sweep.experiment.table2:
        parts += ["## Table 2: continual learning on tools (paper Table 2)", "",
                  f"Tool success: per instruction, the share of its {n} sampled multi-turn episodes whose calls match "
                  "the whole golden sequence and that then answer, averaged over the test instructions "
                  "(greedy: one episode each). Math: average Pass@4 before and after the continual stage.", "",
                  table2(sweep), "", f"![Table 2]({link['table2_continual.png']})", ""]
    parts += ["## Claims", "", "A gap under 2 points of Pass@1 (about one standard error) counts as a tie.", ""]
    parts += [f"- {line}" for line in claims(sweep, client, ablations)] + [""]
    parts += ["## Figures", ""] + [f"![{name}]({path})" for name, path in link.items()
                                   if not name.startswith(("ablation", "table2"))] + [""]
    if ablations:
        parts += ["## Ablations (paper Sec. 6.4)", ""]
        for name, ablation in ablations.items():
            parts += [f"### {name} ({len(ablation.seeds)} seeds)", "", "| setting | Pass@1 | greedy |", "|---|---|---|"]
            parts += [f"| {label} | {fmt(p)} | {fmt(g)} |" for label, p, g in ablation_finals(ablation)]
            parts += [""] + [f"![{n}]({path})" for n, path in link.items() if n.startswith(name)] + [""]
    parts += ["## Settings (as the runs logged them)", "", _settings(sweep), "",
              "## Wall time", "", f"Sweep: {wall_time(sweep) / 60:.1f} min for {seeds} seeds (warm-ups trained once).", "",
              "| stage | mean seconds per seed |", "|---|---|"]
    cached = {name for by_name in sweep.seeds.values() for name, run in by_name.items()
              if run.data.tags.get("reused_checkpoint")}
    parts += [f"| {name} | {'cached (trained once, before)' if name in cached else f'{seconds:.0f}'} |"
              for name, seconds in stage_seconds(sweep).items()]
    out.write_text("\n".join(parts) + "\n")
    return out
