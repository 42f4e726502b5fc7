"""The `aopd` command line. Nothing heavy is imported at module top, so `aopd --help` stays fast:
each command imports its stage when it runs.

    aopd --help
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Optional

import typer


def _epilog(groups: str, keys: str, *examples: str) -> str:
    """The help's closing part: the groups and main keys a command takes, and examples to copy."""
    lines = [f"Groups: {groups}" if groups else "", f"Main keys: {keys}", "", "Examples:"]
    lines += [f"  {example}" for example in examples]
    lines += ["", "Options of a group: aopd ls GROUP. Every key with its default and range: aopd ls STAGE."]
    return "\n".join(line for i, line in enumerate(lines) if line or i > 1)


app = typer.Typer(
    name="aopd",
    help="Asymmetric On-Policy Distillation and its baselines: warm-up, distillation, continual learning, "
    "evaluation, sweeps. Overrides use Hydra's grammar: key=value (objective=gkd, objective.tau=0.5).",
    epilog="Start here: aopd pipeline (the CPU lab, 8 minutes on 2 idle cores), aopd ls (experiments and recipe "
    "options), aopd show pipeline experiment=NAME (what would run), aopd compare (the results).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

OVERRIDES = typer.Argument(None, help="Hydra-style overrides, e.g. objective=aopd objective.tau=0.5 train.steps=90")
NPROC = typer.Option(1, "--nproc-per-node", min=1,
                     help="run under torchrun with this many processes (GPUs) on this node; FSDP2 shards the model")
EXECUTOR = typer.Option("local", "--executor", help="local: one after another here; ray: each a Ray Job, side by "
                        "side where there is room (pip install 'aopd-cli[cluster]')")
ADDRESS = typer.Option(None, "--address", help="with --executor ray: the cluster (http://HEAD:8265, or auto); "
                       "none: a Ray started on this machine for the command")
STAGE_KEYS = "student.path, data.source, data.limit, train.steps, train.lr, train.batch_size, " \
    "train.micro_batch_size, eval.n, eval.k, seed, output_dir, resume, tracking.experiment"
DISTILL_KEYS = "objective.tau, objective.beta, objective.top_k, teacher.path, rollout.n, " \
    "rollout.max_new_tokens, " + STAGE_KEYS


@contextmanager
def refusals():
    """A refused configuration exits 2, a user error 1, a signal 128 + its number: one line on stderr, no
    traceback (under torchrun, the line names the rank)."""
    import os

    from aopd_cli.errors import ConfigError, Interrupted, UserError

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
    from aopd_cli.training.distributed import launched_by_torchrun, relaunch_under_torchrun

    if nproc > 1 and not launched_by_torchrun():
        relaunch_under_torchrun(nproc, [command, *(overrides or [])])


def _run(stage: str, overrides: list[str] | None, nproc: int = 1) -> None:
    with refusals():
        config = _load(stage, overrides)
        _relaunch(stage, overrides, nproc)
        from aopd_cli.stages.runner import run_stage
        from aopd_cli.training import distributed

        with distributed.group_closed_after():
            run_stage(config)


@app.command(epilog=_epilog(
    "student (lab_student, qwen3_4b_base, ...), data (lab_math, openthoughts, ...), eval (lab, paper, ...)",
    "tool_data.source, reuse_cached, train.max_seq_len, train.activation_checkpointing, " + STAGE_KEYS,
    "aopd warmup train.steps=200",
    "aopd warmup student=qwen3_4b_base data=openthoughts train.lr=1e-5 --nproc-per-node 8"))
def warmup(overrides: Optional[list[str]] = OVERRIDES, nproc_per_node: int = NPROC) -> None:
    """SFT a base student on reasoning traces (OpenThoughts format)."""
    _run("warmup", overrides, nproc_per_node)


@app.command(epilog=_epilog(
    "student, teacher, data, objective (aopd, opd, gkd, seqkd, exopd), rollout (hf, vllm), eval",
    DISTILL_KEYS,
    "aopd distill objective=aopd objective.tau=0.2 train.steps=50",
    "aopd distill objective=gkd objective.beta=0.5 data.source=./prompts.jsonl --nproc-per-node 2"))
def distill(overrides: Optional[list[str]] = OVERRIDES, nproc_per_node: int = NPROC) -> None:
    """On-policy distillation from a teacher: objective=aopd|opd|gkd|seqkd|exopd."""
    _run("distill", overrides, nproc_per_node)


@app.command(epilog=_epilog(
    "student, teacher, data (lab_tools, toolalpaca), objective, rollout, eval (lab, paper_tools)",
    DISTILL_KEYS,
    "aopd continual objective=aopd student.path=outputs/lab/aopd/checkpoint",
    "aopd continual objective=opd data=toolalpaca eval=paper_tools"))
def continual(overrides: Optional[list[str]] = OVERRIDES, nproc_per_node: int = NPROC) -> None:
    """Keep distilling on tool-use data (ToolAlpaca) and measure the math ability kept."""
    _run("continual", overrides, nproc_per_node)


@app.command("eval", epilog=_epilog(
    "student, rollout (hf, vllm), eval (lab, paper, paper_tools)",
    "student.path, eval.benchmarks, eval.tool_benchmarks, eval.n, eval.k, eval.max_new_tokens, eval.limit, "
    "eval.temperature, seed, output_dir",
    "aopd eval student.path=outputs/lab/aopd/checkpoint eval.n=8",
    "aopd eval student.path=Qwen/Qwen3-8B eval=paper rollout=vllm"))
def evaluate(overrides: Optional[list[str]] = OVERRIDES, nproc_per_node: int = NPROC) -> None:
    """Pass@k on AIME24/AIME25/HMMT25 (or the lab), success rate on ToolAlpaca; split over the processes."""
    _run("eval", overrides, nproc_per_node)


@app.command(epilog=_epilog(
    "experiment (aopd ls experiments), and every group of its stages",
    "experiment=NAME, output_dir=DIR (root of the stage folders), STAGE.key=value (one stage), "
    "key=value (every stage that has the key)",
    "aopd pipeline experiment=lab_smoke",
    "aopd pipeline experiment=paper_8b_3k --nproc-per-node 8",
    "aopd pipeline --executor ray threads=1   # independent stages side by side"))
def pipeline(overrides: Optional[list[str]] = OVERRIDES, nproc_per_node: int = NPROC, executor: str = EXECUTOR,
             address: Optional[str] = ADDRESS) -> None:
    """Run an experiment's stages (experiment=NAME; default: the CPU lab), in order or as Ray Jobs.

    An override `key=value` goes to every stage that has the key; `STAGE.key=value` to one stage.
    Rerunning the same command skips the stages that finished and resumes the interrupted one."""
    from aopd_cli.experiment.executors import check_executor
    from aopd_cli.experiment.pipeline import plan_pipeline, run_pipeline
    from aopd_cli.training import distributed

    with refusals():
        executor = check_executor(executor)
        plan = plan_pipeline(list(overrides or []))
        if executor == "local":  # on Ray each stage's job starts its own torchrun
            _relaunch("pipeline", overrides, nproc_per_node)
        with distributed.group_closed_after():
            run_pipeline(plan, executor=executor, address=address, nproc=nproc_per_node)


@app.command(epilog=_epilog(
    "those of STAGE (or of the experiment's stages)",
    "--param KEY=VALUES (tau, beta, top_k, intervention, zero_eps, lam, lmbda mean objective.KEY; "
    "any dotted key), --seeds N, then STAGE's own overrides",
    "aopd sweep distill --param tau=-1,0,1 --param beta=0.5,1 --seeds 3",
    "aopd sweep pipeline experiment=ablation_tau --seeds 3",
    "aopd sweep distill --param tau=-1,0 --executor ray --address auto --nproc-per-node 8 output_dir=/shared/x"))
def sweep(
    stage: str = typer.Argument(..., help="warmup, distill, continual, eval or pipeline"),
    param: list[str] = typer.Option([], "--param", help="KEY=VALUES, e.g. tau=-1,0,1 or objective.beta=range(0,1,0.5)"),
    seeds: int = typer.Option(1, "--seeds", min=1, help="seeds per grid point (seed=0..N-1)"),
    overrides: Optional[list[str]] = OVERRIDES,
    executor: str = EXECUTOR,
    address: Optional[str] = ADDRESS,
    nproc_per_node: int = typer.Option(1, "--nproc-per-node", min=1, help="with --executor ray: each child under "
                                       "torchrun with this many processes (GPUs)"),
) -> None:
    """Run a grid of configurations (times seeds), one MLflow child run each; re-running resumes."""
    from aopd_cli.experiment.executors import check_executor
    from aopd_cli.experiment.sweep import plan_sweep, run_sweep

    with refusals():
        executor = check_executor(executor)
        run_sweep(plan_sweep(stage, list(param), seeds, list(overrides or [])), executor=executor, address=address,
                  nproc=nproc_per_node)


@app.command("job", hidden=True)
def job(spec: str = typer.Argument(..., help="a job's spec, as --executor ray writes it")) -> None:
    """One stage of a pipeline or sweep, as its driver planned it (what a Ray Job runs)."""
    from aopd_cli.experiment.job_spec import run_spec
    from aopd_cli.training import distributed

    with refusals():
        with distributed.group_closed_after():
            run_spec(spec)


jobs_app = typer.Typer(help="Jobs of a sweep or pipeline run with --executor ray: status, logs, cancel.",
                       no_args_is_help=True)
app.add_typer(jobs_app, name="jobs")
GROUP = typer.Argument(..., help="a sweep's id (outputs/sweeps/ID), or a pipeline's output folder")
CHILD = typer.Argument(None, help="one child: a sweep child's id, a pipeline stage's name, or a job id")


@jobs_app.command("status")
def jobs_status(group: str = GROUP, child: Optional[str] = CHILD) -> None:
    """Each job's state: pending, running, finished, failed, cancelled (or not submitted)."""
    from aopd_cli.experiment.watch import jobs_status as status

    with refusals():
        typer.echo(status(group, child))


@jobs_app.command("logs")
def jobs_logs(group: str = GROUP, child: str = typer.Argument(..., help="the child or job whose log to print"),
              follow: bool = typer.Option(False, "--follow", "-f", help="keep printing as the job writes")) -> None:
    """A job's output (its newest attempt)."""
    from aopd_cli.experiment.watch import jobs_logs as logs

    with refusals():
        logs(group, child, follow)


@jobs_app.command("cancel")
def jobs_cancel(group: str = GROUP, child: Optional[str] = CHILD) -> None:
    """Stop one child's jobs, or every job of the group: each stage checkpoints and ends its run KILLED; rerun
    the sweep or pipeline to resume them."""
    from aopd_cli.experiment.watch import jobs_cancel as cancel

    with refusals():
        cancel(group, child)


@app.command(epilog=_epilog(
    "", "--parent RUN (a sweep's or pipeline's runs), --all (every run of the experiment), --metric KEY "
    "(the terminal table's columns; CSV and Markdown have every final metric). Runs are grouped by their "
    "whole config less the seed and the output folders; by default only the latest sweep or pipeline counts",
    "aopd compare",
    "aopd compare --all --metric eval/math_avg/pass_at_1 --out outputs/all"))
def compare(
    experiment: str = typer.Option("aopd", "--experiment", help="MLflow experiment name"),
    parent: Optional[str] = typer.Option(None, "--parent", help="only the runs under this parent run"),
    metric: list[str] = typer.Option([], "--metric", help="columns of the terminal table (default: math Pass@1, "
                                     "Pass@k, tool success, math change through continual learning)"),
    out: str = typer.Option("outputs/compare", "--out", help="where CSV, Markdown and PNG plots go"),
    tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri", help="MLflow store (default: ./mlflow.db)"),
    every: bool = typer.Option(False, "--all", help="every finished run of the experiment (default: the runs "
                               "of the latest sweep or pipeline)"),
) -> None:
    """Table and plots across runs (MLflow is the store): mean ± std over the seeds of each configuration."""
    from aopd_cli.results.compare import run_compare

    with refusals():
        run_compare(experiment=experiment, parent=parent, metrics=list(metric), out_dir=out, tracking_uri=tracking_uri,
                    every=every)


@app.command()
def report(
    parent: Optional[str] = typer.Option(None, "--parent",
                                         help="the lab_full sweep's parent run (default: the newest)"),
    ablation: list[str] = typer.Option([], "--ablation", help="NAME=RUN_ID of an ablation sweep (default: the newest)"),
    out: str = typer.Option("docs/lab.md", "--out", help="the report; its PNGs go in a folder of the same name"),
    experiment: str = typer.Option("aopd", "--experiment", help="MLflow experiment name"),
    tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri", help="MLflow store (default: ./mlflow.db)"),
) -> None:
    """The lab report (tables, figures, verdicts on the paper's claims) from a lab_full sweep's runs."""
    from aopd_cli.results.report import write_report

    with refusals():
        parents = dict(a.partition("=")[::2] for a in ablation)
        path = write_report(tracking_uri=tracking_uri, experiment=experiment, parent=parent, ablation_parents=parents,
                            out=out)
        typer.echo(f"wrote {path}")


@app.command(epilog=_epilog(
    "those of STAGE (aopd ls STAGE), or an experiment's (aopd ls experiments)",
    "the stage's own overrides; for a pipeline, experiment=NAME and STAGE.key=value. Local inputs are "
    "checked first: a missing data file, benchmark file or checkpoint exits 2, unless an earlier stage of "
    "the same pipeline writes it",
    "aopd show distill objective=gkd objective.beta=0.5",
    "aopd show pipeline experiment=paper_8b_3k --full"))
def show(
    stage: str = typer.Argument(..., help="warmup, distill, continual, eval, or pipeline"),
    overrides: Optional[list[str]] = OVERRIDES,
    full: bool = typer.Option(False, "--full", help="every key as YAML (default: a summary)"),
) -> None:
    """The resolved, validated config: a summary (per stage for a pipeline), --full for the YAML."""
    with refusals():
        if stage == "pipeline":
            from aopd_cli.config.summary import show_pipeline
            from aopd_cli.experiment.pipeline import plan_pipeline

            sys.stdout.write(show_pipeline(plan_pipeline(list(overrides or [])), full))
            return
        from aopd_cli.config.summary import show_stage

        sys.stdout.write(show_stage(_load(stage, overrides), stage, full))


@app.command("ls", epilog=_epilog(
    "", "GROUP: student, teacher, data, objective, rollout, eval; a stage (warmup, distill, continual, eval); "
    "experiments",
    "aopd ls",
    "aopd ls objective"))
def list_options(group: Optional[str] = typer.Argument(None, help="a recipe group, a stage, or experiments")) -> None:
    """Experiments and recipe options; with GROUP, each option's keys, values, types and ranges."""
    from aopd_cli.config.catalog import list_all, list_group

    with refusals():
        sys.stdout.write(list_group(group) if group else list_all())


@app.command()
def plan(
    overrides: Optional[list[str]] = OVERRIDES,
    gpus: int = typer.Option(8, "--gpus", min=1, help="GPUs the stages run on (the FSDP2 world size)"),
    gpu_memory: Optional[float] = typer.Option(None, "--gpu-memory", min=1.0, help="memory of one GPU, GiB "
                                               "(default: 80, said so)"),
    arithmetic: bool = typer.Option(False, "--arithmetic", help="the arithmetic alone, in seconds (no trace)"),
    detail: bool = typer.Option(False, "--detail", help="every phase and the terms of the estimate"),
) -> None:
    """Peak memory per GPU of each stage of an experiment, traced on aopd's code with fake tensors and by
    arithmetic: does it fit, and what to change."""
    from aopd_cli.experiment.pipeline import plan_pipeline
    from aopd_cli.plan.planner import plan_experiment, render

    with refusals():
        memory = gpu_memory if gpu_memory is not None else 80.0
        stages = plan_experiment(plan_pipeline(list(overrides or [])), gpus, memory, trace=not arithmetic)
        sys.stdout.write(render(stages, gpus, memory, assumed=gpu_memory is None, detail=detail))


teacher_app = typer.Typer(help="The teacher as a service: aopd teacher serve.", no_args_is_help=True)
app.add_typer(teacher_app, name="teacher")


@teacher_app.command("serve", epilog=_epilog(
    "teacher (lab, qwen3_8b, qwen3_32b)", "teacher.path, teacher.dtype, teacher.max_model_len, "
    "teacher.gpu_memory_utilization (GPUs), teacher.kv_cache_gib (CPU)",
    "aopd teacher serve teacher=qwen3_32b --tensor-parallel-size 4 --port 8100",
    "aopd distill teacher.engine=server teacher.url=http://127.0.0.1:8100 ..."))
def teacher_serve(
    overrides: Optional[list[str]] = OVERRIDES,
    host: str = typer.Option("127.0.0.1", "--host", help="address to bind (127.0.0.1: this machine only)"),
    port: int = typer.Option(8100, "--port", min=0, max=65535, help="port to listen on (0: any free one)"),
    max_logprobs: int = typer.Option(32, "--max-logprobs", min=1, help="the most top-K log-probs a position (K)"),
    tensor_parallel_size: int = typer.Option(1, "--tensor-parallel-size", min=1, help="GPUs the teacher spans"),
) -> None:
    """Serve a teacher's top-K log-probs to trainers (teacher.engine=server teacher.url=...): vLLM's engine,
    packed arrays over HTTP, requests that arrive together scored together."""
    from aopd_cli.teacher.service import serve

    with refusals():
        teacher = _load("distill", overrides).teacher
        if teacher.path is None:
            from aopd_cli.errors import ConfigError

            raise ConfigError("teacher.path: a checkpoint folder or hub id to serve (a fresh lab model has no weights)")
        serve(teacher, host=host, port=port, max_logprobs=max_logprobs, tensor_parallel_size=tensor_parallel_size)


@app.command()
def sync(
    output_dir: str = typer.Argument(..., help="a stage's output folder holding tracking_backlog.jsonl"),
    tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri", help="MLflow store (default: the run's)"),
) -> None:
    """Send what a run could not send to MLflow while the tracking store was away."""
    from pathlib import Path

    from aopd_cli.stages.lifecycle import RUN_FILE, read_record
    from aopd_cli.tracking.store import sync as send

    with refusals():
        uri = tracking_uri or (read_record(Path(output_dir) / RUN_FILE) or {}).get("tracking_uri")
        print(f"aopd: sent {send(Path(output_dir), uri)} queued record(s) from {output_dir}")


if __name__ == "__main__":
    app()
