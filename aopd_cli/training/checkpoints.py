"""Checkpoints: resumable step checkpoints, final HF checkpoints, and the checks and tidying around them.

- `step_N/` (every `train.save_every` steps): model and optimizer through `torch.distributed.checkpoint`
  (each rank writes its shards; it also loads at another world size), plus each rank's trainer state
  (step, scheduler, every RNG that shapes the run). Written under `.tmp-step_N` and renamed when whole;
  the newest `train.keep_last` are kept.
- `checkpoint/` (end of a stage): a full Hugging Face checkpoint (safetensors in the dtype the student was
  loaded in, `student.dtype`: bf16 on GPUs; tokenizer; the resolved config) that transformers and vLLM
  load, gathered and written by rank 0, atomically.
- Non-finite weights are never written. `checkpoint_problem` tells a whole checkpoint from a truncated one.

    python -m pytest tests/test_resume.py -q
"""

from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
import struct
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch

from aopd_cli.errors import Interrupted, UserError
from aopd_cli.training import distributed as dist

CONFIG_FILE = "aopd_config.yaml"  # the resolved config, in a checkpoint and in a stage's output folder
STATE_FILE = "training_state.pt"  # the optimizer state a final checkpoint may carry
STEP_RE = re.compile(r"^step_(\d+)$")
META_FILE = "meta.json"  # written last, with the manifest of the folder's files: without it, not whole
CHECKSUM_BELOW = 64 * 2**20  # files of a step folder smaller than this are checksummed, larger ones sized


# ---------------------------------------------------------------- RNG
def rng_state(sampler: random.Random | None) -> dict:
    import numpy as np

    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": [np.random.get_state()[0], np.random.get_state()[1].tolist(), *np.random.get_state()[2:]]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if sampler is not None:
        state["sampler"] = sampler.getstate()
    return state


def restore_rng(state: dict, sampler: random.Random | None) -> None:
    import numpy as np

    torch.set_rng_state(state["torch"])
    random.setstate(_tuples(state["python"]))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if sampler is not None and "sampler" in state:
        sampler.setstate(_tuples(state["sampler"]))


def _tuples(value):
    # torch.save keeps tuples, but be lenient with lists (random.setstate insists on tuples)
    return tuple(_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


# ---------------------------------------------------------------- step checkpoints
def step_dirs(out_dir: Path, *, say_damaged: bool = False) -> list[tuple[int, Path]]:
    """Whole step checkpoints, oldest first: every file their manifest lists is there with its size (and,
    for the small files, its checksum). A damaged one is left out (named, with `say_damaged`)."""
    found = []
    for path in Path(out_dir).glob("step_*"):
        match = STEP_RE.match(path.name)
        if not match or not (path / META_FILE).is_file():
            continue
        problem = step_problem(path)
        if problem is None:
            found.append((int(match[1]), path))
        elif say_damaged and dist.is_main():
            print(f"aopd: warning: {path} is damaged ({problem}): skipped, resuming from the checkpoint before it",
                  flush=True)
    return sorted(found)


def manifest(folder: Path, skip: str = META_FILE, times: bool = False) -> dict[str, list]:
    """Relative path -> [size, sha256 or None] of every file in a folder but `skip` (checksums of files under
    CHECKSUM_BELOW bytes: the trainer states, DCP's metadata, configs and tokenizers; the weight shards are
    checked by size, and with `times` by modification time too)."""
    import hashlib

    entries = {}
    for file in sorted(p for p in Path(folder).resolve().rglob("*") if p.is_file() and p.name != skip):
        stat = file.stat()
        digest = hashlib.sha256(file.read_bytes()).hexdigest() if stat.st_size < CHECKSUM_BELOW else None
        entries[str(file.relative_to(Path(folder).resolve()))] = [stat.st_size, digest] + \
            ([stat.st_mtime_ns] if times and digest is None else [])
    return entries


def step_problem(folder: Path) -> str | None:
    """Why a step folder is not whole (a file missing, cut short or changed), or None."""
    import hashlib

    try:
        meta = json.loads((folder / META_FILE).read_text())
    except (OSError, ValueError):
        return f"{META_FILE} unreadable"
    for name, (size, digest) in meta.get("files", {}).items():
        file = folder / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != size:
            return f"{name} is {file.stat().st_size} bytes, {size} were written"
        if digest is not None and hashlib.sha256(file.read_bytes()).hexdigest() != digest:
            return f"{name} is not what was written (checksum)"
    return None


def save_step(out_dir: Path, step: int, model, optimizer, scheduler, *, sampler: random.Random | None,
              keep_last: int, extra: dict | None = None) -> Path:
    """A resumable checkpoint of this step, written by every rank; returns its folder."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    check_finite(model, f"step {step}")
    out_dir = Path(out_dir)
    final, staging = out_dir / f"step_{step}", out_dir / f".tmp-step_{step}"
    if dist.is_main():
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    dist.barrier()
    model_state, optim_state = get_state_dict(model, optimizer)
    needed = _bytes_of([model_state, optim_state])
    with _quiet_single_process(), _no_room(staging, needed):
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(staging / "state"),
                 no_dist=not torch.distributed.is_initialized())
        torch.save({"step": step, "scheduler": scheduler.state_dict(), "rng": rng_state(sampler), **(extra or {})},
                   staging / f"rank{dist.rank()}.pt")
    dist.barrier()
    if dist.is_main():
        with _no_room(staging, needed):
            (staging / META_FILE).write_text(json.dumps({"step": step, "world_size": dist.world_size(),
                                                         "files": manifest(staging)}))
        shutil.rmtree(final, ignore_errors=True)
        staging.rename(final)
        for _, old in step_dirs(out_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def load_step(path: Path, model, optimizer, scheduler, *, sampler: random.Random | None) -> dict:
    """Restore model, optimizer, scheduler and RNG from a step folder; returns this rank's trainer state."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    path = Path(path)
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optim": optim_state}
    with _quiet_single_process():
        dcp.load(state, checkpoint_id=str(path / "state"), no_dist=not torch.distributed.is_initialized())
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    saved_world = json.loads((path / META_FILE).read_text())["world_size"]
    own = path / f"rank{dist.rank()}.pt"
    trainer = torch.load(own if own.is_file() else path / "rank0.pt", weights_only=True)
    scheduler.load_state_dict(trainer["scheduler"])
    if saved_world == dist.world_size():
        restore_rng(trainer["rng"], sampler)
    elif dist.is_main():
        print(f"aopd: {path} was written at world size {saved_world}, now {dist.world_size()}: weights and "
              "optimizer are resharded; random streams restart from the checkpoint's rank 0")
        restore_rng(trainer["rng"], sampler)
    return trainer


@contextmanager
def _quiet_single_process():
    """DCP warns that one process means one process; that is the lab's normal case."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


@contextmanager
def _no_room(staging: Path, needed: int):
    """A write that fails for want of room (`needed` bytes; DCP says so as `unexpected pos`, not ENOSPC) or
    on a vanished folder is one line naming the folder and its free space; the partial checkpoint is removed,
    the newest whole one kept for the rerun."""
    try:
        yield
    except (KeyboardInterrupt, Interrupted):
        raise
    except BaseException as err:  # DCP's CheckpointException is a BaseException
        free = shutil.disk_usage(_existing(staging)).free
        full = getattr(err, "errno", None) == errno.ENOSPC or free < needed
        if not full and not isinstance(err, OSError):
            raise
        shutil.rmtree(staging, ignore_errors=True)
        name, out_dir = staging.name.removeprefix(".tmp-").split("-")[0], staging.parent
        steps = step_dirs(out_dir)
        kept = (f"{steps[-1][1].name}, the newest whole checkpoint, is kept: make room and rerun the same command to "
                "resume from it") if steps else "no step checkpoint was written before it: a rerun starts afresh"
        why = f"its disk is full ({human_size(free)} free, it needs about {human_size(needed)})" if full \
            else (err.strerror or str(err))
        raise UserError(f"cannot write the checkpoint {name} in {out_dir}: {why}; the partial {name} is removed and "
                        f"{kept}") from None


def _existing(path: Path) -> Path:
    while not path.exists():
        path = path.parent
    return path


def _bytes_of(state) -> int:
    """Bytes of the tensors in a (nested) state dict: what a checkpoint of it takes on disk, roughly."""
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    if isinstance(state, dict):
        return sum(_bytes_of(value) for value in state.values())
    if isinstance(state, (list, tuple)):
        return sum(_bytes_of(value) for value in state)
    return 0


def human_size(count: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20)):
        if count >= size:
            return f"{count / size:.1f} {unit}"
    return f"{count / 2**10:.1f} KiB"


# ---------------------------------------------------------------- final checkpoints
def full_state_dict(model) -> dict[str, torch.Tensor]:
    """The whole model's weights on the CPU (gathered from the shards; rank 0 gets them)."""
    if not dist.is_sharded(model):
        return {name: tensor.detach().cpu() for name, tensor in model.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_final(policy, directory: Path, *, config_yaml: str, optimizer=None, scheduler=None, step: int = 0) -> Path:
    """Weights (safetensors), tokenizer, resolved config (and optionally the training state), written to a
    temporary folder and renamed into place by rank 0: a crash never leaves a half checkpoint there."""
    directory = Path(directory)
    weights = full_state_dict(policy.model)
    if dist.is_main():
        check_finite_tensors(weights, str(directory))
        # in the dtype the student was loaded in (student.dtype: bf16 on GPUs), as the base checkpoint was:
        # the fp32 master weights are the optimizer's, and live on in the step checkpoints only
        weights = {name: tensor.to(policy.compute_dtype) if tensor.is_floating_point() else tensor
                   for name, tensor in weights.items()}
        directory.parent.mkdir(parents=True, exist_ok=True)
        staging = directory.with_name(f".tmp-{directory.name}-{os.getpid()}")
        shutil.rmtree(staging, ignore_errors=True)
        with _no_room(staging, _bytes_of(weights)):
            policy.model.save_pretrained(staging, state_dict=weights, safe_serialization=True)
            _say_dtype(staging / "config.json", policy.compute_dtype)
            policy.tokenizer.save_pretrained(staging)
            (staging / CONFIG_FILE).write_text(config_yaml)
            state = {"step": step, "torch_rng": torch.get_rng_state(), "python_rng": random.getstate()}
            if optimizer is not None and not dist.is_sharded(policy.model):  # sharded state lives in step_N
                state |= {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}
            torch.save(state, staging / STATE_FILE)
        old = directory.with_name(f".old-{directory.name}-{os.getpid()}")
        if directory.is_symlink():
            directory.unlink()
        elif directory.exists():
            directory.rename(old)
        staging.rename(directory)
        shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return directory


def _say_dtype(config_file: Path, dtype: torch.dtype) -> None:
    """The saved config names the weights' dtype (the model object itself holds fp32 masters)."""
    config = json.loads(config_file.read_text())
    name = str(dtype).removeprefix("torch.")
    config.update({key: name for key in ("dtype", "torch_dtype") if key in config} or {"dtype": name})
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def load_weights(model, directory: Path) -> None:
    """The weights of a final (HF) checkpoint into `model`, sharded or not."""
    from safetensors.torch import load_file

    weights = {}
    for shard in sorted(Path(directory).glob("*.safetensors")):
        weights.update(load_file(shard))
    if dist.is_sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True, strict=False))
    else:
        model.load_state_dict(weights, strict=False)  # a tied lm_head.weight is not in the file


def load_training_state(directory: Path) -> dict:
    return torch.load(Path(directory) / STATE_FILE, weights_only=True)


def check_finite(model, where: str) -> None:
    bad = [name for name, p in model.named_parameters() if not bool(torch.isfinite(_local(p)).all())]
    flags = dist.all_reduce([float(bool(bad))], "max")
    if flags[0]:
        raise UserError(f"refusing to write the checkpoint at {where}: non-finite weights "
                        f"({', '.join(bad[:3]) or 'on another rank'}); the last good checkpoint is kept")


def check_finite_tensors(weights: dict[str, torch.Tensor], where: str) -> None:
    bad = [name for name, tensor in weights.items() if tensor.is_floating_point() and not torch.isfinite(tensor).all()]
    if bad:
        raise UserError(f"refusing to write {where}: non-finite weights ({', '.join(bad[:3])})")


def _local(tensor):
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


# ---------------------------------------------------------------- checks and tidying
def checkpoint_problem(directory: Path) -> str | None:
    """Why `directory` is not a whole HF checkpoint (missing config, truncated safetensors), or None."""
    directory = Path(directory)
    if not (directory / "config.json").is_file():
        return f"no config.json in {directory}"
    shards = sorted(directory.glob("*.safetensors"))
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            wanted = set(json.loads(index.read_text())["weight_map"].values())
        except (ValueError, KeyError) as err:
            return f"{index}: unreadable ({err})"
        missing = sorted(wanted - {p.name for p in shards})
        if missing:
            return f"{directory}: missing weight file {missing[0]}"
    if not shards and not list(directory.glob("*.bin")):
        return f"no weights (*.safetensors) in {directory}"
    for shard in shards:
        problem = _safetensors_problem(shard)
        if problem:
            return problem
    return None


def _read_header(path: Path) -> tuple[int, dict] | None:
    """(header length, the JSON header: names, dtypes, shapes, offsets) of a safetensors file, or None."""
    try:
        with open(path, "rb") as handle:
            (header_len,) = struct.unpack("<Q", handle.read(8))
            if header_len > path.stat().st_size:
                return None
            return header_len, json.loads(handle.read(header_len))
    except (struct.error, ValueError, UnicodeDecodeError):
        return None


def safetensors_header(path: Path) -> dict:
    read = _read_header(path)
    return {} if read is None else read[1]


def _safetensors_problem(path: Path) -> str | None:
    size, read = path.stat().st_size, _read_header(path)
    if read is None:
        return f"{path}: truncated or not a safetensors file"
    header_len, header = read
    end = max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"), default=0)
    if 8 + header_len + end != size:
        return f"{path}: truncated ({size} bytes, the header says {8 + header_len + end})"
    return None


def tidy(out_dir: Path) -> None:
    """Remove what an interrupted writer left (`.tmp-*`, `.old-*`): never whole, never loaded."""
    for path in Path(out_dir).glob(".*"):
        if path.name.startswith((".tmp-", ".old-")) and path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
