"""The lab: a deterministic arithmetic task and a tool-use task, written in the real datasets' schemas
(OpenThoughts-114k, DeepMath-103K, HuggingFaceH4/aime_2024, ToolAlpaca) into a cache directory, and a
character-level tokenizer with a ChatML chat template for the lab's tiny Qwen3 models.

Everything here is generated; nothing is downloaded. The real loaders read these files back.

    python -m aopd_cli.data.lab /tmp/aopd-lab
"""

from __future__ import annotations

import json
import os
import random
import string
import sys
from pathlib import Path

LAB_VERSION = "v3"  # bump when the generated data or tokenizer changes: the cache key includes it
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>", "<unk>"]
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
N_TRAIN, N_BENCH, N_TOOL_TRAIN_PER_API, N_TOOL_EVAL_PER_API = 4000, 200, 120, 20


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
    train = _math_rows(seed=2, count=N_TRAIN, exclude={row[0] for row in bench})
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
    _write_hub_layout(root / "aime", [
        {"id": i, "problem": problem, "solution": chain, "answer": answer, "url": "lab://arithmetic",
         "year": "lab"} for i, (problem, chain, answer, _) in enumerate(bench)], AIME_FEATURES)


# ---------------------------------------------------------------- tools
CITIES = ["paris", "rome", "oslo", "lima", "cairo", "tokyo", "quito", "berlin", "delhi", "seoul"]
AUTHORS = ["austen", "tolstoy", "borges", "morrison", "achebe", "woolf", "kafka", "eco"]
TOPICS = ["jazz", "tennis", "python", "volcanoes", "tea", "chess"]
APIS = {
    "WeatherNow": {
        "getWeather": ("Get current weather for a city.", {"city": "Required. string. City name."}),
        "getForecast": ("Get the forecast for a city.", {"city": "Required. string.", "days": "Required. integer."}),
    },
    "BookShelf": {
        "searchBooks": ("Find books by an author.", {"author": "Required. string.", "limit": "Required. integer."}),
    },
    "NewsWire": {
        "getNews": ("Latest news on a topic.", {"topic": "Required. string.", "limit": "Required. integer."}),
    },
}


def _tool_instruction(rng: random.Random, api: str) -> tuple[str, list[tuple[str, dict]]]:
    if api == "WeatherNow":
        city, other = rng.sample(CITIES, 2)
        kind = rng.randint(0, 2)
        if kind == 0:
            return f"weather in {city}?", [("getWeather", {"city": city})]
        days = rng.randint(1, 7)
        if kind == 1:
            return f"forecast {city} {days} days?", [("getForecast", {"city": city, "days": days})]
        return f"weather in {city} and {other}?", [("getWeather", {"city": city}), ("getWeather", {"city": other})]
    count = rng.randint(1, 9)
    if api == "BookShelf":
        author = rng.choice(AUTHORS)
        return f"{count} books by {author}?", [("searchBooks", {"author": author, "limit": count})]
    topic = rng.choice(TOPICS)
    return f"{count} news on {topic}?", [("getNews", {"topic": topic, "limit": count})]


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


def write_tools(root: Path) -> None:
    rng = random.Random(3)
    root.mkdir(parents=True, exist_ok=True)
    train, evaluation = [], []
    for name in APIS:
        eval_by_text = {}
        while len(eval_by_text) < N_TOOL_EVAL_PER_API:
            text, calls = _tool_instruction(rng, name)
            eval_by_text[text] = calls
        eval_pairs, held_out = list(eval_by_text.items()), set(eval_by_text)
        train_pairs = []
        while len(train_pairs) < N_TOOL_TRAIN_PER_API:
            pair = _tool_instruction(rng, name)
            if pair[0] not in held_out:
                train_pairs.append(pair)
        record = _api_record(name)
        instances = [{
            "input": text, "output": "Done.", "Final Thought": "I have what the user asked for.",
            "intermediate_steps": [[[fn, json.dumps(args), f" Calling {fn}.\nAction: {fn}\nAction Input: "
                                     f"{json.dumps(args)}"], "Status Code: 200. Response: {}"] for fn, args in calls],
        } for text, calls in train_pairs]
        train.append({**record, "Instructions": [t for t, _ in train_pairs], "Instances": instances})
        evaluation.append({**record, "Instructions": [t for t, _ in eval_pairs], "Golden_Answers": [
            [{"Action": fn, "Action_Input": json.dumps(args)} for fn, args in calls] for _, calls in eval_pairs]})
    (root / "train_data.json").write_text(json.dumps(train, indent=1))
    (root / "eval_simulated.json").write_text(json.dumps(evaluation, indent=1))


# ---------------------------------------------------------------- tokenizer
def build_tokenizer():
    """A character-level fast tokenizer with Qwen3's special tokens and a ChatML template."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = list(string.printable[:95]) + ["\n"]  # digits, letters, punctuation, space, newline
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + chars)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
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
    write_tools(staging / "tools")
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
