"""What every stage shares: the session around it and the step loop.

The session (`stage_session`): one process per output folder (a lock naming the holder), leftovers of
an interrupted writer removed, and the resume decision: with `resume=auto` a folder that holds an
earlier run of the same configuration continues from its newest whole checkpoint in the same MLflow
run; a different configuration, or `resume=never`, keeps the old folder under a new name and starts
afresh. The tracked run is opened inside the context that closes it (FINISHED, KILLED, FAILED), and
SIGTERM / SIGINT stop the loop at a step's end with a checkpoint. A finished stage leaves
`aopd_done.json` (its configuration's identity and result): rerunning it does nothing.

The loop (`train_loop`): batch, update (a non-finite loss or gradient skips the step), sync, log,
evaluate, save, with progress on rank 0. Stages differ only in how they make a step's batch and loss.

    python -m pytest tests/test_resume.py -q
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from aopd_cli import distributed as dist
from aopd_cli import metrics as names
from aopd_cli.checkpoints import CONFIG_FILE, load_step, load_weights, save_final, save_step, step_dirs, tidy
from aopd_cli.engine import MicroBatch, Policy, make_optimizer, update
from aopd_cli.errors import UserError
from aopd_cli.interrupts import Interrupted, StopFlag, handled_signals
from aopd_cli.progress import progress, say
from aopd_cli.rollout import RolloutBatch

RUN_FILE, DONE_FILE, LOCK_FILE = "aopd_run.json", "aopd_done.json", ".aopd.lock"
# keys that change what a stage computes; the rest (logging, evaluation, where to write) may change on resume
_NOT_IDENTITY = {"tracking", "resume", "output_dir", "eval", "reuse_cached"}
_TRAIN_NOT_IDENTITY = {"log_every", "eval_every", "save_every", "keep_last", "max_skipped"}


@dataclass
class StepBatch:
    micro_batches: list[MicroBatch]
    normalizer: int  # of this rank's share (method.md's reduction); the loop adds it up over ranks
    metrics: dict[str, float] = field(default_factory=dict)  # timings, response length


@dataclass
class Session:
    config: object
    out_dir: Path
    tracker: object
    stop: StopFlag
    name: str  # the run's name (the stage's name in a pipeline)
    resume_from: Path | None = None  # a step_N folder, or the final checkpoint (training done)
    start_step: int = 0  # steps done; -1: training finished, only what follows it is left
    parent_run_id: str | None = None  # a pipeline's or sweep's run, which says how to see the runs at its end


# ---------------------------------------------------------------- identity, records
def fingerprint(path: str | Path) -> str:
    """Names, sizes and modification times of a local file or folder's files (a rebuilt input differs)."""
    path = Path(path).expanduser()
    if not path.exists():
        return "absent"
    files = [path] if path.is_file() else sorted(p for p in path.resolve().rglob("*") if p.is_file())
    return hashlib.sha256(json.dumps([(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]).encode()
                          ).hexdigest()[:16]


def identity(config) -> str:
    # evaluation settings are what an eval stage computes; for a training stage they only shape its curves
    dump = config.model_dump(mode="json", exclude=_NOT_IDENTITY - ({"eval"} if config.stage == "eval" else set()))
    if "train" in dump:
        dump["train"] = {k: v for k, v in dump["train"].items() if k not in _TRAIN_NOT_IDENTITY}
    inputs = {role: fingerprint(model.path) for role in ("student", "teacher", "base")
              if (model := getattr(config, role, None)) is not None and model.path}
    return hashlib.sha256(json.dumps([dump, inputs], sort_keys=True).encode()).hexdigest()[:16]


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def finished_result(config):
    """The result of a finished run of this very configuration in its output folder, else None."""
    from aopd_cli.checkpoints import checkpoint_problem

    done = _read(Path(config.output_dir) / DONE_FILE)
    if done is None or done.get("identity") != identity(config):
        return None
    result = done["result"]
    if isinstance(result, str):  # a checkpoint: still there and whole (a cache can be cleared)
        return None if checkpoint_problem(Path(result)) else Path(result)
    return result


# ---------------------------------------------------------------- the session
@contextmanager
def output_lock(out_dir: Path):
    """Hold `out_dir` for this process; a second process is refused at once, naming the holder. The lock
    dies with its process, so a stale one is taken over (with a warning)."""
    import fcntl
    import os
    import socket

    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / LOCK_FILE
    handle = open(path, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise UserError(f"output_dir={out_dir} is in use by {holder}; wait for it, or choose another output_dir")
    handle.seek(0)
    previous = handle.read().strip()
    if previous:
        print(f"aopd: warning: taking over {path} from {previous}, which is no longer running")
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    handle.flush()
    try:
        yield
    finally:
        handle.seek(0)
        handle.truncate()
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()


def _archive(out_dir: Path, why: str) -> None:
    """Move the earlier run's files to a sibling folder (the lock file stays: this process holds it)."""
    target = out_dir.with_name(f"{out_dir.name}.archived-{time.strftime('%Y%m%d-%H%M%S')}")
    target.mkdir()
    for entry in out_dir.iterdir():
        if entry.name != LOCK_FILE:
            entry.rename(target / entry.name)
    say(f"{why}: the earlier run is kept in {target}; starting afresh in {out_dir}")


def _newest(out_dir: Path) -> tuple[Path | None, int]:
    if (out_dir / "checkpoint" / "config.json").is_file():
        return out_dir / "checkpoint", -1  # training finished; -1: the loop has no step left to run
    steps = step_dirs(out_dir)
    return (steps[-1][1], steps[-1][0]) if steps else (None, 0)


def _decide(config, out_dir: Path, ident: str) -> tuple[dict | None, Path | None, int]:
    """(the earlier run's record to continue, resume point, steps done), archiving what is not continued."""
    record = _read(out_dir / RUN_FILE)
    earlier = record is not None or step_dirs(out_dir) or (out_dir / "checkpoint").exists()
    if earlier and (config.resume == "never" or (record or {}).get("identity") != ident):
        if record and record.get("run_id"):
            from aopd_cli.tracking import mark_run

            mark_run(config.tracking, record["run_id"], "KILLED")
        _archive(out_dir, "resume=never" if config.resume == "never" else "the configuration changed")
        return None, None, 0
    resume_from, step = _newest(out_dir)
    return record, resume_from, step


@contextmanager
def stage_session(config, *, run_name: str | None, parent_run_id: str | None, tags: dict[str, str] | None = None):
    from aopd_cli.config.compose import flatten, to_yaml
    from aopd_cli.tracking import BACKLOG_FILE, NullTracker, closing, resume_run, start_run

    out_dir, ident = Path(config.output_dir), identity(config)
    with output_lock(out_dir) if dist.is_main() else nullcontext():
        plan = None
        if dist.is_main():
            tidy(out_dir)
            record, resume_from, step = _decide(config, out_dir, ident)
            plan = (record, str(resume_from) if resume_from else None, step)
        record, resume_from, step = dist.broadcast(plan)
        resume_from = Path(resume_from) if resume_from else None
        tracker = None
        if dist.is_main() and record and record.get("run_id") and record.get("tracking_uri") == config.tracking.uri:
            tracker = resume_run(config.tracking, record["run_id"], backlog=out_dir / BACKLOG_FILE)
        resumed = tracker is not None
        if tracker is None and dist.is_main():
            all_tags = {**(tags or {}), "stage": config.stage, "seed": str(config.seed),
                        "world_size": str(dist.world_size())}
            objective = getattr(config, "objective", None)
            if objective is not None:
                all_tags["objective"] = objective.name
            for role in ("student", "teacher", "base"):  # a reused warm-up is a link into the cache
                model = getattr(config, role, None)
                if model is not None and model.path and Path(model.path).is_symlink():
                    all_tags[f"{role}.cache_path"] = str(Path(model.path).resolve())
            tracker = start_run(config.tracking, run_name=run_name or config.stage, tags=all_tags,
                                parent_run_id=parent_run_id, backlog=out_dir / BACKLOG_FILE)
        tracker = tracker or NullTracker()
        with closing(tracker), handled_signals() as stop:
            if dist.is_main():
                (out_dir / RUN_FILE).write_text(json.dumps({"identity": ident, "run_id": tracker.run_id,
                                                            "tracking_uri": config.tracking.uri}))
                if not resumed:
                    tracker.log_params(flatten(config.model_dump(mode="json")))
                    (out_dir / CONFIG_FILE).write_text(to_yaml(config))
                    tracker.log_artifact(out_dir / CONFIG_FILE)
            if resume_from is not None:
                total = getattr(getattr(config, "train", None), "steps", 0)
                say(f"resuming {run_name or config.stage} from step {total if step < 0 else step} of {total} "
                    f"({resume_from})")
            yield Session(config, out_dir, tracker, stop, run_name or config.stage, resume_from, step, parent_run_id)


def log_dataset(session: Session, context: str, source: str, records: list) -> None:
    """A dataset the stage used, as an MLflow dataset input: its source, rows and a digest of the rows."""
    if dist.is_main():
        digest = hashlib.sha256(json.dumps(records, sort_keys=True, default=str).encode()).hexdigest()[:16]
        session.tracker.log_dataset(Path(source).stem if "/" in source or "." in source else source, source,
                                    len(records), digest, context)


def finish(session: Session, result) -> None:
    """Record the stage as done (its identity and result), so rerunning it does nothing."""
    if dist.is_main():
        value = str(result) if isinstance(result, Path) else result
        (session.out_dir / DONE_FILE).write_text(json.dumps({"identity": identity(session.config), "result": value,
                                                             "run_id": session.tracker.run_id}))
        say(f"{session.config.stage} done: {session.out_dir}"
            + (f" (MLflow run {session.tracker.run_id})" if session.tracker.run_id else ""))
        if session.tracker.run_id and session.parent_run_id is None:
            from aopd_cli.runs_view import runs_link, table_columns

            link = runs_link(session.config.tracking, table_columns([session.config]),
                             f"tags.stage = '{session.config.stage}'")
            say(f"see the runs with {link}")


# ---------------------------------------------------------------- batches
def micro_batches(ids_BL, attn_BL, first_target: int, mask_BT, size: int, token_budget: int | None = None
                  ) -> list[MicroBatch]:
    """Rows cut into micro-batches: `size` sequences each, or (with a token budget) rows of similar length
    packed while rows x longest length stays within the budget; each is trimmed to its own longest row,
    so one long sequence does not set the padding of the whole batch."""
    lengths = attn_BL.sum(-1).tolist()
    order = sorted(range(len(lengths)), key=lambda r: lengths[r]) if token_budget else list(range(len(lengths)))
    groups, current = [], []
    for row in order:
        longest = max([lengths[r] for r in current + [row]])
        if current and (len(current) >= size if not token_budget else (len(current) + 1) * longest > token_budget):
            groups.append(current)
            current = []
        current.append(row)
    if current:
        groups.append(current)
    return [_trimmed(ids_BL[rows], attn_BL[rows], first_target, mask_BT[rows], rows)
            for rows in map(torch.tensor, groups)]


def _trimmed(ids_BL, attn_BL, first_target: int, mask_BT, rows_B) -> MicroBatch:
    """Drop columns that are padding in every row: left of the prompts, right of the last counted target."""
    real_L = attn_BL.bool().any(0)
    left = int(real_L[:first_target].nonzero()[0]) if real_L[:first_target].any() else first_target - 1
    left = min(left, first_target - 1)  # the position that predicts the first target stays
    counted_T = mask_BT.any(0)
    right = first_target + (int(counted_T.nonzero()[-1]) + 1 if counted_T.any() else 1)
    return MicroBatch(ids_BL[:, left:right], attn_BL[:, left:right], first_target - left,
                      mask_BT[:, :right - first_target], rows_B=rows_B)


def rollout_micro_batches(batch: RolloutBatch, size: int, token_budget: int | None = None) -> list[MicroBatch]:
    """Prompt + response sequences cut into micro-batches; targets are the response tokens."""
    ids_BL = torch.cat([batch.prompt_ids_BP, batch.response_ids_BR], dim=1)
    attn_BL = torch.cat([batch.prompt_mask_BP.long(), batch.response_mask_BR.long()], dim=1)
    return micro_batches(ids_BL, attn_BL, batch.prompt_ids_BP.shape[1], batch.response_mask_BR, size, token_budget)


def sample_indices(rng, population: int, count: int) -> list[int]:
    """`count` distinct indices when the data allows it, else with replacement."""
    if count <= population:
        return rng.sample(range(population), count)
    return [rng.randrange(population) for _ in range(count)]


# ---------------------------------------------------------------- the loop
def train_loop(session: Session, policy: Policy, *, make_step: Callable[[int], StepBatch], loss_fn: Callable,
               sampler: random.Random, after_update: Callable[[], None] = lambda: None,
               evaluate: Callable[[int], dict[str, float]] | None = None, label: str = "train") -> Path:
    """Run the stage's optimizer steps (from where an earlier run stopped) and return the final checkpoint."""
    from aopd_cli.config.compose import to_yaml

    config, tracker, out_dir = session.config, session.tracker, session.out_dir
    train = config.train
    if session.start_step < 0:  # an earlier run finished training: its weights, then what follows training
        load_weights(policy.model, session.resume_from)
        return session.resume_from
    if train.batch_size < dist.world_size():
        raise UserError(f"train.batch_size={train.batch_size}: at least one prompt per rank is needed "
                        f"({dist.world_size()} ranks)")
    optimizer, scheduler = make_optimizer(policy.model, train)
    start, skipped_in_a_row, skipped = 0, 0, 0
    if session.resume_from is not None:
        state = load_step(session.resume_from, policy.model, optimizer, scheduler, sampler=sampler)
        start, skipped = state["step"], state.get("skipped", 0)
        after_update()  # the rollout engine samples from the restored weights

    def checkpoint(step: int) -> Path:
        return save_step(out_dir, step, policy.model, optimizer, scheduler, sampler=sampler,
                         keep_last=train.keep_last, extra={"skipped": skipped})

    with progress(label, train.steps, start, train.log_every) as advance:
        for step in range(start, train.steps):
            with session.stop.step():
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
