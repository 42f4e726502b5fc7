"""What every training stage shares: opening the tracked run, and the step loop (batch, update, log,
evaluate, save) with its progress bar. Stages differ only in how they make a step's batch and its loss.

    python -m pytest tests/test_stages.py -q
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from aopd_cli import metrics as names
from aopd_cli.engine import CONFIG_FILE, MicroBatch, Policy, make_optimizer, save_checkpoint, update
from aopd_cli.rollout import RolloutBatch


@dataclass
class StepBatch:
    micro_batches: list[MicroBatch]
    normalizer: int  # of the whole step's batch (method.md's reduction, see objectives.global_normalizer)
    metrics: dict[str, float] = field(default_factory=dict)  # timings, response length


def open_run(config, *, run_name: str | None, parent_run_id: str | None, tags: dict[str, str] | None = None):
    """The stage's tracked run: flattened config as params, tags, the resolved config as an artifact."""
    from aopd_cli.config.compose import flatten, to_yaml
    from aopd_cli.tracking import start_run

    all_tags = {**(tags or {}), "stage": config.stage, "seed": str(config.seed)}
    objective = getattr(config, "objective", None)
    if objective is not None:
        all_tags["objective"] = objective.name
    tracker = start_run(config.tracking, run_name=run_name or config.stage, tags=all_tags,
                        parent_run_id=parent_run_id)
    tracker.log_params(flatten(config.model_dump(mode="json")))
    out_dir = Path(config.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / CONFIG_FILE).write_text(to_yaml(config))
    tracker.log_artifact(out_dir / CONFIG_FILE)
    return tracker


def tracked_run(config, *, run_name: str | None, parent_run_id: str | None, tags: dict[str, str] | None = None):
    """`open_run`, closed as FINISHED, KILLED (Ctrl-C) or FAILED however the stage ends."""
    from aopd_cli.tracking import closing

    return closing(open_run(config, run_name=run_name, parent_run_id=parent_run_id, tags=tags))


def micro_batches(ids_BL, attn_BL, first_target: int, mask_BT, size: int) -> list[MicroBatch]:
    """Consecutive rows cut into micro-batches of `size` sequences."""
    return [MicroBatch(ids_BL[s:s + size], attn_BL[s:s + size], first_target, mask_BT[s:s + size])
            for s in range(0, ids_BL.shape[0], size)]


def rollout_micro_batches(batch: RolloutBatch, micro_batch_size: int) -> list[MicroBatch]:
    """Prompt + response sequences cut into micro-batches; targets are the response tokens."""
    ids_BL = torch.cat([batch.prompt_ids_BP, batch.response_ids_BR], dim=1)
    attn_BL = torch.cat([batch.prompt_mask_BP.long(), batch.response_mask_BR.long()], dim=1)
    return micro_batches(ids_BL, attn_BL, batch.prompt_ids_BP.shape[1], batch.response_mask_BR, micro_batch_size)


def progress_bar():
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("loss {task.fields[loss]:.4f}"), TextColumn("eta"), TimeRemainingColumn())


def train_loop(config, policy: Policy, tracker, *, make_step: Callable[[int], StepBatch],
               loss_fn: Callable, after_update: Callable[[], None] = lambda: None,
               evaluate: Callable[[int], dict[str, float]] | None = None, label: str = "train") -> Path:
    """Run `config.train.steps` optimizer steps and return the final checkpoint's folder."""
    from aopd_cli.config.compose import to_yaml

    train, out_dir = config.train, Path(config.output_dir)
    optimizer, scheduler = make_optimizer(policy.model, train)
    with progress_bar() as progress:
        task = progress.add_task(label, total=train.steps, loss=float("nan"))
        for step in range(train.steps):
            started = time.perf_counter()
            batch = make_step(step)
            lr = scheduler.get_last_lr()[0]
            timings: dict[str, float] = {}
            with names.timed("update", timings):
                loss, grad_norm, objective_metrics = update(policy, optimizer, scheduler, batch.micro_batches,
                                                            loss_fn, batch.normalizer, train.grad_clip)
                after_update()
            tokens = sum(int(m.mask_BT.sum()) for m in batch.micro_batches)
            metrics = {names.train("loss"): loss, names.train("grad_norm"): grad_norm, names.train("lr"): lr,
                       names.train("tokens_per_s"): tokens / max(time.perf_counter() - started, 1e-9), **timings,
                       **{names.train(k): v for k, v in objective_metrics.items()}, **batch.metrics}
            if (step + 1) % train.log_every == 0 or step + 1 == train.steps:
                tracker.log_metrics(metrics, step=step + 1)
            if evaluate is not None and train.eval_every and (step + 1) % train.eval_every == 0 \
                    and step + 1 < train.steps:
                tracker.log_metrics(evaluate(step + 1), step=step + 1)
            if train.save_every and (step + 1) % train.save_every == 0 and step + 1 < train.steps:
                save_checkpoint(policy, out_dir / f"step_{step + 1}", config_yaml=to_yaml(config),
                                optimizer=optimizer, scheduler=scheduler, step=step + 1)
            progress.update(task, advance=1, loss=loss)
    return save_checkpoint(policy, out_dir / "checkpoint", config_yaml=to_yaml(config), optimizer=optimizer,
                           scheduler=scheduler, step=train.steps)


def sample_indices(rng, population: int, count: int) -> list[int]:
    """`count` distinct indices when the data allows it, else with replacement."""
    if count <= population:
        return rng.sample(range(population), count)
    return [rng.randrange(population) for _ in range(count)]
