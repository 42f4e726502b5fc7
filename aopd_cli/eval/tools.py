"""The offline proxy for ToolAlpaca's tool-call success (method.md, Evaluation).

Parse every Action / Action Input pair of a response (the `ASSISTANT Action:` form and the plain
`Action:` form), then match the golden steps in order: name exact after stripping `[Optional]` (an
optional golden step may be skipped), arguments as parsed JSON where `${...}` placeholders match anything,
empty golden values are ignored, scalars compare as normalised case-insensitive strings and extra
predicted keys are allowed. A golden Action_Input that is not JSON even after placeholder substitution is
compared as a whitespace-free string.

Evaluation follows ToolAlpaca's protocol turn by turn (`Episode`, `take_turn`): the model generates until it
stops (end of turn, or the string `Observation:`), the golden observation of the step it is at is fed
back (a stub where the data have none, as ToolAlpaca's own files), and it goes on to the next call and
its answer. An episode succeeds when its calls match the whole golden sequence and it then answers.

    python -m pytest tests/test_graders.py -q -k tool
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

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


def _position(golden: list[dict], calls: list[tuple[str, str]]) -> int:
    """How many golden steps `calls` matched, in order."""
    position = 0
    for call in calls:
        # retries, getDetails and unrelated calls do not advance (the judge accepts retries and getDetails)
        position = _advance(golden, position, call) or position
    return position


def grade_calls(calls: list[tuple[str, str]], golden: list[dict], finished: bool = True) -> ToolGrade:
    """Success: every required golden step matched in order and (`finished`) the model then answered."""
    remaining_optional = all(step["action"].startswith(OPTIONAL) for step in golden[_position(golden, calls):])
    first = bool(calls) and _advance(golden, 0, calls[0]) is not None
    return ToolGrade(first_call=first, success=bool(golden) and remaining_optional and finished, n_calls=len(calls))


def grade_tool_calls(response: str, golden: list[dict]) -> ToolGrade:
    """One free-running response (training-time grading; evaluation runs `Episode`s)."""
    return grade_calls(parse_tool_calls(response), golden)


def grade_turn(text: str, expected: dict | None) -> bool:
    """One turn of a conversation: the expected call (its first call), or an answer without a call."""
    calls = parse_tool_calls(text)
    if expected is None:
        return not calls and bool(text.strip())
    return bool(calls) and _step_matches(expected, calls[0])


# ---------------------------------------------------------------- multi-turn episodes (ToolAlpaca's protocol)
STOP_STRING = "Observation:"  # ToolAlpaca generates until `ASSISTANT Observation:`; the lab's form is the suffix
STUB_OBSERVATION = "Status Code: 200. Response: {}"  # ToolAlpaca's own files give no observation to feed back


@dataclass
class Episode:
    """One sampled attempt at one instruction: the conversation so far and what the model did in it."""

    owner: int  # index of the instruction
    messages: list[dict]
    turns: list[str] = field(default_factory=list)  # the model's own text, turn by turn
    calls: list[tuple[str, str]] = field(default_factory=list)
    open_turn: bool = False  # the last assistant turn continues (an observation was fed back inline)
    done: bool = False
    finished: bool = False  # ended by answering (a turn without a call that stopped by itself)


def take_turn(episode: Episode, text: str, stopped: bool, golden: list[dict], max_turns: int,
              observation_message) -> None:
    """Record one generated turn and feed back the golden observation of the step the call should match.

    `text` is the turn's decoded text, `stopped` whether it ended by itself (end-of-turn token or the stop
    string) rather than at max_new_tokens. A turn cut at `Observation:` (ReAct written inline) continues
    the same assistant turn after the observation; a turn ended by end-of-turn gets it as a user turn."""
    cut = text.find(STOP_STRING)
    inline = cut >= 0
    text = text[:cut + len(STOP_STRING)] if inline else text
    calls = parse_tool_calls(text[:cut] if inline else text)
    episode.turns.append(text)
    if not stopped or not calls:  # out of tokens, or an answer: the episode is over
        episode.done, episode.finished = True, stopped and not calls and bool(text.strip())
        return
    position = _position(golden, episode.calls)  # the step these calls should match: its observation comes back
    episode.calls += calls
    observation = (golden[position].get("observation") if position < len(golden) else None) or STUB_OBSERVATION
    if inline:
        if episode.open_turn:
            episode.messages[-1] = {"role": "assistant", "content": episode.messages[-1]["content"] + text}
        else:
            episode.messages.append({"role": "assistant", "content": text})
        episode.messages[-1]["content"] += f" {observation}\n"
        episode.open_turn = True
    else:
        if episode.open_turn:
            episode.messages[-1] = {"role": "assistant", "content": episode.messages[-1]["content"] + text}
        else:
            episode.messages.append({"role": "assistant", "content": text})
        episode.messages.append(observation_message(observation))
        episode.open_turn = False
    episode.done = len(episode.turns) >= max_turns


def grade_episode(episode: Episode, golden: list[dict]) -> ToolGrade:
    return grade_calls(episode.calls, golden, episode.finished)
