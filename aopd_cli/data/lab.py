"""The lab: a deterministic arithmetic task and a tool-use task, written in the real datasets' schemas
(OpenThoughts-114k, DeepMath-103K, HuggingFaceH4/aime_2024, ToolAlpaca) into a cache directory, and a
character-level tokenizer (plus one token per word of the tool format) with a ChatML chat template for
the lab's tiny Qwen3 models.

Each task has a held-out test split (`lab_math`, `lab_tools`: what tables report) and a development split
(`lab_math_dev`, `lab_tools_dev`: what the lab's settings were chosen on). The teacher's warm-up sees
both tasks, the student's only arithmetic: the continual stage is where it meets tools. Everything here
is generated; nothing is downloaded. The real loaders read these files back.

    python -m aopd_cli.data.lab /tmp/aopd-lab
"""

from __future__ import annotations

import json
import os
import random
import string
import sys
from pathlib import Path

from aopd_cli.data.prompts import CHAT_TEMPLATES

LAB_VERSION = "v6"  # bump when the generated data or tokenizer changes: the cache key includes it
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>", "<unk>"]
CHAT_TEMPLATE = CHAT_TEMPLATES["chatml"]
N_TRAIN, N_BENCH = 4000, 200  # arithmetic: training problems; problems per benchmark (test and dev)
N_TOOL_TRAIN_PER_KIND, N_TOOL_EVAL_PER_KIND = 120, 10  # tool episodes per instruction kind
N_GENERIC = 400  # scrambled tool-format conversations for the students' warm-up (`lab_tools_generic`)


def cache_root() -> Path:
    return Path(os.environ.get("AOPD_CACHE", Path.home() / ".cache" / "aopd")).expanduser()


def lab_dir() -> Path:
    return cache_root() / "lab" / LAB_VERSION


# ---------------------------------------------------------------- arithmetic
def _problem(rng: random.Random) -> tuple[str, str, str, int]:
    """'7*3-5+9=?' (evaluated left to right), the worked chain, the answer, the number of operations."""
    n_ops = rng.randint(1, 3)
    value = rng.randint(1, 9)
    expression, steps = str(value), []
    for _ in range(n_ops):
        # multiply only small values: every chain step stays learnable for a 0.1M-parameter model
        op, operand = rng.choice("+-*" if abs(value) <= 9 else "+-"), rng.randint(1, 9)
        new = value + operand if op == "+" else value - operand if op == "-" else value * operand
        steps.append(f"{value}{op}{operand}={new}")
        expression += f"{op}{operand}"
        value = new
    return f"{expression}=?", " ".join(steps), str(value), n_ops


def _math_rows(seed: int, count: int, exclude: set[str]) -> list[tuple[str, str, str, int]]:
    rng, rows, seen = random.Random(seed), [], set(exclude)
    while len(rows) < count:
        row = _problem(rng)
        if row[0] not in seen:
            seen.add(row[0])
            rows.append(row)
    return rows


def _write_hub_layout(folder: Path, rows: list[dict], features_yaml: str, split: str = "train") -> None:
    """A folder that `datasets.load_dataset(folder)` reads like the hub repo (README configs + features)."""
    (folder / "data").mkdir(parents=True, exist_ok=True)
    with open(folder / "data" / f"{split}-00000-of-00001.jsonl", "w") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
    readme = (f"---\nconfigs:\n- config_name: default\n  data_files:\n  - split: {split}\n"
              f"    path: data/{split}-*\ndataset_info:\n- config_name: default\n  features:\n{features_yaml}---\n")
    (folder / "README.md").write_text(readme)


OPENTHOUGHTS_FEATURES = ("  - {name: system, dtype: string}\n  - name: conversations\n    list:\n"
                         "    - {name: from, dtype: string}\n    - {name: value, dtype: string}\n")
DEEPMATH_FEATURES = "".join(f"  - {{name: {n}, dtype: {t}}}\n" for n, t in [
    ("question", "string"), ("final_answer", "string"), ("difficulty", "float64"), ("topic", "string"),
    ("r1_solution_1", "string"), ("r1_solution_2", "string"), ("r1_solution_3", "string")])
AIME_FEATURES = "".join(f"  - {{name: {n}, dtype: {t}}}\n" for n, t in [
    ("id", "int64"), ("problem", "string"), ("solution", "string"), ("answer", "string"), ("url", "string"),
    ("year", "string")])


def write_math(root: Path) -> None:
    bench = _math_rows(seed=1, count=N_BENCH, exclude=set())
    # the development split chooses the lab's settings; the held-out `bench` only reports them
    dev = _math_rows(seed=4, count=N_BENCH, exclude={row[0] for row in bench})
    train = _math_rows(seed=2, count=N_TRAIN, exclude={row[0] for row in bench + dev})
    _write_hub_layout(root / "openthoughts", [
        {"system": "", "conversations": [
            {"from": "user", "value": problem},
            {"from": "assistant", "value": f"<|begin_of_thought|>\n\n{chain}\n\n<|end_of_thought|>\n\n"
                                           f"<|begin_of_solution|>\n\n\\boxed{{{answer}}}\n\n<|end_of_solution|>"}]}
        for problem, chain, answer, _ in train], OPENTHOUGHTS_FEATURES)
    _write_hub_layout(root / "deepmath", [
        {"question": problem, "final_answer": answer, "difficulty": float(n_ops),
         "topic": f"Mathematics -> Arithmetic -> {n_ops} operations",
         **{f"r1_solution_{i}": f"{chain}\n</think>\n\n\\boxed{{{answer}}}" for i in (1, 2, 3)}}
        for problem, chain, answer, n_ops in train], DEEPMATH_FEATURES)
    for folder, rows in (("aime", bench), ("aime_dev", dev)):
        _write_hub_layout(root / folder, [
            {"id": i, "problem": problem, "solution": chain, "answer": answer, "url": "lab://arithmetic",
             "year": "lab"} for i, (problem, chain, answer, _) in enumerate(rows)], AIME_FEATURES)


# ---------------------------------------------------------------- tools
# Five kinds of instruction over three invented APIs. Argument and observation values are single digits:
# the students copy digits since their arithmetic warm-up (operands are single digits there too), so the
# new skill is the format, the function and key names, and which digit goes where. Names and 2-digit
# values were beyond even the teacher's copying at the lab's budget (docs/lab-search.md). Every call
# returns a fresh random observation, so a model cannot guess it: the answer copies it, and `reviews`
# needs the id the first call returned (ToolAlpaca's `${id from searchBooks}`, with the value written out).
APIS = {
    "WeatherNow": {
        "getWeather": ("Weather at a zip code in some hours.", {"zip": "Required. integer.",
                                                                "hours": "Required. integer."}),
        "getForecast": ("Forecast at a zip code.", {"zip": "Required. integer.", "days": "Required. integer."}),
    },
    "BookShelf": {
        "searchBooks": ("The top book on a shelf.", {"shelf": "Required. integer."}),
        "getReviews": ("Reviews of a book.", {"id": "Required. integer. From searchBooks.",
                                              "limit": "Required. integer."}),
    },
    "NewsWire": {
        "getNews": ("Latest news of a channel.", {"channel": "Required. integer.", "limit": "Required. integer."}),
    },
}
KINDS = {"weather": "WeatherNow", "forecast": "WeatherNow", "two_zips": "WeatherNow", "reviews": "BookShelf",
         "news": "NewsWire"}
Call = tuple[str, dict, dict]  # function, arguments, observation


def _tool_episode(rng: random.Random, kind: str) -> tuple[str, list[Call], str]:
    """(instruction, calls with their observations, final answer) of one instruction kind."""
    first, second, value = rng.randint(1, 9), rng.randint(1, 9), rng.randint(0, 9)
    if kind == "weather":
        return (f"weather at zip {first} in {second} hours?",
                [("getWeather", {"zip": first, "hours": second}, {"temp": value})], str(value))
    if kind == "forecast":
        return (f"forecast at zip {first} for {second} days?",
                [("getForecast", {"zip": first, "days": second}, {"high": value})], str(value))
    if kind == "two_zips":
        other, hours, later = rng.choice([z for z in range(1, 10) if z != first]), second, rng.randint(0, 9)
        return (f"weather at zips {first} and {other} in {hours} hours?",
                [("getWeather", {"zip": first, "hours": hours}, {"temp": value}),
                 ("getWeather", {"zip": other, "hours": hours}, {"temp": later})], f"{value} and {later}")
    if kind == "reviews":
        book, stars = rng.randint(1, 9), rng.randint(1, 5)
        return (f"{first} reviews of the top book on shelf {second}?",
                [("searchBooks", {"shelf": second}, {"id": book}),
                 ("getReviews", {"id": book, "limit": first}, {"stars": stars})], f"{stars} stars")
    return (f"{first} news of channel {second}?", [("getNews", {"channel": second, "limit": first},
                                                   {"count": value})], str(value))


def _api_record(name: str) -> dict:
    functions = APIS[name]
    docs = {fn: f"{desc}\nParameters: {json.dumps(params)}\nOutput: JSON.\n - Format: application/json"
            for fn, (desc, params) in functions.items()}
    return {
        "Name": name, "Description": f"The {name} lab API.", "Category": "Lab", "Link": "lab://" + name,
        "Introduction": f"{name} is an invented API of the aopd lab.",
        "Functions": "\n".join(f"{fn}: {desc}" for fn, (desc, _) in functions.items()),
        "Documentation": json.dumps({"openapi": "3.0.0", "info": {"title": name, "version": "1.0.0"},
                                     "paths": {f"/{fn}": {"get": {"operationId": fn}} for fn in functions}}),
        "NLDocumentation": "\n".join(f"{fn}: {doc}" for fn, doc in docs.items()),
        "Function_Description": {**docs, "components": ""},
        "Function_Projection": {fn: [f"/{fn}", "get"] for fn in functions},
    }


def _episodes(rng: random.Random, per_kind: int, exclude: set[str]) -> list[tuple[str, str, list[Call], str]]:
    """`per_kind` episodes of each kind with distinct instructions outside `exclude` (held-out splits)."""
    found = []
    for kind in KINDS:
        texts: set[str] = set()
        for _ in range(100_000):  # bounded: too few instructions left is an error, never a hang
            if len(texts) == per_kind:
                break
            text, calls, final = _tool_episode(rng, kind)
            if text not in exclude and text not in texts:
                texts.add(text)
                found.append((kind, text, calls, final))
        else:
            raise RuntimeError(f"lab tools: fewer than {per_kind} new {kind!r} instructions")
    return found


def _eval_records(episodes) -> list[dict]:
    """ToolAlpaca eval_simulated records. `Observation` in a golden step is the lab's addition (ToolAlpaca's
    own files have none; the harness then feeds a stub): the multi-turn evaluation feeds it back."""
    records = []
    for name in APIS:
        mine = [e for e in episodes if KINDS[e[0]] == name]
        records.append({**_api_record(name), "Instructions": [text for _, text, _, _ in mine], "Golden_Answers": [
            [{"Action": fn, "Action_Input": json.dumps(args), "Observation": json.dumps(obs)} for fn, args, obs in calls]
            for _, _, calls, _ in mine]})
    return records


# What a base LLM has read before it meets ToolAlpaca: calls in this format, to other APIs. The students'
# warm-up (`tool_data: lab_tools_generic`) holds N_GENERIC conversations in the tool format with the task's
# own words scrambled: a random function, one or two random keys, the question's digits as their values and a
# random observation. They give every tool word a prior (on-policy OPD samples `getWeather` only if it has
# one) without teaching which function or key an instruction needs: the students score 0% before the
# continual stage (docs/lab-search.md).
GENERIC_KEYS = ["zip", "hours", "days", "shelf", "id", "limit", "channel", "temp", "high", "stars", "count"]


def generic_records(count: int = N_GENERIC) -> list[dict]:
    """ToolAlpaca train records of scrambled calls: `item 2 and 9?` -> getNews {"count": 2, "zip": 9}."""
    rng, functions, instances = random.Random(7), sorted(fn for api in APIS.values() for fn in api), []
    for _ in range(count):
        calls, digits = [], []
        for _ in range(rng.choice([1, 1, 2])):
            function, keys = rng.choice(functions), rng.sample(GENERIC_KEYS, rng.choice([1, 2]))
            args = {key: rng.randint(1, 9) for key in keys}
            digits += args.values()
            calls.append((function, args, {rng.choice(GENERIC_KEYS): rng.randint(0, 9)}))
        instances.append({
            "input": "item " + " and ".join(map(str, digits)) + "?", "Final Thought": "",
            "output": str(next(iter(calls[-1][2].values()))),
            "intermediate_steps": [[[fn, json.dumps(args), f" \nAction: {fn}\nAction Input: {json.dumps(args)}"],
                                    json.dumps(obs)] for fn, args, obs in calls]})
    return [{"Name": "Generic", "Description": "Scrambled tool calls.", "Category": "Lab", "Link": "lab://generic",
             "Introduction": "", "Functions": "", "Documentation": "{}", "NLDocumentation": "",
             "Function_Description": {"any": "Any of the lab's functions.", "components": ""},
             "Function_Projection": {}, "Instructions": [i["input"] for i in instances], "Instances": instances}]


def write_tools(root: Path) -> None:
    rng = random.Random(3)
    test = _episodes(rng, N_TOOL_EVAL_PER_KIND, set())
    dev = _episodes(rng, N_TOOL_EVAL_PER_KIND, {e[1] for e in test})
    held_out = {e[1] for e in test + dev}
    train = []  # instructions may repeat in training (with other observations), never a held-out one
    for kind in KINDS:
        while sum(e[0] == kind for e in train) < N_TOOL_TRAIN_PER_KIND:
            text, calls, final = _tool_episode(rng, kind)
            if text not in held_out:
                train.append((kind, text, calls, final))
    records = []
    for name in APIS:
        instances = [{
            "input": text, "output": final, "Final Thought": "I have the answer.",
            "intermediate_steps": [[[fn, json.dumps(args), f" Calling {fn}.\nAction: {fn}\nAction Input: "
                                     f"{json.dumps(args)}"], json.dumps(obs)] for fn, args, obs in calls],
        } for kind, text, calls, final in train if KINDS[kind] == name]
        records.append({**_api_record(name), "Instructions": [i["input"] for i in instances], "Instances": instances})
    (root / "tools").mkdir(parents=True, exist_ok=True)
    (root / "tools" / "train_data.json").write_text(json.dumps(records, indent=1))
    (root / "tools" / "eval_simulated.json").write_text(json.dumps(_eval_records(test), indent=1))
    (root / "tools_generic").mkdir(parents=True, exist_ok=True)
    (root / "tools_generic" / "train_data.json").write_text(json.dumps(generic_records(), indent=1))
    (root / "tools_dev").mkdir(parents=True, exist_ok=True)
    (root / "tools_dev" / "eval_simulated.json").write_text(json.dumps(_eval_records(dev), indent=1))


# ---------------------------------------------------------------- tokenizer
def tool_words() -> list[str]:
    """The tool format's words, one token each: the ReAct keywords, the function names and each argument's
    or observation's key as JSON writes it. A BPE tokenizer writes `Action: getWeather` in a few tokens;
    character by character it is 18, and a student meeting tools on-policy must then sample a long exact
    string before any of it is rewarded (lab v4: no method got past 0% success, docs/lab-search.md)."""
    keys = sorted({key for functions in APIS.values() for _, params in functions.values() for key in params}
                  | {"temp", "high", "id", "stars", "count"})
    return (["Action Input: ", "Action: ", "Observation: ", "Final Answer: "]
            + sorted(fn for functions in APIS.values() for fn in functions)
            + [f'{{"{key}": ' for key in keys] + [f', "{key}": ' for key in keys])


def build_tokenizer():
    """A character-level fast tokenizer with the tool format's words, Qwen3's special tokens and a ChatML
    template."""
    import re

    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = list(string.printable[:95]) + ["\n"]  # digits, letters, punctuation, space, newline
    words = tool_words()
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + chars + words)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    longest_first = "|".join(re.escape(word) for word in sorted(words, key=len, reverse=True))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(longest_first + r"|[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token="<unk>",
        additional_special_tokens=["<|im_start|>", "<think>", "</think>"],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.padding_side = "left"
    return tokenizer


def ensure_lab(root: Path | None = None) -> Path:
    """Generate the lab's files once (atomically); later calls return the cached folder."""
    root = root or lab_dir()
    if (root / "COMPLETE").exists():
        return root
    staging = root.with_name(root.name + f".tmp{os.getpid()}")
    write_math(staging / "math")
    write_tools(staging)
    build_tokenizer().save_pretrained(staging / "tokenizer")
    (staging / "COMPLETE").write_text(LAB_VERSION)
    root.parent.mkdir(parents=True, exist_ok=True)
    try:
        staging.rename(root)
    except OSError:  # another process finished first
        import shutil

        shutil.rmtree(staging, ignore_errors=True)
    return root


if __name__ == "__main__":
    print(ensure_lab(Path(sys.argv[1]) if len(sys.argv) > 1 else None))
