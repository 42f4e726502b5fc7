"""The `aopd` command line. Nothing heavy is imported at module top, so `aopd --help` stays fast:
each command imports its stage when it runs.

    aopd --help
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Optional

import typer

app = typer.Typer(
    name="aopd",
    help="Asymmetric On-Policy Distillation and its baselines: warm-up, distillation, continual learning, "
    "evaluation, sweeps. Overrides use Hydra's grammar: key=value (objective=gkd, objective.tau=0.5).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

OVERRIDES = typer.Argument(None, help="Hydra-style overrides, e.g. objective=aopd objective.tau=0.5 train.steps=90")
NPROC = typer.Option(1, "--nproc-per-node", min=1,
                     help="run under torchrun with this many processes (GPUs) on this node; FSDP2 shards the model")


@contextmanager
def refusals():
    """A refused configuration exits 2, a user error 1, a signal 128 + its number: one line on stderr, no
    traceback (under torchrun, the line names the rank)."""
    import os

    from aopd_cli.errors import ConfigError, UserError
    from aopd_cli.interrupts import Interrupted

    try:
        yield
    except (ConfigError, UserError, Interrupted) as err:
        from rich.console import Console
        from rich.markup import escape

        where = f"rank {os.environ['RANK']}: " if int(os.environ.get("WORLD_SIZE", 1)) > 1 else ""
        Console(stderr=True, soft_wrap=True).print(f"[bold red]aopd:[/] {where}{escape(str(err))}", highlight=False)
        code = err.exit_code if isinstance(err, Interrupted) else 2 if isinstance(err, ConfigError) else 1
        raise typer.Exit(code) from None


def _load(stage: str, overrides: list[str] | None):
    from aopd_cli.config.compose import load_stage_config

    return load_stage_config(stage, list(overrides or []))


def _relaunch(command: str, overrides: list[str] | None, nproc: int) -> None:
    """Start the same command under torchrun (once the config was checked here)."""
    from aopd_cli.distributed import launched_by_torchrun, relaunch_under_torchrun

    if nproc > 1 and not launched_by_torchrun():
        relaunch_under_torchrun(nproc, [command, *(overrides or [])])


def _run(stage: str, overrides: list[str] | None, nproc: int = 1) -> None:
    with refusals():
        config = _load(stage, overrides)
        _relaunch(stage, overrides, nproc)
        from aopd_cli import distributed
        from aopd_cli.stages import run_stage

        try:
            run_stage(config)
        finally:
            distributed.shutdown()


@app.command()
def warmup(overrides: Optional[list[str]] = OVERRIDES, nproc_per_node: int = NPROC) -> None:
    """SFT a base student on reasoning traces (OpenThoughts format)."""
    _run("warmup", overrides, nproc_per_node)


@app.command()
def distill(overrides: Optional[list[str]] = OVERRIDES, nproc_per_node: int = NPROC) -> None:
    """On-policy distillation from a teacher: objective=aopd|opd|gkd|seqkd|exopd."""
    _run("distill", overrides, nproc_per_node)


@app.command()
def continual(overrides: Optional[list[str]] = OVERRIDES, nproc_per_node: int = NPROC) -> None:
    """Keep distilling on tool-use data (ToolAlpaca) and measure the math ability kept."""
    _run("continual", overrides, nproc_per_node)


@app.command("eval")
def evaluate(overrides: Optional[list[str]] = OVERRIDES) -> None:
    """Pass@k on AIME24/AIME25/HMMT25 (or the lab), success rate on ToolAlpaca."""
    _run("eval", overrides)


@app.command()
def pipeline(overrides: Optional[list[str]] = OVERRIDES, nproc_per_node: int = NPROC) -> None:
    """Run an experiment's stages in order (experiment=NAME; default: the CPU lab).

    An override `key=value` goes to every stage that has the key; `STAGE.key=value` to one stage.
    Rerunning the same command skips the stages that finished and resumes the interrupted one."""
    from aopd_cli import distributed
    from aopd_cli.pipeline import plan_pipeline, run_pipeline

    with refusals():
        plan = plan_pipeline(list(overrides or []))
        _relaunch("pipeline", overrides, nproc_per_node)
        try:
            run_pipeline(plan)
        finally:
            distributed.shutdown()


@app.command()
def sweep(
    stage: str = typer.Argument(..., help="warmup, distill, continual, eval or pipeline"),
    param: list[str] = typer.Option([], "--param", help="KEY=VALUES, e.g. tau=-1,0,1 or objective.beta=range(0,1,0.5)"),
    seeds: int = typer.Option(1, "--seeds", min=1, help="seeds per grid point (seed=0..N-1)"),
    overrides: Optional[list[str]] = OVERRIDES,
) -> None:
    """Run a grid of configurations (times seeds), one MLflow child run each; re-running resumes."""
    from aopd_cli.sweep import plan_sweep, run_sweep

    with refusals():
        run_sweep(plan_sweep(stage, list(param), seeds, list(overrides or [])))


@app.command()
def compare(
    experiment: str = typer.Option("aopd", "--experiment", help="MLflow experiment name"),
    parent: Optional[str] = typer.Option(None, "--parent", help="only the children of this parent run"),
    metric: list[str] = typer.Option([], "--metric", help="metrics for the table (default: eval pass@k)"),
    out: str = typer.Option("outputs/compare", "--out", help="where CSV, Markdown and PNG plots go"),
    tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri", help="MLflow store (default: ./mlflow.db)"),
) -> None:
    """Table and plots across runs (MLflow is the store)."""
    from aopd_cli.compare import run_compare

    with refusals():
        run_compare(experiment=experiment, parent=parent, metrics=list(metric), out_dir=out, tracking_uri=tracking_uri)


@app.command()
def show(
    stage: str = typer.Argument(..., help="warmup, distill, continual, eval, or pipeline"),
    overrides: Optional[list[str]] = OVERRIDES,
) -> None:
    """Print the resolved, validated config as YAML."""
    with refusals():
        if stage == "pipeline":
            from aopd_cli.pipeline import plan_pipeline, plan_yaml

            sys.stdout.write(plan_yaml(plan_pipeline(list(overrides or []))))
            return
        from aopd_cli.config.compose import to_yaml

        sys.stdout.write(to_yaml(_load(stage, overrides)))


@app.command()
def plan(
    overrides: Optional[list[str]] = OVERRIDES,
    gpus: int = typer.Option(8, "--gpus", min=1, help="GPUs the stages run on (the FSDP2 world size)"),
    gpu_memory: float = typer.Option(80.0, "--gpu-memory", min=1.0, help="memory of one GPU, GiB"),
) -> None:
    """Estimated peak memory per GPU of each stage of an experiment: does it fit, and what to change."""
    from aopd_cli.pipeline import plan_pipeline
    from aopd_cli.plan import plan_experiment, render

    with refusals():
        stages = plan_experiment(plan_pipeline(list(overrides or [])), gpus, gpu_memory)
        sys.stdout.write(render(stages, gpus, gpu_memory))


@app.command()
def sync(
    output_dir: str = typer.Argument(..., help="a stage's output folder holding tracking_backlog.jsonl"),
    tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri", help="MLflow store (default: the run's)"),
) -> None:
    """Send what a run could not send to MLflow while the tracking store was away."""
    import json
    from pathlib import Path

    from aopd_cli.tracking import sync as send

    with refusals():
        record = Path(output_dir) / "aopd_run.json"
        uri = tracking_uri or (json.loads(record.read_text()).get("tracking_uri") if record.is_file() else None)
        print(f"aopd: sent {send(Path(output_dir), uri)} queued record(s) from {output_dir}")


if __name__ == "__main__":
    app()
