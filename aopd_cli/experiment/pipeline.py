"""`aopd pipeline`: an experiment's stages in order (`experiments/NAME.yaml`), checkpoints passed along,
one MLflow run per stage under a parent run, then the comparison shaped like the paper's Tables 1 and 2.

In an experiment file, `student.path=@teacher` means "the checkpoint of the stage named teacher". Every
stage's config is composed and validated before the first stage starts. Command-line overrides:
`experiment=NAME`, `output_dir=DIR` (root of the stage folders), `STAGE.key=value` (one stage), and
`key=value` (every stage that has the key).

    aopd pipeline experiment=lab_smoke
"""

from __future__ import annotations

import json
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

from aopd_cli import metrics as names
from aopd_cli.config.compose import (
    ConfigError,
    UnknownKey,
    UnknownOption,
    compose_dict,
    load_experiment,
    load_stage_config,
)
from aopd_cli.config.paths import checkpoint_of
from aopd_cli.config.schema import Experiment


@dataclass
class Plan:
    experiment: Experiment
    configs: dict[str, object]  # stage name -> validated config
    root: Path
    extra_tags: dict[str, str]  # on every run (a sweep's values)
    stage_tags: dict[str, dict[str, str]] = field(default_factory=dict)  # an eval stage: what it evaluates
    label: str = ""  # swept values and seed, for run names ("tau=0.2 seed=1")


def plan_pipeline(overrides: list[str], extra_tags: dict[str, str] | None = None, label: str = "") -> Plan:
    pairs = []
    for override in overrides:
        key, sep, value = override.partition("=")
        if not sep:
            raise ConfigError(f"{override!r}: expected key=value")
        pairs.append((key, value, override))
    experiment = load_experiment(next((v for k, v, _ in pairs if k == "experiment"), "lab"))
    names = [s.name for s in experiment.stages]
    stages = {s.name: s.stage for s in experiment.stages}
    root, targeted, shared = None, {}, []
    for key, value, override in pairs:
        head, _, rest = key.partition(".")
        if key == "experiment":
            continue
        if key == "output_dir":
            root = value
        # a stage named like a config group (the lab's `teacher`) takes `teacher.key=...` only if it has the
        # key; else the override is the group's, for every stage (`teacher.engine=server`)
        elif rest and head in names and (head not in SHARED_GROUPS or _accepts(stages[head], [], f"{rest}={value}")):
            targeted.setdefault(head, []).append(f"{rest}={value}")
        else:
            shared.append(override)
    root_dir = Path(root or f"outputs/{experiment.name}")
    configs: dict[str, object] = {}
    stage_tags: dict[str, dict[str, str]] = {}
    used = {o: False for o in shared}
    for stage in experiment.stages:
        # precedence, lowest first: the experiment's shared overrides, the stage's own, the command line's
        own = [_resolve(o, configs, stage.name) for o in stage.overrides] + [f"output_dir={root_dir / stage.name}"]
        composed = _accepted(stage.stage, own, experiment.overrides) + own
        # a shared stage takes only the overrides that cannot change its checkpoint (where runs are tracked)
        offered = [o for o in shared if o.startswith(("tracking.", "threads="))] if stage.shared else shared
        for o in _accepted(stage.stage, composed, offered):
            used[o] = True
            composed.append(o)
        configs[stage.name] = load_stage_config(stage.stage, composed + targeted.get(stage.name, []))
        source = next((o.partition("=@")[2] for o in stage.overrides if o.startswith("student.path=@")), None)
        if stage.stage == "eval" and source in configs:
            evaluated = getattr(configs[source], "objective", None)
            stage_tags[stage.name] = {"evaluates": source, **({"objective": evaluated.name} if evaluated else {})}
    unused = [o for o, ok in used.items() if not ok and o.partition("=")[0] != "seed"]
    if unused:
        raise ConfigError(f"{unused[0]}: no stage of experiment {experiment.name!r} has this key")
    return Plan(experiment, configs, root_dir, extra_tags or {}, stage_tags, label)


SHARED_GROUPS = {"student", "teacher", "base", "data", "objective", "rollout", "train", "eval", "tracking"}


def _resolve(override: str, done: dict, stage_name: str) -> str:
    key, _, value = override.partition("=")
    if not value.startswith("@"):
        return override
    source = value[1:]
    if source not in done:
        raise ConfigError(f"stage {stage_name!r}: {override!r} refers to {source!r}, which is not an earlier stage")
    return f"{key}={checkpoint_of(done[source])}"


def _accepted(stage: str, base: list[str], overrides: list[str]) -> list[str]:
    """The overrides a stage of kind `stage` has the key of, in order, composing as few times as it can: once
    for `base`, and again only after a group's option is chosen (`rollout=vllm` brings its own keys)."""
    from aopd_cli.config.catalog import stage_groups
    from aopd_cli.config.compose import flat_keys

    groups, accepted, keys = set(stage_groups(stage)), [], None
    for override in overrides:
        key = override.partition("=")[0].lstrip("+~")
        if keys is None:
            keys = set(flat_keys(compose_dict(stage, base + accepted)))
        if key in groups or key in keys or any(k.startswith(f"{key}.") for k in keys):
            accepted.append(override)
            if key in groups:
                keys = None  # the option chosen changes the keys
    return accepted


def _accepts(stage: str, base: list[str], override: str) -> bool:
    """Does this stage have the key? Unknown keys skip the stage; values are validated with the rest."""
    try:
        compose_dict(stage, base + [override])
    except (UnknownKey, UnknownOption):
        return False
    return True


def run_pipeline(plan: Plan, parent_run_id: str | None = None, check: bool = True, executor: str = "local",
                 address: str | None = None, nproc: int = 1) -> dict:
    """Every stage under one parent run: in order in this process (`executor=local`), or each a Ray Job
    that starts once the stages it reads from are done, with `nproc` processes under torchrun (default: the
    experiment's `launch.gpus_per_node`). Rerunning continues: finished stages (same config and inputs) are
    skipped, an interrupted one resumes, and the parent run is the same."""
    from aopd_cli.experiment.executors import runner
    from aopd_cli.stages.preflight import preflight_all
    from aopd_cli.training import distributed as dist

    first = next(iter(plan.configs.values()))
    dist.init(first.dist_timeout_s)  # under torchrun: rank 0 alone holds the lock and the parent run
    if check:  # every stage's inputs before any folder or run exists (a sweep checked its children already)
        preflight_all(plan.configs)
    nproc = nproc if nproc > 1 or executor == "local" else plan.experiment.launch.gpus_per_node or 1
    with runner(executor, address) as run:
        run.check(stage_jobs(plan, None, nproc=nproc))
        with pipeline_run(plan, parent_run_id) as (parent, link):

            def done(job, seconds: float) -> None:
                parent.log_metrics({names.seconds(f"stage_{job.job_id}"): seconds})

            timings = run.run(stage_jobs(plan, parent.run_id, nproc=nproc), group=pipeline_group(plan),
                              root=plan.root, done=done)
            return finish_pipeline(plan, parent, timings, link)


def pipeline_group(plan: Plan) -> str:
    """The pipeline's name among Ray jobs: its output folder (one pipeline a folder, the lock says)."""
    import hashlib

    return hashlib.sha256(str(plan.root.resolve()).encode()).hexdigest()[:12]


def stage_jobs(plan: Plan, parent_run_id: str | None, prefix: str = "", child: str = "", nproc: int = 1) -> list:
    """One job a stage, waiting for the stages whose checkpoints it reads (`key=@stage`); `nproc` processes
    each, under torchrun (on Ray; the local executor runs where the command runs)."""
    from aopd_cli.experiment.executors import Job

    jobs = []
    for stage in plan.experiment.stages:
        config = plan.configs[stage.name]
        sources = [o.partition("=@")[2] for o in stage.overrides if "=@" in o]
        run_name = " ".join(filter(None, [stage.name, plan.label]))
        jobs.append(Job(f"{prefix}{stage.name}", f"{plan.experiment.name}: {stage.name} ({config.stage})"
                        + (f" {plan.label}" if plan.label else ""), config, parent_run_id, run_name,
                        {**plan.extra_tags, **plan.stage_tags.get(stage.name, {}), "pipeline_stage": stage.name},
                        after=[f"{prefix}{source}" for source in sources], nproc=nproc, child=child))
    return jobs


@contextmanager
def pipeline_run(plan: Plan, parent_run_id: str | None):
    """(parent run, its runs-table link) for the block: the pipeline's folder held by this process and its
    parent run (resumed on a rerun), which ends FINISHED, or FAILED / KILLED as the block does."""
    from aopd_cli.progress import say
    from aopd_cli.stages.lifecycle import end_earlier_run, output_lock, read_record
    from aopd_cli.tracking.runs_view import TRAINING_ROWS, runs_link, table_columns
    from aopd_cli.tracking.store import DEFAULT_URI, resume_run, start_run
    from aopd_cli.tracking.tracker import NullTracker, closing
    from aopd_cli.training import distributed as dist

    first = next(iter(plan.configs.values()))
    record_file = plan.root / "aopd_pipeline.json"
    name = " ".join(filter(None, [plan.experiment.name, plan.label]))
    with output_lock(plan.root) if dist.is_main() else nullcontext():
        parent, link = NullTracker(), None
        if dist.is_main():
            record = read_record(record_file) or {}
            if record.get("run_id") and record.get("tracking_uri") == first.tracking.uri:
                parent = resume_run(first.tracking, record["run_id"]) or NullTracker()
            elif record.get("run_id"):  # continued in another store: ended in its own
                end_earlier_run(record, plan.root, continued_in=first.tracking.uri or DEFAULT_URI)
            if parent.run_id is None:
                parent = start_run(first.tracking, run_name=name,
                                   tags={"stage": "pipeline", "experiment": plan.experiment.name, **plan.extra_tags},
                                   parent_run_id=parent_run_id)
            record_file.write_text(json.dumps({"run_id": parent.run_id, "tracking_uri": first.tracking.uri}))
            if parent.run_id and parent_run_id is None:  # (a sweep's child: the sweep's view lists it)
                # the view is there from the start: the runs can be watched as they come
                link = runs_link(first.tracking, table_columns(plan.configs.values()),
                                 f"tags.`mlflow.parentRunId` = '{parent.run_id}' and {TRAINING_ROWS}")
                say(f"pipeline {name}: watch its runs with {link}")
        with closing(parent):
            yield parent, link


def finish_pipeline(plan: Plan, parent, timings: dict[str, float], link: str | None = None) -> dict:
    """The stages' results (checkpoints, metrics) as their folders record them, and the comparison report."""
    from rich.console import Console

    from aopd_cli.progress import say
    from aopd_cli.stages.lifecycle import finished_result
    from aopd_cli.training import distributed as dist

    results = {name: finished_result(config) for name, config in plan.configs.items()}
    report = comparison_report(plan.experiment, results, timings)
    if dist.is_main():
        Console().print(report, highlight=False, soft_wrap=True, markup=False)
        (plan.root / "comparison.md").write_text(report)
        parent.log_artifact(plan.root / "comparison.md")
        name = " ".join(filter(None, [plan.experiment.name, plan.label]))
        say(f"pipeline {name} done: {plan.root}" + (f", MLflow run {parent.run_id}" if parent.run_id else "")
            + (f"; see the runs with {link}" if link else ""))
    return results


def comparison_report(experiment: Experiment, results: dict, timings: dict[str, float]) -> str:
    """Markdown tables shaped like the paper's Table 1 (Pass@1 / Pass@k, k the largest evaluated: 4 in
    the paper) and Table 2 (continual)."""
    lines = [f"# {experiment.name}: comparison", ""]
    keys = {key for metrics in results.values() if isinstance(metrics, dict) for key in metrics}
    k = names.largest_k(keys) or 4
    if experiment.table1:
        benches = names.math_benchmarks(key for stage in experiment.table1.values() for key in results.get(stage, {}))
        lines += [f"## Table 1: Pass@1 / Pass@{k}", "",
                  "| model | " + " | ".join(benches + ["average"]) + " |", "|---" * (len(benches) + 2) + "|"]
        for label, stage in experiment.table1.items():
            metrics = results.get(stage, {})
            cells = [f"{_num(metrics.get(names.pass_at(b, 1)))} / {_num(metrics.get(names.pass_at(b, k)))}"
                     for b in benches + [names.MATH_AVG]]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines.append("")
    if experiment.table2:
        lines += ["## Table 2: continual learning on tools", "",
                  f"| method | tool success | tool first call | math Pass@{k} before | after | change |",
                  "|---|---|---|---|---|---|"]
        for label, (before_stage, after_stage) in experiment.table2.items():
            before, after = results.get(before_stage, {}), results.get(after_stage, {})
            tool = next(iter(names.tool_benchmarks(after)), None)
            success = after.get(names.tool(tool, "success")) if tool else None
            first_call = after.get(names.tool(tool, "first_call")) if tool else None
            b, a = before.get(names.pass_at(names.MATH_AVG, k)), after.get(names.pass_at(names.MATH_AVG, k))
            lines.append(f"| {label} | {_num(success)} | {_num(first_call)} | {_num(b)} | "
                         f"{_num(a)} | {_num(a - b if a is not None and b is not None else None, sign=True)} |")
        lines.append("")
    lines += ["## Wall time per stage", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {name} | {seconds:.1f} |" for name, seconds in timings.items()]
    return "\n".join(lines) + "\n"


def _num(value, sign: bool = False) -> str:
    if value is None:
        return "-"
    return f"{100 * value:+.2f}" if sign else f"{100 * value:.2f}"
