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


@contextmanager
def refusals():
    """A refused configuration exits 2, a user error 1: one line on stderr, no traceback."""
    from aopd_cli.errors import ConfigError, UserError

    try:
        yield
    except (ConfigError, UserError) as err:
        from rich.console import Console
        from rich.markup import escape

        Console(stderr=True, soft_wrap=True).print(f"[bold red]aopd:[/] {escape(str(err))}", highlight=False)
        raise typer.Exit(2 if isinstance(err, ConfigError) else 1) from None


def _load(stage: str, overrides: list[str] | None):
    from aopd_cli.config.compose import load_stage_config

    return load_stage_config(stage, list(overrides or []))


def _run(stage: str, overrides: list[str] | None) -> None:
    with refusals():
        config = _load(stage, overrides)
        from aopd_cli.stages import run_stage

        run_stage(config)


@app.command()
def warmup(overrides: Optional[list[str]] = OVERRIDES) -> None:
    """SFT a base student on reasoning traces (OpenThoughts format)."""
    _run("warmup", overrides)


@app.command()
def distill(overrides: Optional[list[str]] = OVERRIDES) -> None:
    """On-policy distillation from a teacher: objective=aopd|opd|gkd|seqkd|exopd."""
    _run("distill", overrides)


@app.command()
def continual(overrides: Optional[list[str]] = OVERRIDES) -> None:
    """Keep distilling on tool-use data (ToolAlpaca) and measure the math ability kept."""
    _run("continual", overrides)


@app.command("eval")
def evaluate(overrides: Optional[list[str]] = OVERRIDES) -> None:
    """Pass@k on AIME24/AIME25/HMMT25 (or the lab), success rate on ToolAlpaca."""
    _run("eval", overrides)


@app.command()
def pipeline(overrides: Optional[list[str]] = OVERRIDES) -> None:
    """Run an experiment's stages in order (experiment=NAME; default: the CPU lab).

    An override `key=value` goes to every stage that has the key; `STAGE.key=value` to one stage."""
    from aopd_cli.pipeline import plan_pipeline, run_pipeline

    with refusals():
        run_pipeline(plan_pipeline(list(overrides or [])))


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
def report(
    parent: Optional[str] = typer.Option(None, "--parent", help="the lab_full sweep's parent run (default: the newest)"),
    ablation: list[str] = typer.Option([], "--ablation", help="NAME=RUN_ID of an ablation sweep (default: the newest)"),
    out: str = typer.Option("docs/lab.md", "--out", help="the report; its PNGs go in a folder of the same name"),
    experiment: str = typer.Option("aopd", "--experiment", help="MLflow experiment name"),
    tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri", help="MLflow store (default: ./mlflow.db)"),
) -> None:
    """The lab report (tables, figures, verdicts on the paper's claims) from a lab_full sweep's runs."""
    from aopd_cli.report import write_report

    with refusals():
        parents = dict(a.partition("=")[::2] for a in ablation)
        path = write_report(tracking_uri=tracking_uri, experiment=experiment, parent=parent, ablation_parents=parents,
                            out=out)
        typer.echo(f"wrote {path}")


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


if __name__ == "__main__":
    app()
