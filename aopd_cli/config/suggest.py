"""One rule for "did you mean": whatever name a user gets wrong (a key, a group option, an experiment, a
stage, a group to list, a swept key), the suggestion is the closest allowed name, compared without case,
and a short name is matched to the dotted key it ends (`tau` -> `objective.tau`).

    python -c "from aopd_cli.config.suggest import did_you_mean; print(did_you_mean('tua', ['objective.tau']))"
"""

from __future__ import annotations

import difflib
from typing import Iterable

CUTOFF = 0.6  # difflib's similarity a suggestion needs


def closest(name: str, allowed: Iterable[str]) -> str | None:
    """The allowed name `name` most likely meant, or None."""
    allowed = list(dict.fromkeys(allowed))
    if not name or not allowed:
        return None
    lowered = {option.lower(): option for option in allowed}
    if name.lower() in lowered:  # AOPD -> aopd
        return lowered[name.lower()]
    ends = {}  # the last part of a dotted key -> the key (tau -> objective.tau), when only one key ends so
    for option in allowed:
        last = option.rpartition(".")[2].lower()
        ends[last] = None if last in ends and ends[last] != option else option
    if ends.get(name.lower()):
        return ends[name.lower()]
    candidates = {**lowered, **{last: key for last, key in ends.items() if key}}
    found = difflib.get_close_matches(name.lower(), list(candidates), n=1, cutoff=CUTOFF)
    return candidates[found[0]] if found else None


def did_you_mean(name: str, allowed: Iterable[str]) -> str:
    """` (did you mean 'x'?)`, or nothing when no allowed name is close."""
    found = closest(name, allowed)
    return f" (did you mean {found!r}?)" if found is not None and found != name else ""
