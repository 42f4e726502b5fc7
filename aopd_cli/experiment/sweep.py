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
from aopd_cli.config.suggest import did_you_mean
from aopd_cli.stages.lifecycle import external_fingerprints
from aopd_cli.stages.preflight import preflight_all

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
    root: Path = Path("outputs/sweeps")  # the children's folders are under it


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


def _check_swept_keys(stage: str, params: list[str], overrides: list[str]) -> None:
    """Every `--param` key names a key (or a group) the swept stages have: one line naming the key, with a
    suggestion, before any child is composed."""
    from aopd_cli.config.compose import compose_dict, flat_keys, groups_of

    kinds = [stage] if stage != "pipeline" else ["warmup", "distill", "continual", "eval"]
    known = {key for kind in kinds for key in flat_keys(compose_dict(kind, [o for o in overrides if stage != "pipeline"]))}
    known |= set(groups_of())
    if stage == "pipeline" and _experiment_file(overrides).is_file():  # STAGE.key targets one stage
        from aopd_cli.config.compose import load_experiment

        known |= {f"{s.name}.{key}" for s in load_experiment(str(_experiment_file(overrides))).stages
                  for key in flat_keys(compose_dict(s.stage, []))}
    for param in params:
        short = param.partition("=")[0]
        key = ALIASES.get(short, short)
        if short and key not in known:
            raise ConfigError(f"--param {short}: unknown key{did_you_mean(short, [*known, *ALIASES])}")


def _target(stage: str, overrides: list[str], values: dict[str, str], out: Path, tags: dict[str, str] | None = None):
    """A child's validated stage config, or its pipeline Plan, writing under `out`."""
    child_overrides = overrides + [f"{k}={v}" for k, v in values.items()] + [f"output_dir={out}"]
    if stage == "pipeline":
        from aopd_cli.experiment.pipeline import plan_pipeline

        return plan_pipeline(child_overrides, extra_tags=tags, label=point_label(values))
    return load_stage_config(stage, child_overrides)


def _configs(stage: str, targets: list) -> list:
    """The stage configs of children (a pipeline child has several)."""
    return [config for t in targets for config in (t.configs.values() if stage == "pipeline" else [t])]


def plan_sweep(stage: str, params: list[str], seeds: int, overrides: list[str]) -> SweepPlan:
    if stage not in STAGES:
        raise ConfigError(f"sweep STAGE must be one of {', '.join(STAGES)}, got {stage!r}{did_you_mean(stage, STAGES)}")
    _check_swept_keys(stage, params, overrides)
    command = json.dumps([stage, sorted(params), seeds, overrides])
    # the same command after an edit to a recipe or experiment file, or to a data file it reads, is another
    # sweep: its children would run other configs or data, and "done before" must never stand for old runs
    # (a grid point reads what its seeds read: one probe per point, written nowhere)
    probes = [_target(stage, overrides, {**point, "seed": "0"}, Path("outputs/sweeps/probe")) for point in expand(params)]
    inputs = json.dumps([external_fingerprints(_configs(stage, [probe])) for probe in probes], sort_keys=True)
    sweep_id = hashlib.sha256((command + _definitions_digest(stage, overrides) + inputs).encode()).hexdigest()[:12]
    # `output_dir=DIR` places the sweep (DIR/sweeps/ID; a cluster's nodes need it on a file system they share)
    root = Path(next((o.partition("=")[2] for o in reversed(overrides) if o.startswith("output_dir=")), "outputs"))
    root = root / "sweeps" / sweep_id
    children = []
    for point in expand(params):
        for seed in range(seeds):
            values = {**point, "seed": str(seed)}
            child_id = hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:10]
            tags = {"sweep_id": sweep_id, "sweep_child": child_id, **{f"sweep.{k}": v for k, v in values.items()}}
            children.append(Child(child_id, values, tags, _target(stage, overrides, values, root / child_id, tags)))
    first = children[0].target
    tracking = next(iter(first.configs.values())).tracking if stage == "pipeline" else first.tracking
    # the experiment as it was when the sweep ran: the report reads this, not the file as it is later
    text = _experiment_file(overrides).read_text() if stage == "pipeline" else ""
    return SweepPlan(stage, sweep_id, children, tracking, command, text, root)


def run_sweep(plan: SweepPlan, executor: str = "local", address: str | None = None, nproc: int = 1) -> None:
    """The children not finished yet, under the sweep's parent run: one after another in this process, or as
    Ray Jobs side by side (`executor=ray`; a pipeline child's stages are jobs of their own). `nproc`: each
    stage child under torchrun with that many processes (GPUs), Ray only."""
    from aopd_cli.experiment.executors import runner

    if nproc > 1 and executor != "ray":
        raise ConfigError(f"--nproc-per-node {nproc} on a sweep starts each child under torchrun as a Ray job: add "
                          "--executor ray (or run a child alone: aopd STAGE ... --nproc-per-node N)")
    # every child's inputs before the sweep's run exists: a refused sweep leaves no run behind
    configs = _configs(plan.stage, [c.target for c in plan.children])
    preflight_all({f"{i}": config for i, config in enumerate(configs)} if plan.stage != "pipeline" else
                  {f"{c.child_id}.{name}": config for c in plan.children for name, config in c.target.configs.items()})
    with runner(executor, address) as run:  # the cluster answers, and can run every child, before any run exists
        run.check(_jobs(plan, plan.children, None, nproc))
        _run_children(plan, run, executor == "ray", nproc)


def _jobs(plan: SweepPlan, children: list[Child], parent_run_id: str | None, nproc: int) -> list:
    """A job a child (a stage sweep), or one a stage of each child (a pipeline sweep)."""
    from aopd_cli.experiment.executors import Job
    from aopd_cli.experiment.pipeline import stage_jobs

    if plan.stage == "pipeline":
        return [job for c in children for job in stage_jobs(c.target, parent_run_id, prefix=f"{c.child_id}-",
                                                            child=c.child_id,
                                                            nproc=c.target.experiment.launch.gpus_per_node or 1)]
    def run_name(child: Child) -> str:
        objective = getattr(child.target, "objective", None)
        return " ".join(filter(None, [plan.stage, objective.name if objective else "", point_label(child.values)]))

    return [Job(child.child_id, f"[{number}/{len(children)}] {point_label(child.values)}", child.target,
                parent_run_id, run_name(child), child.tags, nproc=nproc) for number, child in enumerate(children, 1)]


def _run_children(plan: SweepPlan, jobs_runner, on_ray: bool, nproc: int) -> None:
    """The sweep's parent run (resumed on a rerun), its children not finished yet, and its end."""
    from rich.console import Console

    from aopd_cli.errors import Interrupted
    from aopd_cli.experiment.pipeline import run_pipeline
    from aopd_cli.tracking.runs_view import TRAINING_ROWS, runs_link, table_columns
    from aopd_cli.tracking.store import find_runs, resume_run, start_run

    console = Console()
    configs = _configs(plan.stage, [c.target for c in plan.children])
    experiment, uri = plan.tracking.experiment, plan.tracking.uri
    parents = find_runs(uri, experiment, f"tags.sweep_parent = '{plan.sweep_id}'")
    parent = resume_run(plan.tracking, parents[0].info.run_id) if parents else start_run(
        plan.tracking, run_name=f"sweep {plan.stage} {plan.sweep_id}",
        tags={"sweep_parent": plan.sweep_id, "stage": "sweep", "sweep_command": plan.command[:5000],
              **({"experiment_yaml": plan.experiment_text} if plan.experiment_text else {})})
    link = None
    if parent.run_id:  # the view is there from the start: the runs can be watched as they come
        link = runs_link(plan.tracking, table_columns(configs, plan.children[0].values),
                         f"tags.sweep_id = '{plan.sweep_id}' and {TRAINING_ROWS}")  # every stage of every child
        console.print(f"sweep {plan.sweep_id}: watch its runs with {link}", soft_wrap=True, highlight=False)
    finished = {run.data.tags.get("sweep_child") for run in find_runs(
        uri, experiment, f"tags.sweep_id = '{plan.sweep_id}' and attributes.status = 'FINISHED'")
        if run.data.tags.get("mlflow.parentRunId") == parent.run_id}
    todo = [child for child in plan.children if child.child_id not in finished]
    console.print(f"[bold]sweep {plan.sweep_id}[/]: {len(plan.children)} runs, {len(plan.children) - len(todo)} "
                  "already done")
    for number, child in enumerate(plan.children, 1):
        if child not in todo:
            console.print(f"[{number}/{len(plan.children)}] {point_label(child.values)}: done before, skipped")
    try:
        if plan.stage == "pipeline" and on_ray:
            _pipelines_on_ray(plan, todo, parent.run_id, jobs_runner)
        elif plan.stage == "pipeline":
            for number, child in enumerate(todo, 1):
                console.rule(f"[{number}/{len(todo)}] {point_label(child.values)}")
                run_pipeline(child.target, parent_run_id=parent.run_id, check=False)
        else:
            jobs_runner.run(_jobs(plan, todo, parent.run_id, nproc), group=plan.sweep_id, root=plan.root)
    except (KeyboardInterrupt, Interrupted):
        parent.close("KILLED")
        console.print("[bold yellow]sweep interrupted[/]: run the same command again to resume "
                      "(finished runs are skipped, the interrupted one continues from its checkpoint)")
        raise
    except BaseException:  # a child that failed or was refused: the sweep's run says so, never RUNNING
        parent.close("FAILED")
        raise
    parent.close("FINISHED")
    if parent.run_id is None:
        console.print(f"[bold green]sweep {plan.sweep_id} done[/]")
        return
    # soft_wrap: a command cut across lines cannot be pasted
    console.print(f"[bold green]sweep {plan.sweep_id} done[/]: compare with `aopd compare --parent {parent.run_id}`; "
                  f"see the runs with {link}", soft_wrap=True, highlight=False)


def _pipelines_on_ray(plan: SweepPlan, children: list[Child], parent_run_id: str | None, jobs_runner) -> None:
    """Every stage of every pipeline child a Ray job, each child under its pipeline run as `aopd pipeline` has
    it. A shared stage (the lab's warm-ups, the same in every child) is trained by the first child that has it:
    the others' copies wait for it, then find it cached."""
    from contextlib import ExitStack

    from aopd_cli.experiment.pipeline import finish_pipeline, pipeline_run, stage_jobs

    with ExitStack() as stack:
        runs = {c.child_id: stack.enter_context(pipeline_run(c.target, parent_run_id)) for c in children}
        jobs, first_of = [], {}
        for c in children:
            nproc = c.target.experiment.launch.gpus_per_node or 1
            for stage, job in zip(c.target.experiment.stages, stage_jobs(c.target, runs[c.child_id][0].run_id,
                                                                           prefix=f"{c.child_id}-", child=c.child_id,
                                                                           nproc=nproc)):
                if stage.shared:
                    job.after += [first_of[stage.name]] if stage.name in first_of else []
                    first_of.setdefault(stage.name, job.job_id)
                jobs.append(job)
        timings = jobs_runner.run(jobs, group=plan.sweep_id, root=plan.root)
        for c in children:
            own = {job_id.removeprefix(f"{c.child_id}-"): t for job_id, t in timings.items()
                   if job_id.startswith(f"{c.child_id}-")}
            finish_pipeline(c.target, runs[c.child_id][0], own, runs[c.child_id][1])
