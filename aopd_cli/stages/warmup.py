"""`aopd warmup`: SFT on conversations (OpenThoughts format, optionally mixed with ToolAlpaca
conversations), loss on assistant tokens only. With `reuse_cached=true` a checkpoint trained from the
same config (content hash) is reused instead of trained again: the lab's teacher is made once.

    aopd warmup train.steps=20
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from pathlib import Path

from aopd_cli import metrics as names
from aopd_cli.data.loaders import load_data
from aopd_cli.data.prompts import sft_example, tool_sft_messages
from aopd_cli.engine import MicroBatch, load_policy, seed_everything
from aopd_cli.eval.harness import evaluate_policy, print_metrics
from aopd_cli.objectives import global_normalizer, seqkd_loss
from aopd_cli.rollout import make_rollout, right_pad
from aopd_cli.stages.common import StepBatch, micro_batches, open_run, sample_indices, tracked_run, train_loop


def cache_key(config) -> str:
    from aopd_cli import __version__
    from aopd_cli.data.lab import LAB_VERSION

    content = config.model_dump(mode="json", exclude={"tracking", "output_dir", "reuse_cached", "eval"})
    blob = json.dumps([content, LAB_VERSION, __version__], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def cached_checkpoint(config) -> Path:
    from aopd_cli.data.lab import cache_root

    return cache_root() / "checkpoints" / f"warmup-{cache_key(config)}"


def run_warmup(config, *, parent_run_id: str | None = None, run_name: str | None = None,
                tags: dict[str, str] | None = None) -> Path:
    seed_everything(config.seed)
    cached = cached_checkpoint(config)
    if config.reuse_cached and (cached / "config.json").is_file():
        print(f"aopd: reusing the cached warm-up checkpoint {cached} (same config, hash {cache_key(config)})")
        tracker = open_run(config, run_name=run_name, parent_run_id=parent_run_id, tags=tags)
        tracker.set_tags({"reused_checkpoint": str(cached)})
        tracker.close()
        _link_into_output(cached, Path(config.output_dir) / "checkpoint")
        return cached
    conversations = [r["messages"] for r in load_data(config.data, "sft")]
    if config.tool_data is not None:
        conversations += [tool_sft_messages(r, config.tool_data.prompt_style)
                          for r in load_data(config.tool_data, "tool_train")]
    policy = load_policy(config.student, role="student", seed=config.seed)
    examples = [sft_example(policy.tokenizer, messages, policy.stop_ids) for messages in conversations]
    with tracked_run(config, run_name=run_name, parent_run_id=parent_run_id, tags=tags) as tracker:
        rng, train = random.Random(config.seed), config.train
        rollout = make_rollout("hf", policy, None, config.eval.batch_size)

        def make_step(step: int) -> StepBatch:
            chosen = [examples[i] for i in sample_indices(rng, len(examples), train.batch_size)]
            ids_BL, attn_BL = right_pad([ids for ids, _ in chosen], policy.tokenizer.pad_token_id)
            mask_BL, _ = right_pad([[int(m) for m in mask] for _, mask in chosen], 0, ids_BL.shape[1])
            mask_BT = (mask_BL[:, 1:] == 1) & attn_BL[:, 1:]
            micro = micro_batches(ids_BL, attn_BL.long(), 1, mask_BT, train.micro_batch_size)
            return StepBatch(micro, global_normalizer(mask_BT, "seq-mean-token-mean"),
                             {names.train("response_len"): float(mask_BT.sum(-1).float().mean())})

        def loss_fn(head, micro: MicroBatch, normalizer: int):
            return seqkd_loss(head, micro.targets_BT, micro.mask_BT, normalizer=normalizer)

        def evaluate(step: int) -> dict[str, float]:
            return evaluate_policy(policy, rollout, config.eval, seed=config.seed)[0]  # as `aopd eval` of it

        checkpoint = train_loop(config, policy, tracker, make_step=make_step, loss_fn=loss_fn, evaluate=evaluate,
                                label=run_name or "warmup")
        if config.eval.benchmarks or config.eval.tool_benchmarks:
            metrics = evaluate(train.steps)
            tracker.log_metrics(metrics, step=train.steps)
            print_metrics(f"warm-up {run_name or ''}".strip(), metrics, config.eval)
        if config.reuse_cached:
            _store_in_cache(checkpoint, cached)
        return checkpoint


def _link_into_output(cached: Path, target: Path) -> None:
    """The stage's own folder shows the reused checkpoint too (a link: warm-ups of real models are large)."""
    if target.is_symlink():
        target.unlink()
    elif target.exists():
        return  # a checkpoint this folder already holds is left alone
    target.parent.mkdir(parents=True, exist_ok=True)
    target.symlink_to(cached.resolve(), target_is_directory=True)


def _store_in_cache(checkpoint: Path, cached: Path) -> None:
    staging = cached.with_name(cached.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(checkpoint, staging)
    shutil.rmtree(cached, ignore_errors=True)
    staging.rename(cached)



