"""Prompt builders and chat formatting: always through the tokenizer's chat template, never by hand.

- math: the problem plus the suffix of method.md in the user turn.
- tools: ToolAlpaca's ReAct prompt (`test_v1`) built from the function descriptions plus getDetails
  ("full"), or the bare instruction answered with plain `Action:` lines ("compact", the lab's: its
  char-level models pay for every character, and learn the APIs from their training data). Either way a
  conversation has one assistant turn per call, the observation as the next user turn, then the answer.
- SFT: token ids of a conversation and the mask of its assistant tokens (the only ones trained).
- Templates a model folder lacks (many base models ship none): `student.chat_template=chatml` names one,
  a path names a Jinja file (`template_text`).

    python -m pytest tests/test_data.py -q -k prompt
"""

from __future__ import annotations

import json
from pathlib import Path

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


# the templates `student.chat_template` names; anything else is a Jinja file. chatml is Qwen's turn format
# without its extras (tools, thinking), what the lab's tokenizer carries
CHAT_TEMPLATES = {
    "chatml": ("{%- for message in messages %}"
               "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
               "{%- endfor %}"
               "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"),
}


def template_text(value: str) -> str:
    """The Jinja text of a template named by `*.chat_template`: a known name, or a file's content."""
    return CHAT_TEMPLATES[value] if value in CHAT_TEMPLATES else Path(value).expanduser().read_text()


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
        return f"Action: {step['action']}\nAction Input: {action_input}"
    thought = f"ASSISTANT Thought: {step['thought']}\n" if step.get("thought") else ""
    return f"{thought}ASSISTANT Action: {step['action']}\nASSISTANT Action Input: {action_input}"


def observation_message(observation: str, style: str) -> dict:
    """An API's result, fed back as a user turn (never trained, never sampled)."""
    prefix = "Observation:" if style == "compact" else "ASSISTANT Observation:"
    return {"role": "user", "content": f"{prefix} {observation}"}


def _final_text(record: dict, full: bool) -> str:
    if not full:
        return f"Final Answer: {record['output']}"
    return f"ASSISTANT Thought: {record['final_thought']}\nASSISTANT Response: {record['output']}"


def tool_sft_messages(record: dict, style: str) -> list[dict]:
    """A tool_train record as a conversation: one assistant turn per call, its observation as a user turn
    (not trained), then the final answer. Both styles share this shape; `full` adds ToolAlpaca's prompt and
    its `ASSISTANT ...` prefixes, `compact` is `Action:`, `Action Input:`, `Observation:`, `Final Answer:`."""
    full = style == "full"
    messages = tool_messages(record, style)
    for step in record["steps"]:
        messages.append({"role": "assistant", "content": _call_text(step, full)})
        messages.append(observation_message(step["observation"], style))
    return messages + [{"role": "assistant", "content": _final_text(record, full)}]


def tool_turns(records: list[dict], style: str) -> list[dict]:
    """One record per assistant turn of each tool_train record (each call, then the final answer): the
    conversation before it (`messages`, the golden calls and observations as history) and the step it
    should call (`expected`, None for the answer). On-policy training on tools samples one turn per
    prompt, as the multi-turn evaluation does after the model's own calls."""
    turns = []
    for record in records:
        conversation = tool_sft_messages(record, style)
        starts = [i for i, message in enumerate(conversation) if message["role"] == "assistant"]
        for start, expected in zip(starts, record["steps"] + [None]):
            turns.append({**record, "messages": conversation[:start], "expected": expected})
    return turns


def chat_ids(tokenizer, messages: list[dict], *, add_generation_prompt: bool,
             continue_final_message: bool = False) -> list[int]:
    """Token ids of a conversation; `continue_final_message` leaves the last (assistant) turn open, so
    generation goes on inside it (after an observation fed back inline, ReAct style)."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                         continue_final_message=continue_final_message)
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
