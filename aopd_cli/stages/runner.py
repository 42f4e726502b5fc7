"""Running one stage: `run_stage(config)` imports the stage's module (warmup, distill, continual, eval:
each has `prepare(config)`, data and models before anything is written, and `run(config, session,
prepared)`, one readable function) and does what all of them need around it: the process group, the
checks before any work, the finished-stage shortcut, and the session (lock, resume, tracked run, signals);
a disk that fills while the stage writes is one line naming the file.

    aopd pipeline experiment=lab_smoke
"""

from __future__ import annotations

import errno
import importlib

from aopd_cli.errors import UserError

STAGE_MODULES = {  # stage -> module with `prepare(config)` and `run(config, session, prepared)`, imported when run
    "warmup": "aopd_cli.stages.warmup",
    "distill": "aopd_cli.stages.distill",
    "continual": "aopd_cli.stages.continual",
    "eval": "aopd_cli.stages.evaluate",
}


def run_stage(config, *, parent_run_id: str | None = None, run_name: str | None = None,
              tags: dict[str, str] | None = None):
    """A checkpoint folder for training stages, metrics for eval."""
    from aopd_cli.progress import say

    objective = getattr(config, "objective", None)
    run_name = run_name or " ".join([config.stage] + ([objective.name] if objective else []))
    say(f"{run_name}: checking inputs, output folder and tracking")
    from aopd_cli.stages.lifecycle import finish, finished_result, stage_session
    from aopd_cli.stages.preflight import preflight
    from aopd_cli.training import distributed

    if config.threads:  # two runs on a 2-core laptop: one thread each, not two fighting over both
        import os

        import torch

        torch.set_num_threads(config.threads)
        os.environ["OMP_NUM_THREADS"] = str(config.threads)  # what a vLLM engine started later reads
    distributed.init(config.dist_timeout_s)
    preflight(config)
    done = finished_result(config) if config.resume == "auto" else None
    if done is not None:
        say(f"{run_name} already finished in {config.output_dir} with this configuration: "
            "nothing to do (resume=never starts afresh)")
        return done
    stage = importlib.import_module(STAGE_MODULES[config.stage])
    say(f"{run_name}: loading data and models")
    prepared = stage.prepare(config)  # a bad row or checkpoint stops here, before any run or folder exists
    try:
        with stage_session(config, run_name=run_name, parent_run_id=parent_run_id, tags=tags) as session:
            result = stage.run(config, session, prepared)
            finish(session, result)
            return result
    except OSError as err:  # a disk that fills while the stage writes its records (checkpoints say so themselves)
        if err.errno != errno.ENOSPC:
            raise
        raise UserError(f"cannot write {err.filename or f'in output_dir={config.output_dir}'}: its disk is full "
                        f"({err.strerror}); make room and rerun the same command") from None
