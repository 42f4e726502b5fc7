"""Which fields of a validated stage config name local files or folders, and which of those are missing.

`missing_inputs(config, made_upstream)` lists, one line each, the checkpoints (`student.path`,
`teacher.path`, `base.path`), chat template files (`student.chat_template=./t.jinja`), data files
(`data.source`, `tool_data.source`) and benchmark files (`eval.benchmarks`, `eval.tool_benchmarks`) that a
stage would read and that are not there, leaving out the paths in `made_upstream` (checkpoints an earlier
stage of the same pipeline writes). A value is a local path when it starts with `./`, `../`, `/` or `~`,
ends in a data, weights or template suffix (`.jsonl`, ...) or has more than one `/`; `org/name` is a hub
id and a known dataset name (`deepmath`, `lab_math`, `toolalpaca`, ...) is neither. `aopd show` refuses a
config with missing inputs (exit 2) before anything runs.

    aopd show distill data.source=/tmp/nope.jsonl
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Literal

from aopd_cli.data.prompts import CHAT_TEMPLATES

DATA_SUFFIXES = (".jsonl", ".json", ".parquet")  # what data/loaders.py reads from a file
FILE_SUFFIXES = {*DATA_SUFFIXES, ".csv", ".txt", ".arrow", ".safetensors", ".bin", ".pt", ".gguf", ".jinja", ".j2"}
# names the loaders resolve themselves (the cache, a hub mirror): never a path to check here
TOOL_NAMES = {"toolalpaca", "toolalpaca_real", "lab_tools"}
Role = Literal["checkpoint", "data", "benchmark", "template"]


def known_names() -> set[str]:
    from aopd_cli.data.loaders import KNOWN

    return {*KNOWN, "lab_math", *TOOL_NAMES}


def looks_local(value: str) -> bool:
    """A path rather than a hub id: `./x`, `../x`, `/x`, `~/x`, `x.jsonl`, or `a/b/c` (`org/name` is a hub id)."""
    return (value.startswith(("./", "../", "/", "~")) or value in (".", "..")
            or Path(value).suffix.lower() in FILE_SUFFIXES or value.count("/") > 1)


def names_a_path(value: str) -> bool:
    """A local path (existing, or shaped like one), not a known dataset name or a hub id."""
    return value not in known_names() and (looks_local(value) or Path(value).expanduser().exists())


def local_inputs(config) -> list[tuple[str, str, Role]]:
    """(dotted key, value, role) of every field of `config` that may name a local path."""
    found: list[tuple[str, str, Role]] = []
    for role_name in ("student", "teacher", "base"):
        model = getattr(config, role_name, None)
        if model is not None and model.path:
            found.append((f"{role_name}.path", model.path, "checkpoint"))
        if model is not None and model.chat_template and model.chat_template not in CHAT_TEMPLATES:
            found.append((f"{role_name}.chat_template", model.chat_template, "template"))
    for data_name in ("data", "tool_data"):
        data = getattr(config, data_name, None)
        if data is not None:
            found.append((f"{data_name}.source", data.source, "data"))
    evaluation = getattr(config, "eval", None)
    if evaluation is not None:
        found += [("eval.benchmarks", b, "benchmark") for b in evaluation.benchmarks]
        found += [("eval.tool_benchmarks", b, "benchmark") for b in evaluation.tool_benchmarks]
    return found


STAGE_DATA_KIND = {"warmup": "sft", "distill": "prompts", "continual": "tool_train"}  # what `data.source` holds


def data_sources(config) -> list[tuple[str, str, str, str | None]]:
    """(key, source, kind, split) of every dataset `config` reads: its training data, tool data and
    benchmarks (kinds as `data.loaders.load_records` names them)."""
    found = []
    for name, kind in (("data", STAGE_DATA_KIND.get(config.stage)), ("tool_data", "tool_train")):
        data = getattr(config, name, None)
        if data is not None and kind:
            found.append((f"{name}.source", data.source, kind, data.split))
    evaluation = getattr(config, "eval", None)
    if evaluation is not None:
        found += [("eval.benchmarks", b, "math_benchmark", None) for b in evaluation.benchmarks]
        found += [("eval.tool_benchmarks", b, "tool_eval", None) for b in evaluation.tool_benchmarks]
    return found


def input_problem(key: str, value: str, role: Role) -> str | None:
    path = Path(value).expanduser()
    if role == "checkpoint":
        if not path.exists():
            return f"{key}: no checkpoint at {value!r} (a folder with config.json, or a hub id like org/name)"
        if not (path / "config.json").is_file():
            return f"{key}: {value!r} is not a checkpoint (no config.json in it)"
        return None
    if not path.exists():
        what = {"data": "data file or folder", "template": "chat template file"}.get(role, "benchmark file")
        return f"{key}: no {what} at {value!r}"
    if path.is_file() and role == "data" and path.suffix.lower() not in DATA_SUFFIXES:
        return f"{key}: {value!r} is not a .jsonl, .json or .parquet file"
    return None


def missing_inputs(config, made_upstream: Iterable[Path] = ()) -> list[str]:
    """One line per local input of `config` that is missing, unless an upstream stage makes it."""
    made = {Path(p).expanduser().resolve() for p in made_upstream}
    problems = []
    for key, value, role in local_inputs(config):
        if not names_a_path(value):
            continue  # a known dataset or a hub id: the loaders fetch it
        if Path(value).expanduser().resolve() in made:
            continue
        problem = input_problem(key, value, role)
        if problem:
            problems.append(problem)
    return problems


def checkpoint_of(config) -> Path:
    """Where a stage leaves its checkpoint: its own folder (a reused warm-up is a link to the cache there)."""
    return Path(config.output_dir) / "checkpoint"


def checkpoints_made(config) -> set[Path]:
    """The checkpoint folders a training stage writes (its output's `checkpoint/`, and a cached warm-up's
    cache folder, where `@stage` references point); an eval stage writes none."""
    return set() if config.stage == "eval" else {checkpoint_of(config)}


def plan_missing(configs: dict[str, object]) -> list[str]:
    """`missing_inputs` for every stage of a pipeline plan (stage name -> config, in order): a checkpoint
    written by an earlier stage counts as present."""
    made: set[Path] = set()
    problems = []
    for name, config in configs.items():
        problems += [f"{name}: {p}" for p in missing_inputs(config, made)]
        made |= checkpoints_made(config)
    return problems
