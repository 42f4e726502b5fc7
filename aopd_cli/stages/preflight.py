"""Everything a stage needs, checked before it starts (before any model loads and anything is written):
its input files and checkpoints (present, and whole: a truncated safetensors is caught here), an output
folder it can write, room on disk for one checkpoint, and a tracking store that answers. Each problem is
one line naming the key or file.

    aopd distill data.source=./nowhere.jsonl
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from aopd_cli.config.paths import input_problem, local_inputs, names_a_path
from aopd_cli.errors import ConfigError, UserError
from aopd_cli.training.checkpoints import checkpoint_problem


def check_inputs(config) -> None:
    """Data and benchmark paths the config names (present, else ConfigError), checkpoints (present and
    whole, else UserError: they are made by runs)."""
    for key, value, role in local_inputs(config):
        if not names_a_path(value):
            continue
        problem = input_problem(key, value, role)
        if problem:
            raise (UserError if role == "checkpoint" else ConfigError)(problem)
        if role == "checkpoint":
            broken = checkpoint_problem(Path(value).expanduser())
            if broken:
                raise UserError(f"{key}={value}: not a whole checkpoint: {broken}")


def _existing_ancestor(path: Path) -> Path:
    path = path.resolve()
    while not path.exists():
        path = path.parent
    return path


def checkpoint_bytes(config) -> int:
    """One step checkpoint of the student: fp32 weights and two AdamW moments."""
    model = config.student
    if model.arch is not None:
        arch = model.arch
        per_layer = 4 * arch.hidden_size * arch.num_heads * arch.head_dim + 3 * arch.hidden_size * arch.intermediate_size
        params = arch.num_layers * per_layer + 128 * arch.hidden_size
    else:
        path = Path(model.path).expanduser()
        if not names_a_path(model.path) or not path.is_dir():
            return 0  # a hub model: its size is known once downloaded
        params = sum(f.stat().st_size for f in path.glob("*.safetensors")) // 2  # bf16 on disk, as a floor
    return params * 4 * 3


def check_output(config, training: bool) -> None:
    out_dir = Path(config.output_dir)
    ancestor = _existing_ancestor(out_dir)
    if not ancestor.is_dir() or not os.access(ancestor, os.W_OK | os.X_OK):
        raise UserError(f"output_dir={config.output_dir}: cannot write there ({ancestor} is not a writable folder)")
    if training:
        needed, free = checkpoint_bytes(config), shutil.disk_usage(ancestor).free
        if needed > free:
            raise UserError(f"output_dir={config.output_dir}: {_size(free)} free on its disk, one checkpoint needs about "
                            f"{_size(needed)}")


def _size(count: int) -> str:
    return f"{count / 2**30:.1f} GiB" if count >= 2**30 else f"{count / 2**20:.1f} MiB"


def check_tracking(config) -> None:
    if config.tracking.enabled:
        from aopd_cli.tracking.store import connect

        connect(config.tracking.uri)


def preflight(config) -> None:
    check_inputs(config)
    check_output(config, training=config.stage != "eval")
    check_tracking(config)
