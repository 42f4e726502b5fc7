"""Loaders for the real datasets (`../shared/reference/datasets.md`), normalised into plain records.

`load_records(kind, source, config=None, split=None)`: `source` is a known name (openthoughts,
openthoughts3, deepmath, toolalpaca, aime24, aime25, hmmt25, lab_math, lab_tools, the lab's development
splits lab_math_dev, lab_tools_dev and its students' scrambled tool text lab_tools_generic), a hub id (through
`datasets.load_dataset`), or a local path: a .jsonl/.json/.parquet file, a folder laid out like the hub
repo, or a ToolAlpaca `data/` folder. Kinds and records:

- sft: {"messages": [{"role", "content"}, ...]}
- prompts: {"id", "problem", "answer", "difficulty", "topic", "reference"}
- math_benchmark: {"id", "problem", "answer"} (answer always a string)
- tool_train: {"id", "api", "functions", "instruction", "steps": [{thought, action, action_input,
  observation}], "final_thought", "output"}
- tool_eval: {"id", "api", "functions", "instruction", "golden": [{"action", "action_input", "observation"}]}
  (observation: None unless the file gives one, as the lab's do)

    python -m pytest tests/test_data.py -q
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any, Callable, Literal

from aopd_cli.errors import UserError

Kind = Literal["sft", "prompts", "math_benchmark", "tool_train", "tool_eval"]
TOOL_FILES = {"tool_train": "train_data.json", "simulated": "eval_simulated.json", "real": "eval_real.json"}

# name -> (hub id, configs, split); several configs are concatenated (opencompass AIME 2025 I + II)
KNOWN: dict[str, tuple[str, list[str | None], str]] = {
    "openthoughts": ("open-thoughts/OpenThoughts-114k", ["default"], "train"),
    "openthoughts3": ("open-thoughts/OpenThoughts3-1.2M", ["default"], "train"),
    "deepmath": ("zwhe99/DeepMath-103K", ["default"], "train"),
    "aime24": ("HuggingFaceH4/aime_2024", ["default"], "train"),
    "aime25": ("opencompass/AIME2025", ["AIME2025-I", "AIME2025-II"], "test"),
    "hmmt25": ("MathArena/hmmt_feb_2025", ["default"], "train"),
}
LAB_PATHS = {("lab_math", "sft"): "math/openthoughts", ("lab_math", "prompts"): "math/deepmath",
             ("lab_math", "math_benchmark"): "math/aime", ("lab_tools", "tool_train"): "tools",
             ("lab_tools", "tool_eval"): "tools", ("lab_math_dev", "math_benchmark"): "math/aime_dev",
             ("lab_tools_dev", "tool_eval"): "tools_dev", ("lab_tools_generic", "tool_train"): "tools_generic"}


class BadRow(ValueError):
    def __init__(self, field: str, problem: str):
        super().__init__(f"field {field!r}: {problem}")


def load_records(kind: Kind, source: str, *, config: str | None = None, split: str | None = None,
                 on_bad_row: Literal["raise", "skip"] = "raise") -> list[dict]:
    rows, where = _raw_rows(kind, source, config, split)
    normalise = NORMALISERS[kind]
    records, skipped = [], 0
    for index, row in enumerate(rows):
        try:
            records += normalise(row, index)
        except BadRow as err:
            if on_bad_row == "raise":
                raise UserError(f"{where}: row {index}: {err} (data.on_bad_row=skip skips such rows)") from None
            skipped += 1
    if skipped:
        print(f"aopd: skipped {skipped} malformed row(s) of {where}", file=sys.stderr)
    return records


def source_files(kind: Kind, source: str, split: str | None = None) -> list[Path] | None:
    """The local files `source` is read from (a lab dataset's generated files, a ToolAlpaca folder's file,
    a local file or folder), for a fingerprint of their content; None for a hub dataset."""
    if (source, kind) in LAB_PATHS:
        from aopd_cli.data.lab import ensure_lab

        path = ensure_lab() / LAB_PATHS[(source, kind)]
    elif source in ("toolalpaca", "toolalpaca_real"):
        from aopd_cli.data.lab import cache_root

        path = cache_root() / "toolalpaca"
    elif source in KNOWN:
        return None
    else:
        path = Path(source).expanduser()
    if not path.exists():
        return None
    if path.is_dir() and kind in ("tool_train", "tool_eval"):
        name = TOOL_FILES["tool_train"] if kind == "tool_train" else TOOL_FILES.get(split or "simulated", "")
        return [path / name] if (path / name).is_file() else []
    return [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())


def _raw_rows(kind: Kind, source: str, config, split) -> tuple[list[dict], str]:
    if source in {name for name, _ in LAB_PATHS}:
        from aopd_cli.data.lab import ensure_lab

        if (source, kind) not in LAB_PATHS:
            raise UserError(f"data source {source!r} has no {kind!r} data")
        return _raw_rows(kind, str(ensure_lab() / LAB_PATHS[(source, kind)]), config, split)
    if source in ("toolalpaca", "toolalpaca_real"):
        from aopd_cli.data.lab import cache_root

        folder = cache_root() / "toolalpaca"
        if not folder.is_dir():
            raise UserError(f"ToolAlpaca has no hub mirror: clone github.com/tangqiaoyu/ToolAlpaca and pass its "
                            f"data/ folder as the source, or copy it to {folder}")
        return _raw_rows(kind, str(folder), config, split or ("real" if source.endswith("real") else None))
    path = Path(source).expanduser()
    if kind in ("tool_train", "tool_eval"):
        if path.is_dir():
            name = TOOL_FILES["tool_train"] if kind == "tool_train" else TOOL_FILES.get(split or "simulated")
            if name is None:
                raise UserError(f"ToolAlpaca split must be simulated or real, got {split!r}")
            path = path / name
        if not path.is_file():
            raise UserError(f"no ToolAlpaca file at {path}")
        try:
            apis = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise UserError(f"{path}: not valid JSON ({err})") from None
        if not isinstance(apis, list):
            raise UserError(f"{path}: expected a JSON array of API records, got {type(apis).__name__}")
        return apis, str(path)
    if source in KNOWN:
        hub_id, configs, default_split = KNOWN[source]
        return _load_hub(hub_id, [config] if config else configs, split or default_split), source
    if path.exists():
        return _load_local(path, config, split), str(path)
    return _load_hub(source, [config], split or "train"), source


def _load_local(path: Path, config, split) -> list[dict]:
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    if path.is_file():
        builder = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}.get(path.suffix)
        if builder is None:
            raise UserError(f"{path}: expected a .jsonl, .json or .parquet file")
        if path.suffix == ".jsonl":
            _check_jsonl(path)
        elif path.suffix == ".json":
            _check_json(path)
        try:
            rows = list(datasets.load_dataset(builder, data_files=str(path), split="train"))
        except Exception as err:  # noqa: BLE001 - a corrupt file: one line naming it
            cause = err.__cause__ or err
            raise UserError(f"{path}: cannot read it as {builder} ({type(cause).__name__}: {str(cause)[:200]})") from None
        if not rows:
            raise UserError(f"{path}: no rows")
        return rows
    return _load_hub(str(path), [config], split or "train", cache_dir=_local_cache_dir(path))


def _check_jsonl(path: Path) -> None:
    """One JSON object per line: an empty file or a malformed line is named by its line number."""
    seen = False
    with open(path, encoding="utf-8", errors="replace") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise UserError(f"{path}: line {number}: not valid JSON ({err.msg} at column {err.colno})") from None
            if not isinstance(row, dict):
                raise UserError(f"{path}: line {number}: expected a JSON object, got {type(row).__name__}")
            seen = True
    if not seen:
        raise UserError(f"{path}: empty (no rows)")


def _check_json(path: Path) -> None:
    """A JSON file of rows: an empty array is "no rows", not the datasets library's error."""
    try:
        rows = json.loads(path.read_text(errors="replace"))
    except json.JSONDecodeError:
        return  # JSON lines under a .json name, or broken: the datasets library says which
    if isinstance(rows, list) and not rows:
        raise UserError(f"{path}: no rows (an empty JSON array)")


def _local_cache_dir(folder: Path) -> str:
    """A datasets cache of its own for this folder's content. datasets caches a local folder under its
    name, not its path or content: another folder of the same name (a regenerated lab, another lab
    version, a test's copy) would read back the first one's rows."""
    import hashlib

    import datasets

    digest = hashlib.sha256(str(folder.resolve()).encode())
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        stat = file.stat()
        digest.update(f"{file.relative_to(folder)}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return str(Path(datasets.config.HF_DATASETS_CACHE) / "aopd-local" / digest.hexdigest()[:16])


def _load_hub(source: str, configs: list, split: str, cache_dir: str | None = None) -> list[dict]:
    import datasets

    datasets.disable_progress_bars()
    rows: list[dict] = []
    for name in configs:
        try:
            rows += list(datasets.load_dataset(source, name, split=split, cache_dir=cache_dir))
        except Exception as err:  # noqa: BLE001 - offline, missing config, bad split: one clear message
            raise UserError(f"cannot load dataset {source!r} (config {name!r}, split {split!r}): "
                            f"{type(err).__name__}: {str(err)[:300]}") from None
    return rows


# ---------------------------------------------------------------- field access
def _field(row: dict, *names: str, kind: type | tuple = str, optional: bool = False) -> Any:
    """The first of `names` in `row`, checked to be of `kind`; a required text may not be empty."""
    if not isinstance(row, dict):
        raise BadRow("/".join(names), f"the record is a {type(row).__name__}, not an object")
    for name in names:
        if name in row and row[name] is not None:
            value = row[name]
            if not isinstance(value, kind) or isinstance(value, bool) and bool not in _kinds(kind):
                wanted = " or ".join(k.__name__ for k in _kinds(kind))
                raise BadRow(name, f"expected {wanted}, got {type(value).__name__}")
            if isinstance(value, str) and not value.strip() and not optional:
                raise BadRow(name, "empty")
            return value
    if optional:
        return None
    raise BadRow("/".join(names), "missing")


def _kinds(kind: type | tuple) -> tuple:
    return kind if isinstance(kind, tuple) else (kind,)


ROLE_MAP = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant", "system": "system"}
THOUGHT_RE = re.compile(r"<\|begin_of_thought\|>(.*?)<\|end_of_thought\|>", re.S)
SOLUTION_RE = re.compile(r"<\|begin_of_solution\|>(.*?)<\|end_of_solution\|>", re.S)


def openthoughts_to_think(text: str) -> str:
    """OpenThoughts-114k markers -> Qwen3's `<think>` block followed by the solution."""
    thought, solution = THOUGHT_RE.search(text), SOLUTION_RE.search(text)
    if not thought and not solution:
        return text
    body = (solution.group(1) if solution else SOLUTION_RE.sub("", THOUGHT_RE.sub("", text))).strip()
    return f"<think>\n{thought.group(1).strip() if thought else ''}\n</think>\n\n{body}"


def _sft(row: dict, index: int) -> list[dict]:
    turns = _field(row, "conversations", "messages", kind=list)
    messages = []
    system = _field(row, "system", optional=True)
    if system:
        messages.append({"role": "system", "content": system})
    for turn in turns:
        if not isinstance(turn, dict):
            raise BadRow("conversations", f"expected a list of turns, got {type(turn).__name__}")
        role = ROLE_MAP.get(_field(turn, "from", "role"))
        if role is None:
            raise BadRow("conversations.from", f"unknown role {turn.get('from', turn.get('role'))!r}")
        content = _field(turn, "value", "content")
        messages.append({"role": role, "content": openthoughts_to_think(content) if role == "assistant" else content})
    if not any(m["role"] == "assistant" for m in messages):
        raise BadRow("conversations", "no assistant turn")
    return [{"messages": messages}]


def _r1_to_think(solution: str | None) -> str | None:
    # DeepMath's r1 solutions have no opening <think>: "{thinking}</think>{answer}"
    if not solution:
        return None
    thinking, sep, answer = solution.partition("</think>")
    return f"<think>\n{thinking.strip()}\n</think>\n\n{answer.strip()}" if sep else solution


def _prompts(row: dict, index: int) -> list[dict]:
    difficulty = _field(row, "difficulty", kind=(int, float), optional=True)
    return [{
        "id": str(_field(row, "id", kind=(int, str), optional=True) or index),
        "problem": _field(row, "question", "problem"),
        "answer": str(_field(row, "final_answer", "answer", kind=(str, int, float))),
        "difficulty": float(difficulty) if difficulty is not None else None,
        "topic": _field(row, "topic", optional=True),
        "reference": _r1_to_think(_field(row, "r1_solution_1", optional=True)),
    }]


def _math_benchmark(row: dict, index: int) -> list[dict]:
    ident = _field(row, "id", "ID", "problem_idx", kind=(int, str), optional=True)
    return [{
        "id": str(ident if ident is not None else index),
        "problem": _field(row, "problem", "question", "Problem"),
        "answer": str(_field(row, "answer", "Answer", kind=(str, int, float))).strip(),
    }]


def _functions(api: dict) -> dict[str, str]:
    described = _field(api, "Function_Description", kind=(dict, str))
    if isinstance(described, str):
        try:
            described = json.loads(described)
        except json.JSONDecodeError:
            raise BadRow("Function_Description", "unparsable JSON") from None
    if not isinstance(described, dict):
        raise BadRow("Function_Description", f"expected an object of function name -> description, got "
                                             f"{type(described).__name__}")
    functions = {name: text for name, text in described.items() if name != "components"}
    if not functions or not all(isinstance(text, str) for text in functions.values()):
        raise BadRow("Function_Description", "expected at least one function, each described by a string")
    return functions


def _tool_train(api: dict, index: int) -> list[dict]:
    name, functions = _field(api, "Name"), _functions(api)
    records = []
    for i, instance in enumerate(_field(api, "Instances", kind=list)):
        steps = instance.get("intermediate_steps") if isinstance(instance, dict) else None
        if steps is not None and not isinstance(steps, list):
            raise BadRow("Instances.intermediate_steps", f"instance {i}: expected a list, got {type(steps).__name__}")
        parsed = []
        for step in steps or []:
            try:
                (action, action_input, log), observation = step
            except (TypeError, ValueError):
                raise BadRow("Instances.intermediate_steps",
                             f"instance {i}: expected [[action, input, log], observation], got {step!r:.60}") from None
            if not isinstance(action, str) or not action.strip():
                raise BadRow("Instances.intermediate_steps", f"instance {i}: the action is not a name: {action!r:.60}")
            thought = log[1:].split("\nAction:")[0].strip() if isinstance(log, str) else ""
            parsed.append({"thought": thought, "action": action, "action_input": action_input,
                           "observation": str(observation)})
        # the skips of ToolAlpaca's build_dataset.py: failed, over 5 steps, or only getDetails
        if not parsed or "error" in instance or len(parsed) > 5 or all(p["action"] == "getDetails" for p in parsed):
            continue
        records.append({"id": f"{name}-{i}", "api": name, "functions": functions,
                        "instruction": _field(instance, "input").rsplit("\nHint: ", 1)[0],
                        "steps": parsed, "final_thought": instance.get("Final Thought", ""),
                        "output": instance.get("output", "")})
    return records


def _tool_eval(api: dict, index: int) -> list[dict]:
    name, functions = _field(api, "Name"), _functions(api)
    instructions = _field(api, "Instructions", kind=list)
    golden = _field(api, "Golden_Answers", kind=list)
    if len(golden) != len(instructions):
        raise BadRow("Golden_Answers", f"{len(golden)} answers for {len(instructions)} instructions")
    records = []
    for i, (instruction, steps) in enumerate(zip(instructions, golden)):
        if not isinstance(instruction, str) or not instruction.strip():
            raise BadRow("Instructions", f"instruction {i}: expected a non-empty string, got {instruction!r:.60}")
        if not isinstance(steps, list) or not all(isinstance(s, dict) and "Action" in s for s in steps):
            raise BadRow("Golden_Answers", f"instruction {i}: expected a list of {{Action, Action_Input}}")
        # `Observation` is the lab's addition (ToolAlpaca's files have none): fed back in multi-turn evaluation
        records.append({"id": f"{name}-{i}", "api": name, "functions": functions, "instruction": instruction,
                        "golden": [{"action": s["Action"], "action_input": s.get("Action_Input", ""),
                                    "observation": s.get("Observation")} for s in steps]})
    return records


NORMALISERS: dict[str, Callable[[dict, int], list[dict]]] = {
    "sft": _sft, "prompts": _prompts, "math_benchmark": _math_benchmark,
    "tool_train": _tool_train, "tool_eval": _tool_eval,
}


def load_data(data, kind: Kind) -> list[dict]:
    """Records for a stage's DataConfig: filtered by difficulty, then limited."""
    records = load_records(kind, data.source, config=data.config, split=data.split, on_bad_row=data.on_bad_row)
    if data.min_difficulty is not None:
        records = [r for r in records if (r.get("difficulty") or 0) >= data.min_difficulty]
    if not records:
        raise UserError(f"data source {data.source!r} gave no {kind} records")
    return records[: data.limit] if data.limit else records
