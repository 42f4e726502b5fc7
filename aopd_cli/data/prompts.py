"""Prompt builders and chat formatting: always through the tokenizer's chat template, never by hand.

- math: the problem plus the suffix of method.md in the user turn.
- tools: ToolAlpaca's ReAct prompt (`test_v1`) built from the function descriptions plus getDetails
  ("full"), or the bare instruction answered with plain `Action:` lines ("compact", the lab's: its
  char-level models pay for every character, and learn the APIs from their training data).
- SFT: token ids of a conversation and the mask of its assistant tokens (the only ones trained).

    python -m pytest tests/test_data.py -q -k prompt
"""

from __future__ import annotations

import json

GET_DETAILS = ('getDetails: Ask the user for details that the instruction lacks.\n'
               'Parameters: {"Question": "Required. string. The question to the user."}')
TOOL_PREFIX = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
               "helpful, detailed, and polite answers to the user's questions with the help of some tools.\n"
               "You have access to the following tools:")
TOOL_FORMAT = ("Use the following format:\nUSER: the user's question\nASSISTANT Thought: you should always think "
               "about what to do\nASSISTANT Action: the action to take, must be one of [{names}].\nASSISTANT "
               "Action Input: the input for the action, in JSON format.\nASSISTANT Observation: the result of the "
               "action\n... (this Thought/Action/Action Input/Observation can repeat N times)\nASSISTANT Thought: "
               "summarize the information gathered\nASSISTANT Response: the final response to the user")


def math_messages(problem: str, suffix: str) -> list[dict]:
    return [{"role": "user", "content": f"{problem}\n{suffix}" if suffix else problem}]


def tool_messages(record: dict, style: str) -> list[dict]:
    if style == "compact":
        return [{"role": "user", "content": record["instruction"]}]
    names = list(record["functions"]) + ["getDetails"]
    tools = "\n".join(f"{name}: {text}" for name, text in record["functions"].items()) + "\n" + GET_DETAILS
    body = (f"{TOOL_PREFIX}\n{tools}\n\n{TOOL_FORMAT.format(names=', '.join(names))}\n\n"
            f"Begin!\n\nUSER: {record['instruction']}")
    return [{"role": "user", "content": body}]


def _call_text(step: dict, full: bool) -> str:
    action_input = step["action_input"]
    if not isinstance(action_input, str):
        action_input = json.dumps(action_input)
    if not full:
        return f"Action: {step['action']}\nAction Input: {action_input}\n"
    thought = f"ASSISTANT Thought: {step['thought']}\n" if step.get("thought") else ""
    return f"{thought}ASSISTANT Action: {step['action']}\nASSISTANT Action Input: {action_input}\n"


def tool_sft_messages(record: dict, style: str) -> list[dict]:
    """A tool_train record as a conversation; observations come back as user turns (not trained)."""
    messages = tool_messages(record, style)
    if style == "compact":
        return messages + [{"role": "assistant", "content": "".join(_call_text(s, False) for s in record["steps"])}]
    for step in record["steps"]:
        messages.append({"role": "assistant", "content": _call_text(step, True).rstrip("\n")})
        messages.append({"role": "user", "content": f"ASSISTANT Observation: {step['observation']}"})
    final = f"ASSISTANT Thought: {record['final_thought']}\nASSISTANT Response: {record['output']}"
    return messages + [{"role": "assistant", "content": final}]


def chat_ids(tokenizer, messages: list[dict], *, add_generation_prompt: bool) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def sft_example(tokenizer, messages: list[dict], stop_ids: set[int]) -> tuple[list[int], list[bool]]:
    """Token ids of the whole conversation and a mask true on assistant tokens, end-of-turn included."""
    ids = chat_ids(tokenizer, messages, add_generation_prompt=False)
    mask = [False] * len(ids)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = len(chat_ids(tokenizer, messages[:i], add_generation_prompt=True))
        stop = len(chat_ids(tokenizer, messages[: i + 1], add_generation_prompt=False))
        for position in range(start, min(stop, len(ids))):
            mask[position] = True
            if ids[position] in stop_ids:  # the end-of-turn token is trained; what follows it is not
                break
    return ids, mask
