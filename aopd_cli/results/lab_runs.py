"""The lab's runs as data, read from the MLflow store: a sweep of a pipeline experiment over seeds (per
seed, its stage runs by stage name), the final metrics and curves of its stages, Table 1's blocks and
Table 2's rows. `aopd report` (report.py), its verdicts (claims.py) and its figures (figures.py) read it.

What it reads: a sweep parent run (`aopd sweep pipeline experiment=lab_full --seeds 3`), its pipeline
runs (one per seed) and their stage runs, named as in the experiment file. Table 1 rows are the
experiment's `table1` labels, written `<block>: <method>` (block `weak` or `strong`); a distillation
stage is found from its eval stage's `student.path=@STAGE`.

    aopd report --parent RUN_ID --out docs/lab.md
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from dataclasses import dataclass, field

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


def experiment_of(run):
    """The experiment a sweep ran, as it was then (the `experiment_yaml` tag its start stored), else as its
    file says now (a sweep from before that tag); None when neither is there."""
    import yaml

    from aopd_cli.config.compose import load_experiment
    from aopd_cli.config.schema import Experiment

    text = run.data.tags.get("experiment_yaml")
    if text:
        return Experiment.model_validate(yaml.safe_load(text))
    found = _sweep_experiment(run)
    try:
        return load_experiment(found) if found else None
    except ConfigError:  # the file is gone
        return None


def _experiment_name(run) -> str | None:
    """The `name` of the experiment a sweep ran (its file may be a path: a smoke copy, say)."""
    experiment = experiment_of(run) if _sweep_experiment(run) else None
    return experiment.name if experiment is not None else None


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
    sweep = Sweep(experiment_of(parent) or load_experiment(experiment), parent)
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


def rows_by_block(sweep: Sweep) -> dict[str, dict[str, str]]:
    """{block: {method: eval stage}} from the `table1` labels `<block>: <method>` (no block: `all`)."""
    blocks: dict[str, dict[str, str]] = defaultdict(dict)
    for label, stage in sweep.experiment.table1.items():
        block, sep, method = label.partition(": ")
        blocks[block if sep else "all"][method if sep else label] = stage
    return blocks


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


def curve(client, runs: list, key: str) -> tuple[list[int], list[float], list[float]]:
    """(steps, mean, std) of one metric over the runs (seeds), on the steps every run logged."""
    from aopd_cli.tracking.store import metric_history

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


def ablation_finals(sweep: Sweep) -> list[tuple[str, list[float], list[float]]]:
    """(setting, Pass@1 per seed, greedy per seed) in the experiment's order."""
    return [(label, sweep.finals(stage, names.pass_at(names.MATH_AVG, 1)),
             sweep.finals(stage, names.greedy(names.MATH_AVG))) for label, stage in sweep.experiment.table1.items()]
