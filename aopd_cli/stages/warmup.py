"""`aopd warmup`: SFT on conversations (OpenThoughts format, optionally mixed with ToolAlpaca
conversations), loss on assistant tokens only. Examples longer than `train.max_seq_len` are truncated or
dropped (`train.too_long`), and counted. With `reuse_cached=true` a whole checkpoint trained from the
same config (content hash) is reused instead of trained again: the lab's teacher is made once.

    aopd warmup train.steps=20
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from contextlib import ExitStack
from pathlib import Path

import torch

from aopd_cli import metrics as names
from aopd_cli.data.loaders import load_data
from aopd_cli.data.prompts import sft_example, tool_sft_messages
from aopd_cli.errors import UserError
from aopd_cli.eval.harness import evaluate_policy, print_metrics
from aopd_cli.progress import say
from aopd_cli.rollout.engines import make_rollout
from aopd_cli.rollout.interface import right_pad
from aopd_cli.stages.lifecycle import log_dataset
from aopd_cli.stages.preflight import check_benchmark_prompts, context_of
from aopd_cli.training.batches import micro_batches
from aopd_cli.training.loop import StepBatch, sample_indices, train_loop
from aopd_cli.training.models import load_policy, seed_everything
from aopd_cli.training.objectives import global_normalizer, seqkd_loss
from aopd_cli.training.sealed import reusable, seal
from aopd_cli.training.update import MicroBatch


def cache_key(config) -> str:
    from aopd_cli import __version__
    from aopd_cli.data.lab import LAB_VERSION
    from aopd_cli.stages.lifecycle import TRAIN_NOT_IDENTITY, input_fingerprints

    content = config.model_dump(mode="json", exclude={"tracking", "output_dir", "reuse_cached", "eval", "resume",
                                                      "rollout", "threads", "dist_timeout_s"})
    content["train"] = {k: v for k, v in content["train"].items() if k not in TRAIN_NOT_IDENTITY}
    start = content["student"].get("path")
    if start and Path(start).is_symlink():  # a cached warm-up (linked from a pipeline's folder): its cache name
        content["student"]["path"] = Path(start).resolve().name
    # the content of its data, not only their names: an edited conversations file is another warm-up
    data = {key: fingerprint for key, fingerprint in input_fingerprints(config).items() if not key.startswith("eval.")
            and not key.startswith("student.path")}
    blob = json.dumps([content, data, LAB_VERSION, __version__], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def cached_checkpoint(config) -> Path:
    from aopd_cli.data.lab import cache_root

    return cache_root() / "checkpoints" / f"warmup-{cache_key(config)}"


def fit_length(examples: list[tuple[list[int], list[bool]]], max_len: int | None, policy: str):
    """(examples within `max_len` tokens, how many were truncated or dropped)."""
    if max_len is None:
        return examples, 0
    too_long = [len(ids) > max_len for ids, _ in examples]
    if policy == "drop":
        return [e for e, long in zip(examples, too_long) if not long], sum(too_long)
    return [(ids[:max_len], mask[:max_len]) for ids, mask in examples], sum(too_long)


def prepare(config):
    """The conversations and the student (None when a whole cached checkpoint is reused)."""
    seed_everything(config.seed)
    if config.reuse_cached and reusable(cached_checkpoint(config), "warm-up"):
        return None
    datasets = [("train", config.data.source, load_data(config.data, "sft"))]
    conversations = [r["messages"] for r in datasets[0][2]]
    if config.tool_data is not None:
        datasets.append(("train", config.tool_data.source, load_data(config.tool_data, "tool_train")))
        conversations += [tool_sft_messages(r, config.tool_data.prompt_style) for r in datasets[1][2]]
    policy = load_policy(config.student, role="student", seed=config.seed, trainable=True,
                         activation_checkpointing=config.train.activation_checkpointing)
    check_benchmark_prompts(policy, config.eval)
    return conversations, policy, datasets


def run(config, session, prepared) -> Path:
    out_dir, train = session.out_dir, config.train
    cached = cached_checkpoint(config)
    if prepared is None:
        say(f"reusing the cached warm-up checkpoint {cached} (same config, hash {cache_key(config)})")
        session.tracker.set_tags({"reused_checkpoint": str(cached)})
        return _link_into_output(cached, out_dir / "checkpoint")
    conversations, policy, datasets = prepared
    for context, source, records in datasets:
        log_dataset(session, context, source, records)
    examples = [sft_example(policy.tokenizer, messages, policy.stop_ids) for messages in conversations]
    limit = context_of(policy, train.max_seq_len)  # a conversation past the model's context never reaches it
    examples, too_long = fit_length(examples, limit, train.too_long)
    if too_long:
        what = f"train.max_seq_len={train.max_seq_len}" if limit == train.max_seq_len else \
            f"the model's context ({limit:,} tokens)"
        say(f"{too_long} of {len(conversations)} examples are longer than {what}: "
            f"{'dropped' if train.too_long == 'drop' else 'truncated'} (train.too_long)")
    if not examples:
        raise UserError(f"every example is longer than {limit:,} tokens and train.too_long=drop left none")
    session.tracker.log_metrics({f"data/{train.too_long}_examples": too_long, "data/examples": len(examples)}, step=0)
    rng = random.Random(config.seed)

    def make_step(step: int) -> StepBatch:
        chosen = [examples[i] for i in sample_indices(rng, len(examples), train.batch_size)]
        ids_BL, attn_BL = right_pad([ids for ids, _ in chosen], policy.tokenizer.pad_token_id)
        mask_BL, _ = right_pad([[int(m) for m in mask] for _, mask in chosen], 0, ids_BL.shape[1])
        mask_BT = (mask_BL[:, 1:] == 1) & attn_BL[:, 1:]
        mine = _rank_rows(len(chosen))
        micro = micro_batches(ids_BL[mine], attn_BL[mine].long(), 1, mask_BT[mine], train.micro_batch_size,
                              train.micro_batch_tokens)
        return StepBatch(micro, global_normalizer(mask_BT[mine], "seq-mean-token-mean"),
                         {names.train("response_len"): float(mask_BT.sum(-1).float().mean())})

    def loss_fn(head, micro: MicroBatch, normalizer: int):
        return seqkd_loss(head, micro.targets_BT, micro.mask_BT, normalizer=normalizer)

    with ExitStack() as stack:
        engine = []  # the evaluations' engine, started when first needed (`rollout.engine`, as the eval stage's)

        def evaluate(step: int) -> dict[str, float]:
            if not engine:
                if torch.cuda.is_available():  # the memory training left cached goes to the engine
                    torch.cuda.empty_cache()
                engine.append(make_rollout(config.rollout.engine, policy, config.rollout, config.eval.batch_size))
                stack.callback(engine[0].close)
            else:  # an engine with weights of its own (vLLM) still holds those of the last evaluation
                engine[0].sync_weights()
            return evaluate_policy(policy, engine[0], config.eval, seed=config.seed)[0]  # as `aopd eval` of it

        checkpoint = train_loop(session, policy, make_step=make_step, loss_fn=loss_fn, sampler=rng, evaluate=evaluate,
                                label=session.name)
        if config.reuse_cached:
            # stored before the closing evaluation, so a failing one never costs the training again; the stage's
            # folder then links to the cache, as when the checkpoint is reused: a warm-up chained on this one (the
            # lab's teacher) gets the same cache key on its first run as on every later one
            checkpoint = _store_in_cache(checkpoint, cached)
        if config.eval.benchmarks or config.eval.tool_benchmarks:
            metrics = evaluate(train.steps)
            session.tracker.log_metrics(metrics, step=train.steps)
            print_metrics(session.name, metrics, config.eval)
    return checkpoint


def _rank_rows(count: int) -> list[int]:
    from aopd_cli.training.distributed import shard_of

    return shard_of(list(range(count)))


def _link_into_output(cached: Path, target: Path) -> Path:
    """The stage's own folder shows the reused checkpoint (a link: warm-ups of real models are large)."""
    if target.is_symlink():
        target.unlink()
    elif target.exists():
        return target  # a checkpoint this folder already holds is left alone
    target.parent.mkdir(parents=True, exist_ok=True)
    target.symlink_to(cached.resolve(), target_is_directory=True)
    return target


def _store_in_cache(checkpoint: Path, cached: Path) -> Path:
    """Copy into the cache through a per-process name, so two runs storing at once never mix files; the
    stage's checkpoint becomes a link to the cached copy."""
    from aopd_cli.training import distributed

    if distributed.is_main():
        staging = cached.with_name(f".tmp-{cached.name}-{os.getpid()}")
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(checkpoint, staging)
        seal(staging)  # reused only while its files are as written here
        old = cached.with_name(f".old-{cached.name}-{os.getpid()}")
        if cached.exists():
            cached.rename(old)
        staging.rename(cached)
        shutil.rmtree(old, ignore_errors=True)
        shutil.rmtree(checkpoint)
        _link_into_output(cached, checkpoint)
    distributed.barrier()  # no rank reads the stage's checkpoint while it turns into a link
    return checkpoint
