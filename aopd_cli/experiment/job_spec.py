"""A job as a file, for a process of its own (a Ray Job): `write_spec` writes the stage's config as validated
by the driver, its run's MLflow parent, name and tags; `aopd job SPEC` (`run_spec`) runs that very stage,
its config validated again from the file, never composed again from recipes that may have changed since.

    aopd job outputs/lab/.jobs/teacher.json
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from aopd_cli.errors import ConfigError


def write_spec(job, folder: Path) -> Path:
    """`job` (an `executors.Job`) as `aopd job` reads it: the stage, its config as validated, its run's parent,
    name and tags."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{job.job_id}.json"
    spec = {"stage": job.config.stage, "config": job.config.model_dump(mode="json"),
            "parent_run_id": job.parent_run_id, "run_name": job.run_name, "tags": job.tags}
    path.write_text(json.dumps(spec, indent=1))
    return path


def run_spec(path: str) -> None:
    """`aopd job SPEC`: the stage a driver planned, in this process (under torchrun: in each rank). It needs no
    Ray: the address and token Ray gives a job's command are dropped, so nothing in it (vLLM) joins Ray."""
    from aopd_cli.config.compose import validate
    from aopd_cli.stages.runner import run_stage

    for name in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        os.environ.pop(name, None)
    try:
        spec = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"aopd job {path}: cannot read the job's spec ({err})") from None
    config = validate(spec["stage"], spec["config"])
    run_stage(config, parent_run_id=spec["parent_run_id"], run_name=spec["run_name"], tags=spec["tags"])
