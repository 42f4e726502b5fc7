"""A checkpoint loaded straight into FSDP2 shards, so a rank's host memory is its share of the model, not
the whole of it: the model is built on the meta device (no storage), sharded, given storage for its own
shard only, and each rank reads from the safetensors files just the rows of each tensor it holds
(`safe_open(...).get_slice`: the file is memory-mapped, the other rows never read). Buffers the
checkpoint does not hold (the rotary embedding's frequencies) are computed again.

Under torchrun with a hub id, each node's local rank 0 downloads the checkpoint and the other ranks wait
for it (the process group's timeout, `dist_timeout_s`, bounds the wait).

    torchrun --nproc-per-node 2 benchmarks/host_memory.py --worker CHECKPOINT
"""

from __future__ import annotations

from pathlib import Path

import torch

from aopd_cli.errors import UserError
from aopd_cli.training import distributed as dist


def local_folder(path: str, trust_remote_code: bool) -> Path:
    """A local folder for `path`: itself, or the hub snapshot (downloaded by rank 0, read by every rank)."""
    if Path(path).expanduser().is_dir():
        return Path(path).expanduser()
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", *(["*.py"] if trust_remote_code else [])]
    if dist.local_rank() == 0:  # one download a node: nodes rarely share a hub cache
        snapshot_download(path, allow_patterns=patterns)
    dist.barrier()  # as long as the process group's timeout (`dist_timeout_s`)
    return Path(snapshot_download(path, allow_patterns=patterns, local_files_only=True))


def load_sharded(path: str, *, load_dtype: torch.dtype, trainable: bool, compute_dtype: torch.dtype,
                 activation_checkpointing: bool, device: torch.device, trust_remote_code: bool = False):
    """The checkpoint at `path` as an FSDP2-sharded model on `device`, each rank having read its rows only."""
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = local_folder(path, trust_remote_code)
    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    default = torch.get_default_dtype()
    torch.set_default_dtype(load_dtype)
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    finally:
        torch.set_default_dtype(default)
    if not trainable:
        model.requires_grad_(False)
    model = dist.shard(model, trainable=trainable, compute_dtype=compute_dtype,
                       activation_checkpointing=activation_checkpointing)
    model.to_empty(device=device)
    _read_shards(model, folder)
    _recompute_buffers(model, device)
    if (folder / "generation_config.json").is_file():  # as from_pretrained reads it (a final checkpoint keeps it)
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(folder)
    return model


def _read_shards(model, folder: Path) -> None:
    from safetensors import safe_open
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    files = sorted(folder.glob("*.safetensors"))
    where = {}
    for file in files:
        with safe_open(file, "pt") as handle:
            where.update({key: file for key in handle.keys()})
    missing = [name for name, _ in model.named_parameters() if name not in where]
    if missing:
        raise UserError(f"{folder}: the checkpoint has no weights for {', '.join(missing[:3])}"
                        + (f" and {len(missing) - 3} more" if len(missing) > 3 else ""))
    with torch.no_grad():
        for name, param in model.named_parameters():  # a tied output layer is the embedding, listed once
            local = param.to_local() if isinstance(param, DTensor) else param
            with safe_open(where[name], "pt") as handle:
                rows = handle.get_slice(name)
                if isinstance(param, DTensor):
                    shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh,
                                                                          param.placements)
                    index = tuple(slice(start, start + size) for start, size in zip(offset, shape))
                    part = rows[index] if local.numel() else None
                else:
                    part = rows[:]
            if part is not None:
                local.copy_(part.to(local.dtype))


def _recompute_buffers(model, device: torch.device) -> None:
    """Buffers are not in a checkpoint: the rotary embeddings' frequencies are computed again from the
    config. Any other buffer would be left uninitialised by the meta build: refused, not guessed."""
    recomputed = set()
    for prefix, module in model.named_modules():
        if hasattr(module, "inv_freq") and hasattr(module, "rope_type"):
            fresh = type(module)(module.config)
            for name, buffer in fresh.named_buffers(recurse=False):
                getattr(module, name).copy_(buffer.to(device))
                recomputed.add(f"{prefix}.{name}" if prefix else name)
    unknown = [name for name, _ in model.named_buffers() if name not in recomputed]
    if unknown:
        raise UserError(f"cannot load this architecture sharded: its buffers {', '.join(unknown[:3])} are not "
                        "in the checkpoint and aopd does not know how to compute them")
