"""Where a pipeline's stages and a sweep's children run (`--executor`): `local`, one after another in this
process (the default), or `ray`, each a Ray Job (experiment/ray_jobs.py, imported only when chosen) that
starts as soon as the jobs it reads from are done, side by side where the cluster has room.

A `Job` is one stage run: its validated config, the MLflow parent, name and tags its run gets, the jobs it
waits for, and the processes it takes (`nproc`: torchrun ranks). For Ray it is written as a spec file that
`aopd job SPEC` reads back in the child (experiment/job_spec.py).

    aopd pipeline experiment=lab_smoke --executor ray threads=1
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal

from aopd_cli.config.suggest import did_you_mean
from aopd_cli.errors import ConfigError

Executor = Literal["local", "ray"]
EXECUTORS = ("local", "ray")


@dataclass
class Job:
    job_id: str  # unique in its group, stable across reruns ("a1b2c3d4e5", "a1b2c3d4e5-teacher")
    label: str  # for progress lines ("tau=0 seed=1", "teacher")
    config: object  # a validated stage config
    parent_run_id: str | None
    run_name: str
    tags: dict[str, str]
    after: list[str] = field(default_factory=list)  # job ids that must have finished first
    nproc: int = 1  # processes (GPUs) under torchrun; 1: a plain process
    child: str = ""  # the sweep child it belongs to (`aopd jobs ... CHILD`); the job itself if empty


def check_executor(name: str) -> Executor:
    if name not in EXECUTORS:
        raise ConfigError(f"--executor {name}: expected one of {', '.join(EXECUTORS)}{did_you_mean(name, EXECUTORS)}")
    return name  # type: ignore[return-value]


@dataclass
class Runner:
    """An executor, ready: `check(jobs)` refuses in one line, before any run or folder exists, jobs it cannot
    run; `run(jobs, group=, root=, done=)` runs them, each once those it waits for are done, and returns the
    seconds each took (jobs finished before are skipped). `group` names the jobs together (a sweep's id, a
    pipeline's), `root` is where their specs and records go, `done(job, seconds)` is called as each finishes.
    A job that fails raises UserError naming it: at once (local), or once the others are done (Ray)."""

    check: Callable[[list[Job]], None]
    run: Callable[..., dict[str, float]]


@contextmanager
def runner(executor: Executor, address: str | None = None):
    """The executor for the block: this process, or a Ray cluster (`address`; none: one started here)."""
    if executor == "ray":
        from aopd_cli.experiment.ray_jobs import ray_runner

        with ray_runner(address) as (check, run):
            yield Runner(check, run)
        return
    if address:
        raise ConfigError(f"--address {address} is for --executor ray: add it, or leave --address out")
    yield Runner(lambda jobs: None, run_here)


def run_here(jobs: list[Job], *, group: str = "", root: Path | None = None, done=lambda job, seconds: None
             ) -> dict[str, float]:
    """The local executor: each job in this process, in order."""
    from rich.console import Console

    from aopd_cli.stages.runner import run_stage
    from aopd_cli.training.distributed import is_main

    timings = {}
    for job in ordered(jobs):
        if is_main():
            Console().rule(f"[bold]{job.label}")
        started = time.perf_counter()
        run_stage(job.config, parent_run_id=job.parent_run_id, run_name=job.run_name, tags=job.tags)
        timings[job.job_id] = time.perf_counter() - started
        done(job, timings[job.job_id])
    return timings


def ordered(jobs: list[Job]) -> list[Job]:
    """The jobs in an order where each comes after those it waits for (the given order where it can)."""
    done, order, pending = set(), [], list(jobs)
    while pending:
        ready = [job for job in pending if all(a in done for a in job.after)]
        if not ready:
            raise ConfigError(f"jobs wait for each other in a circle: {', '.join(j.job_id for j in pending)}")
        order.append(ready[0])
        done.add(ready[0].job_id)
        pending.remove(ready[0])
    return order
