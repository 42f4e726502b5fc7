"""The step loop every training stage runs (`train_loop`): batch, update (a non-finite loss or gradient
skips the step), sync, log, evaluate, save, with progress on rank 0; a signal stops it at a step's end
with a checkpoint to resume from. Stages differ only in how they make a step's batch (`make_step`) and its
loss (`loss_fn`).

    python -m pytest tests/test_resume.py -q
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

import torch

from aopd_cli import metrics as names
from aopd_cli.errors import Interrupted, UserError
from aopd_cli.progress import progress, say
from aopd_cli.training import distributed as dist
from aopd_cli.training.checkpoints import load_step, load_weights, save_final, save_step, step_dirs
from aopd_cli.training.models import Policy
from aopd_cli.training.update import MicroBatch, make_optimizer, update

DIAGNOSTICS_FILE = "diagnostics.pt"  # the stage's diagnostics at the end of training


class Run(Protocol):
    """What the loop needs of the stage's run (`stages.lifecycle.Session` is one)."""

    config: object
    out_dir: Path
    tracker: object  # a tracking.tracker.Tracker
    stop: object  # a training.interrupts.StopFlag
    resume_from: Path | None  # a step_N folder, or the final checkpoint (training done)
    start_step: int  # steps done; -1: training finished


@dataclass
class StepBatch:
    micro_batches: list[MicroBatch]
    normalizer: int  # of this rank's share (method.md's reduction); the loop adds it up over ranks
    metrics: dict[str, float] = field(default_factory=dict)  # timings, response length



def sample_indices(rng, population: int, count: int) -> list[int]:
    """`count` distinct indices when the data allows it, else with replacement."""
    if count <= population:
        return rng.sample(range(population), count)
    return [rng.randrange(population) for _ in range(count)]


def train_loop(session: Run, policy: Policy, *, make_step: Callable[[int], StepBatch], loss_fn: Callable,
               sampler: random.Random, after_update: Callable[[], None] = lambda: None,
               evaluate: Callable[[int], dict[str, float]] | None = None, label: str = "train",
               diagnostics: dict | None = None) -> Path:
    """Run the stage's optimizer steps (from where an earlier run stopped) and return the final checkpoint.
    `diagnostics`: what the stage accumulates over its steps (tensors, lists of them), saved in every step
    checkpoint and restored into the same dict on resume, so a resumed run's sample is the whole run's."""
    from aopd_cli.config.compose import to_yaml

    config, tracker, out_dir = session.config, session.tracker, session.out_dir
    train = config.train
    if session.start_step < 0:  # an earlier run finished training: its weights, then what follows training
        load_weights(policy.model, session.resume_from)
        if diagnostics is not None and (out_dir / DIAGNOSTICS_FILE).is_file():
            diagnostics.update(torch.load(out_dir / DIAGNOSTICS_FILE, weights_only=True))
        return session.resume_from
    if train.batch_size < dist.world_size():
        raise UserError(f"train.batch_size={train.batch_size}: at least one prompt per rank is needed "
                        f"({dist.world_size()} ranks)")
    optimizer, scheduler = make_optimizer(policy.model, train)
    start, skipped_in_a_row, skipped = 0, 0, 0
    if session.resume_from is not None:
        state = load_step(session.resume_from, policy.model, optimizer, scheduler, sampler=sampler)
        start, skipped = state["step"], state.get("skipped", 0)
        if diagnostics is not None:
            diagnostics.update(state.get("diagnostics", {}))
        after_update()  # the rollout engine samples from the restored weights

    def checkpoint(step: int) -> Path:
        return save_step(out_dir, step, policy.model, optimizer, scheduler, sampler=sampler,
                         keep_last=train.keep_last, extra={"skipped": skipped, "diagnostics": diagnostics or {}})

    # a signal anywhere in the loop, not only inside a step, waits for the step's end: ranks that get it a few
    # instructions apart, one in a step and one between two, must still stop after the same step
    with progress(label, train.steps, start, train.log_every) as advance, session.stop.steps():
        for step in range(start, train.steps):
            started = time.perf_counter()
            batch = make_step(step)
            normalizer = int(dist.all_reduce([batch.normalizer])[0])
            timings: dict[str, float] = {}
            with names.timed("update", timings):
                result = update(policy, optimizer, scheduler, batch.micro_batches, loss_fn, normalizer,
                                train.grad_clip)
                if result.stepped:
                    after_update()
            skipped_in_a_row = 0 if result.stepped else skipped_in_a_row + 1
            skipped += not result.stepped
            tokens = dist.all_reduce([sum(int(m.mask_BT.sum()) for m in batch.micro_batches)])[0]
            shared = dict(zip(batch.metrics, dist.all_reduce(list(batch.metrics.values()))))
            metrics = {names.train("loss"): result.loss, names.train("grad_norm"): result.grad_norm,
                       names.train("lr"): scheduler.get_last_lr()[0], names.train("skipped_steps"): skipped,
                       names.train("tokens_per_s"): tokens / max(time.perf_counter() - started, 1e-9),
                       names.seconds("step"): time.perf_counter() - started,
                       **timings, **{names.train(k): v for k, v in result.metrics.items()},
                       **{k: v / dist.world_size() for k, v in shared.items()}}
            if (step + 1) % train.log_every == 0 or step + 1 == train.steps or not result.stepped:
                tracker.log_metrics(metrics, step=step + 1)
            if not result.stepped:
                _skipped(step + 1, result, skipped_in_a_row, train.max_skipped, out_dir)
            if evaluate is not None and train.eval_every and (step + 1) % train.eval_every == 0 \
                    and step + 1 < train.steps:
                tracker.log_metrics(evaluate(step + 1), step=step + 1)
            saved = train.save_every and (step + 1) % train.save_every == 0 and step + 1 < train.steps
            if saved:
                checkpoint(step + 1)
            advance(step + 1, metrics)
            stop = dist.all_reduce([float(session.stop.requested or 0)], "max")[0]
            if stop and step + 1 < train.steps:
                path = out_dir / f"step_{step + 1}" if saved else checkpoint(step + 1)
                raise Interrupted(int(stop), f"stopped after step {step + 1} of {train.steps}; a checkpoint is in "
                                             f"{path}: rerun the same command to resume from it")
    if diagnostics is not None and dist.is_main():  # what a run resumed after training still needs
        torch.save(diagnostics, out_dir / DIAGNOSTICS_FILE)
    return save_final(policy, out_dir / "checkpoint", config_yaml=to_yaml(config))


def _skipped(step: int, result, in_a_row: int, limit: int, out_dir: Path) -> None:
    quantity = "loss" if result.loss != result.loss or abs(result.loss) == float("inf") else "gradient norm"
    say(f"warning: step {step}: non-finite {quantity} ({result.loss if quantity == 'loss' else result.grad_norm}); "
        f"the optimizer step was skipped ({in_a_row} in a row)")
    if in_a_row >= limit:
        steps = step_dirs(out_dir)
        kept = f"the last good checkpoint is {steps[-1][1]}" if steps else "no step checkpoint was written yet"
        raise UserError(f"stopped at step {step}: the {quantity} was non-finite for {in_a_row} steps in a row "
                        f"(train.max_skipped={limit}); {kept}")
