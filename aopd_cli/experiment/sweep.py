"""`aopd sweep STAGE --param KEY=VALUES [--seeds N] [overrides]`: the grid product times seeds, run one
after another, each a child MLflow run under one parent run of the sweep and tagged with its values.

Values use Hydra's sweep grammar (`-1,0,1`, `range(0,1,0.25)`, `choice(a,b)`); `tau`, `beta`, `top_k`,
`intervention`, `zero_eps`, `lam`, `lmbda` mean `objective.<name>`. Every child's config is validated
before the first one starts. The sweep's identity is a hash of the command, so running the same command
again resumes it: finished children are skipped, interrupted ones rerun. Upstream warm-ups with
`reuse_cached=true` (the lab's) are trained once and reused by every child.

    aopd sweep pipeline experiment=lab_smoke --param tau=-1,0
"""

from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import dataclass
from pathlib import Path

from aopd_cli.config.compose import ConfigError, load_stage_config, sweep_values

ALIASES = {name: f"objective.{name}" for name in ("tau", "beta", "top_k", "intervention", "zero_eps", "lam", "lmbda")}
STAGES = ("warmup", "distill", "continual", "eval", "pipeline")


@dataclass
class Child:
    child_id: str
    values: dict[str, str]  # swept key -> value (seed included)
    tags: dict[str, str]  # on the child's runs: the sweep, the child, and `sweep.<key>` = value
    target: object  # a validated stage config, or a pipeline Plan


@dataclass
class SweepPlan:
    stage: str
    sweep_id: str
    children: list[Child]
    tracking: object
    command: str
    experiment_text: str = ""  # a pipeline sweep's experiment file, as it was at the start


def expand(params: list[str]) -> list[dict[str, str]]:
    """The grid of `--param KEY=VALUES` options, in order (first key varies slowest)."""
    axes = []
    for param in params:
        key, sep, values = param.partition("=")
        if not sep or not values:
            raise ConfigError(f"--param {param!r}: expected KEY=VALUES, e.g. tau=-1,0,1")
        key = ALIASES.get(key, key)
        axes.append([(key, value) for value in sweep_values(key, values)])
    return [dict(combo) for combo in itertools.product(*axes)] if axes else [{}]


def point_label(values: dict[str, str]) -> str:
    """`tau=0.2 seed=1`: a grid point as run names show it."""
    return " ".join(f"{key.removeprefix('objective.')}={value}" for key, value in values.items())


def _experiment_file(overrides: list[str]) -> Path:
    """The experiment file a pipeline sweep composes from (the last `experiment=` wins, as in a pipeline)."""
    from aopd_cli.config.compose import experiment_path

    return experiment_path(next((o.partition("=")[2] for o in reversed(overrides) if o.startswith("experiment=")),
                                "lab"))


def _definitions_digest(stage: str, overrides: list[str]) -> str:
    """A digest of the YAML files the children are composed from: the recipes, and for a pipeline the
    experiment file it names. Other experiment files do not count (editing one leaves a sweep resumable);
    defaults written in the code do not either."""
    from aopd_cli.config.compose import recipes_dir

    root = recipes_dir()
    files = sorted(root.rglob("*.yaml"))
    if stage == "pipeline":
        files.append(_experiment_file(overrides))
    digest = hashlib.sha256()
    for path in files:
        if path.is_file():
            name = path.relative_to(root) if path.is_relative_to(root) else path.name
            digest.update(f"{name}\0".encode() + path.read_bytes())
    return digest.hexdigest()


def plan_sweep(stage: str, params: list[str], seeds: int, overrides: list[str]) -> SweepPlan:
    if stage not in STAGES:
        raise ConfigError(f"sweep STAGE must be one of {', '.join(STAGES)}, got {stage!r}")
    command = json.dumps([stage, sorted(params), seeds, overrides])
    # the same command after an edit to a recipe or experiment file is another sweep: its children would
    # run other configs, and "done before" must never stand for runs of the old ones
    sweep_id = hashlib.sha256((command + _definitions_digest(stage, overrides)).encode()).hexdigest()[:12]
    root = Path("outputs") / "sweeps" / sweep_id
    children = []
    for point in expand(params):
        for seed in range(seeds):
            values = {**point, "seed": str(seed)}
            child_id = hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:10]
            child_overrides = overrides + [f"{k}={v}" for k, v in values.items()]
            tags = {"sweep_id": sweep_id, "sweep_child": child_id, **{f"sweep.{k}": v for k, v in values.items()}}
            if stage == "pipeline":
                from aopd_cli.experiment.pipeline import plan_pipeline

                target = plan_pipeline(child_overrides + [f"output_dir={root / child_id}"], extra_tags=tags,
                                       label=point_label(values))
            else:
                target = load_stage_config(stage, child_overrides + [f"output_dir={root / child_id}"])
            children.append(Child(child_id, values, tags, target))
    first = children[0].target
    tracking = next(iter(first.configs.values())).tracking if stage == "pipeline" else first.tracking
    # the experiment as it was when the sweep ran: the report reads this, not the file as it is later
    text = _experiment_file(overrides).read_text() if stage == "pipeline" else ""
    return SweepPlan(stage, sweep_id, children, tracking, command, text)


def run_sweep(plan: SweepPlan) -> None:
    from rich.console import Console

    from aopd_cli.errors import Interrupted
    from aopd_cli.experiment.pipeline import run_pipeline
    from aopd_cli.stages.runner import run_stage
    from aopd_cli.tracking.runs_view import runs_link, table_columns
    from aopd_cli.tracking.store import find_runs, resume_run, start_run

    console = Console()
    experiment, uri = plan.tracking.experiment, plan.tracking.uri
    parents = find_runs(uri, experiment, f"tags.sweep_parent = '{plan.sweep_id}'")
    parent = resume_run(plan.tracking, parents[0].info.run_id) if parents else start_run(
        plan.tracking, run_name=f"sweep {plan.stage} {plan.sweep_id}",
        tags={"sweep_parent": plan.sweep_id, "stage": "sweep", "sweep_command": plan.command[:5000],
              **({"experiment_yaml": plan.experiment_text} if plan.experiment_text else {})})
    finished = {run.data.tags.get("sweep_child") for run in find_runs(
        uri, experiment, f"tags.sweep_id = '{plan.sweep_id}' and attributes.status = 'FINISHED'")
        if run.data.tags.get("mlflow.parentRunId") == parent.run_id}
    done = len(finished & {child.child_id for child in plan.children})
    console.print(f"[bold]sweep {plan.sweep_id}[/]: {len(plan.children)} runs, {done} already done")
    try:
        for number, child in enumerate(plan.children, 1):
            label = point_label(child.values)
            if child.child_id in finished:
                console.print(f"[{number}/{len(plan.children)}] {label}: done before, skipped")
                continue
            console.rule(f"[{number}/{len(plan.children)}] {label}")
            if plan.stage == "pipeline":  # the plan carries the tags to the pipeline run and its stages
                run_pipeline(child.target, parent_run_id=parent.run_id)
            else:
                name = " ".join(filter(None, [plan.stage, getattr(getattr(child.target, "objective", None), "name", ""),
                                              label]))
                run_stage(child.target, parent_run_id=parent.run_id, run_name=name, tags=child.tags)
    except (KeyboardInterrupt, Interrupted):
        parent.close("KILLED")
        console.print("[bold yellow]sweep interrupted[/]: run the same command again to resume "
                      "(finished runs are skipped, the interrupted one continues from its checkpoint)")
        raise
    parent.close("FINISHED")
    if parent.run_id is None:
        console.print(f"[bold green]sweep {plan.sweep_id} done[/]")
        return
    targets = [c.target for c in plan.children]
    configs = [config for t in targets for config in (t.configs.values() if plan.stage == "pipeline" else [t])]
    link = runs_link(plan.tracking, table_columns(configs, plan.children[0].values),
                     f"tags.sweep_id = '{plan.sweep_id}' and tags.stage != 'pipeline'")  # every stage of every child
    # soft_wrap: a command cut across lines cannot be pasted
    console.print(f"[bold green]sweep {plan.sweep_id} done[/]: compare with `aopd compare --parent {parent.run_id}`; "
                  f"see the runs with {link}", soft_wrap=True, highlight=False)
