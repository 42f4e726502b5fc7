"""The offline proxy for ToolAlpaca's tool-call success (method.md, Evaluation).

Parse every Action / Action Input pair of a response (the `ASSISTANT Action:` form and the plain
`Action:` form), then match the golden steps in order: name exact after stripping `[Optional]` (an
optional golden step may be skipped), arguments as parsed JSON where `${...}` placeholders match anything,
empty golden values are ignored, scalars compare as normalised case-insensitive strings and extra
predicted keys are allowed. A golden Action_Input that is not JSON even after placeholder substitution is
compared as a whitespace-free string.

    python -m pytest tests/test_graders.py -q -k tool
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

ACTION_RE = re.compile(r"(?:ASSISTANT\s*)?Action\s*\d*\s*:(.*?)\n(?:ASSISTANT\s*)?Action\s*\d*\s*Input\s*\d*\s*:"
                       r"[ \t]*(.*?)(?=\n(?:ASSISTANT|Observation|Thought|Action)|\Z)", re.S)
PLACEHOLDER_RE = re.compile(r'"?\$\{[^}]*\}"?')
ANY = "<aopd-any>"
OPTIONAL = "[Optional]"


@dataclass(frozen=True)
class ToolGrade:
    first_call: bool
    success: bool
    n_calls: int


def parse_tool_calls(response: str) -> list[tuple[str, str]]:
    """(function name, raw action input) for each call, in order."""
    return [(name.strip().strip("\"'` "), raw.strip()) for name, raw in ACTION_RE.findall(response)]


def _parse_golden_input(raw) -> object:
    if not isinstance(raw, str):
        return raw
    if not raw.strip():
        return {}
    try:
        return json.loads(PLACEHOLDER_RE.sub(lambda _: json.dumps(ANY), raw))
    except json.JSONDecodeError:
        return _Unparsed(re.sub(r"\s+", "", raw))


@dataclass(frozen=True)
class _Unparsed:
    text: str


def _scalar(value) -> str:
    return (json.dumps(value) if isinstance(value, bool) or value is None else str(value)).strip().lower()


def _value_matches(gold, pred) -> bool:
    if gold == ANY:
        return True
    if isinstance(gold, dict):
        return isinstance(pred, dict) and all(
            key in pred and _value_matches(value, pred[key])
            for key, value in gold.items() if value not in ("", None))
    if isinstance(gold, list):
        return isinstance(pred, list) and len(gold) == len(pred) and all(map(_value_matches, gold, pred))
    if isinstance(pred, (dict, list)):
        return False
    return _scalar(gold) == _scalar(pred)


def _step_matches(gold: dict, call: tuple[str, str]) -> bool:
    name, raw = call
    if name != gold["action"].replace(OPTIONAL, "").strip():
        return False
    expected = _parse_golden_input(gold["action_input"])
    if isinstance(expected, _Unparsed):
        return re.sub(r"\s+", "", raw) == expected.text
    try:
        predicted = json.loads(raw) if raw else {}
    except json.JSONDecodeError:
        return False
    return _value_matches(expected, predicted)


def _advance(golden: list[dict], position: int, call) -> int | None:
    """The golden position after `call`, skipping optional steps; None if it matches none reachable."""
    for index in range(position, len(golden)):
        if _step_matches(golden[index], call):
            return index + 1
        if not golden[index]["action"].startswith(OPTIONAL):
            return None
    return None


def grade_tool_calls(response: str, golden: list[dict]) -> ToolGrade:
    calls = parse_tool_calls(response)
    position = 0
    for call in calls:
        # retries, getDetails and unrelated calls do not advance (the judge accepts retries and getDetails)
        position = _advance(golden, position, call) or position
    remaining_optional = all(step["action"].startswith(OPTIONAL) for step in golden[position:])
    first = bool(calls) and _advance(golden, 0, calls[0]) is not None
    return ToolGrade(first_call=first, success=bool(golden) and remaining_optional, n_calls=len(calls))
