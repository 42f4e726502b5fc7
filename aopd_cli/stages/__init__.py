"""The stages, one readable function each: warmup, distill, continual, eval.

    aopd pipeline experiment=lab_smoke
"""

from __future__ import annotations


def run_stage(config, *, parent_run_id: str | None = None, run_name: str | None = None,
                tags: dict[str, str] | None = None):
    """Dispatch on `config.stage`: a checkpoint folder for training stages, metrics for eval."""
    if config.stage == "warmup":
        from aopd_cli.stages.warmup import run_warmup

        return run_warmup(config, parent_run_id=parent_run_id, run_name=run_name, tags=tags)
    if config.stage == "distill":
        from aopd_cli.stages.distill import run_distill

        return run_distill(config, parent_run_id=parent_run_id, run_name=run_name, tags=tags)
    if config.stage == "continual":
        from aopd_cli.stages.continual import run_continual

        return run_continual(config, parent_run_id=parent_run_id, run_name=run_name, tags=tags)
    from aopd_cli.stages.evaluate import run_eval

    return run_eval(config, parent_run_id=parent_run_id, run_name=run_name, tags=tags)
