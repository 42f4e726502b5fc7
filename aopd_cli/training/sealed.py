"""A cached checkpoint is reused only while its files are as they were written. The stage's own folder
shows a reused warm-up as a link into the cache, so an edit made through that link (or through a `cp -a`
of it, which copies the link) changes the cache that every later run would reuse: `seal` records the
files (sizes; checksums of the small ones, times of the large ones) inside the folder when it is stored,
and `reusable` sets a changed folder aside under a new name (the edits are kept, never deleted) and says
so, so that it is trained again. A cache an earlier aopd wrote, without a record, is recorded as it is.

    python -m pytest tests/test_model_folders.py -q -k cached
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from aopd_cli.progress import say
from aopd_cli.training import distributed as dist
from aopd_cli.training.checkpoints import checkpoint_problem, manifest

SEAL_FILE = ".aopd_files.json"


def seal(folder: Path) -> None:
    (Path(folder) / SEAL_FILE).write_text(json.dumps(manifest(folder, skip=SEAL_FILE, times=True)))


def seal_problem(folder: Path) -> str | None:
    """What differs from what was written in a sealed folder (the first file), or None (also when unsealed)."""
    try:
        written = json.loads((Path(folder) / SEAL_FILE).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return f"{SEAL_FILE} is damaged"
    now = manifest(folder, skip=SEAL_FILE, times=True)
    for name in sorted(written.keys() | now.keys()):
        if name not in now:
            return f"{name} was removed"
        if name not in written:
            return f"{name} was added"
        if now[name] != written[name]:
            return f"{name} was changed"
    return None


def reusable(cached: Path, what: str) -> bool:
    """True for a whole cached checkpoint whose files are as they were written. One that is not is renamed
    `<name>.changed-<time>` beside it (by rank 0), with a warning naming it, and the caller trains again."""
    if not Path(cached).exists():
        return False
    problem = checkpoint_problem(cached) or seal_problem(cached)
    if problem is None and not (cached / SEAL_FILE).is_file():
        # an earlier aopd wrote it, unrecorded: retraining a real model's warm-up costs hours, so it is taken as
        # it is now (and recorded), and the user is told how to have it trained again
        if dist.is_main():
            seal(cached)
            say(f"note: the cached {what} {cached} has no record of its files (an earlier aopd wrote it): it is "
                "reused as it is and recorded now; delete it to have it trained again")
        dist.barrier()
        return True
    if problem is None:
        return True
    if dist.is_main():
        aside = cached.with_name(f"{cached.name}.changed-{time.strftime('%Y%m%d-%H%M%S')}")
        cached.rename(aside)
        say(f"warning: the cached {what} {cached} is not as it was written ({problem}): it is kept as {aside} and "
            "trained again (a stage's checkpoint of a cached stage is a link into the cache: copy it with cp -rL "
            "before editing)")
    dist.barrier()
    return False
