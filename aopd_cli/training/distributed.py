"""Data parallelism with PyTorch's own machinery: `torchrun` starts one process per rank (the CLI re-execs
itself through `torch.distributed.run` for `--nproc-per-node N`), the process group is nccl on GPUs and
gloo on CPU, and models are sharded with FSDP2 (`fully_shard` per decoder layer and at the root).

- Precision: on GPUs the student keeps fp32 sharded parameters (the optimizer's master weights) and
  computes in bf16 (`MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)`), also on one GPU;
  stepping bf16 weights directly at lr 1e-5 would leave most of them unchanged. On CPU all is fp32.
- One process on the CPU is not sharded at all (the lab): no process group, the plain model.
- Rank 0 alone prints and talks to MLflow; the helpers here answer rank/world from the process group.

    torchrun --nproc-per-node 2 -m aopd_cli distill train.steps=2 tracking.enabled=false
"""

from __future__ import annotations

import os
import socket
import sys
from contextlib import contextmanager
from datetime import timedelta

import torch
import torch.distributed as dist


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def running() -> bool:
    """A process group is up (torchrun, or a GPU): models are sharded."""
    return dist.is_initialized()


def launched_by_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or ("LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ)


DEFAULT_TIMEOUT_S = 7200.0  # a cold download of a 32B teacher (~65 GB) by one rank, the others at a barrier


def init(timeout_s: float = DEFAULT_TIMEOUT_S) -> torch.device:
    """The process group (when torchrun started us, or on a GPU) and this rank's device. `timeout_s`: how
    long a collective (a barrier included) waits before the group gives up; NCCL's own default, 10 minutes,
    is shorter than one rank downloading a checkpoint while the others wait."""
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    if not dist.is_initialized() and (launched_by_torchrun() or cuda):
        if not launched_by_torchrun():  # one GPU without torchrun: a group of one, so FSDP2 can shard
            # everything torchrun would set: an in-process vLLM engine joins this group (external_launcher),
            # and its executor reads RANK and LOCAL_RANK from the environment
            os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0", WORLD_SIZE="1",
                              LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=timeout_s))
    return torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")


def local_rank() -> int:
    """This process's place on its node (torchrun's LOCAL_RANK; 0 alone)."""
    return int(os.environ.get("LOCAL_RANK", 0))


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


@contextmanager
def group_closed_after():
    """The process group destroyed when the block ends; when it ends well, every rank first waits for the
    others (gloo can abort a peer still reading when one rank closes its connections). Not after an error: a
    rank that raised must not wait for ranks that may never come."""
    try:
        yield
        barrier()
    finally:
        shutdown()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def relaunch_under_torchrun(nproc_per_node: int, argv: list[str]) -> None:
    """Replace this process by `torchrun --nproc-per-node N -m aopd_cli <argv>` (single node)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc_per_node}",
               "-m", "aopd_cli", *argv]
    # torchrun forwards SIGTERM / Ctrl-C to the ranks and SIGKILLs them after this many seconds (30 by default):
    # a step and its checkpoint must fit in it
    os.environ.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "60")
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, command)


# ---------------------------------------------------------------- collectives (no-ops on one process)
def all_reduce(values: list[float], op: str = "sum") -> list[float]:
    """Element-wise sum or max of a list of floats over ranks, in float64."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=_comm_device())
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return tensor.tolist()


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def broadcast(obj):
    """Rank 0's `obj` on every rank (pickled)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_object(obj) -> list:
    """Every rank's `obj`, in rank order (pickled); `[obj]` on one process."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    found = [None] * dist.get_world_size()
    dist.all_gather_object(found, obj)
    return found


def gather_to_main(items: list) -> list:
    """Every rank's list, concatenated in rank order, on rank 0 (an empty list elsewhere)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return list(items)
    found = [None] * dist.get_world_size() if is_main() else None
    dist.gather_object(items, found, dst=0)
    return [item for part in found for item in part] if is_main() else []


def _comm_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def shard_range(count: int, *, rank_: int | None = None, world: int | None = None) -> range:
    """This rank's contiguous share of `count` items (the first ranks take one more when it does not divide)."""
    rank_, world = rank() if rank_ is None else rank_, world_size() if world is None else world
    base, extra = divmod(count, world)
    start = rank_ * base + min(rank_, extra)
    return range(start, start + base + (rank_ < extra))


def shard_of(items: list, *, rank_: int | None = None, world: int | None = None) -> list:
    """This rank's contiguous share of a list (`shard_range`)."""
    share = shard_range(len(items), rank_=rank_, world=world)
    return items[share.start:share.stop]


# ---------------------------------------------------------------- FSDP2
def is_sharded(model) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def shard(model, *, trainable: bool, compute_dtype: torch.dtype, activation_checkpointing: bool = False,
          mesh=None):
    """FSDP2 over the decoder layers and the root, or the model untouched on one CPU process.

    A trainable model keeps fp32 parameters (the optimizer's master weights) and, for a bf16 compute
    dtype, computes in bf16 with fp32 gradient reduction; a frozen one (teacher, base) is sharded in the
    dtype it was loaded in, forward only (its scorer frees the gathered root once it has scored: FSDP2
    keeps a root gathered for a backward, which a frozen model never runs). `mesh`: FSDP2's default (all
    ranks) unless given (the memory trace gives its own)."""
    if activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if trainable and any(p.dtype != torch.float32 for p in model.parameters()):
        model.float()
    if not dist.is_initialized():
        return model
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy()
    if trainable and compute_dtype != torch.float32:
        policy = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    for layer in getattr(model, model.base_model_prefix).layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def _fsdp_modules(model):
    from torch.distributed.fsdp import FSDPModule

    return [module for module in model.modules() if isinstance(module, FSDPModule)]


@contextmanager
def gathered(model):
    """The whole model on every rank for the block (generation: each rank decodes its own prompts for
    as many steps as it needs, with no collective per forward). A no-op for an unsharded model."""
    modules = _fsdp_modules(model) if dist.is_initialized() else []
    inner = [module for module in modules if module is not model]  # the root never reshards after forward
    for module in inner:
        module.set_reshard_after_forward(False, recurse=False)
    for module in modules:
        module.unshard()
    try:
        yield model
    finally:
        for module in modules:
            module.reshard()
        for module in inner:
            module.set_reshard_after_forward(True, recurse=False)
