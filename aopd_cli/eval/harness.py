"""Running a benchmark: Pass@k with n samples per problem on math benchmarks (math-verify), tool-call
success and first-call accuracy on tool benchmarks (multi-turn, ToolAlpaca's protocol), optionally greedy
accuracy beside them (`eval.greedy`: one low-variance number per benchmark), per-sample rows and a summary
table. The eval stage and the training stages (their Pass@1 curves, the continual stage's before/after)
all call `evaluate_policy`.

Under torchrun each rank evaluates its share of the problems (seeds follow a problem's place in the
benchmark, so the samples are those of one process) and the results are gathered: every rank gets the
metrics, rank 0 the per-sample rows.

Tool success is per instruction: each instruction gets n sampled episodes; its score is the fraction of
them that succeed, and the benchmark's `success` is the mean of that over instructions (so each
instruction weighs the same, whatever its number of calls). `first_call` is averaged the same way;
`greedy` is the fraction of instructions whose one greedy episode succeeds.

    aopd eval eval.n=4 eval.limit=20 eval.greedy=true
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import torch

from aopd_cli import metrics as names
from aopd_cli.data.loaders import load_records
from aopd_cli.data.prompts import chat_ids, math_messages, observation_message, tool_messages
from aopd_cli.eval.math import extract_boxed, grade_math, pass_at_k
from aopd_cli.eval.tools import STOP_STRING, Episode, grade_episode, take_turn
from aopd_cli.training import distributed as dist

GREEDY = 0.0  # temperature 0: greedy decoding (HF: do_sample=False; vLLM: its own convention)


def benchmark_name(source: str) -> str:
    return Path(source).stem if ("/" in source or "." in source) else source


def _generate(policy, rollout, prompts, *, n, temperature, max_new_tokens, seed, indices=None, stop_strings=None):
    """(texts, stopped by itself?) per row, and the prompt index of each row. Texts keep special tokens
    except the stop and pad tokens (a tool turn goes back into the conversation as written)."""
    kwargs = {}
    if stop_strings and "stop_strings" in inspect.signature(rollout.generate).parameters:
        kwargs["stop_strings"] = stop_strings  # an engine without them runs on: the caller cuts the text
    batch = rollout.generate(prompts, n=n, temperature=temperature, max_new_tokens=max_new_tokens, seed=seed,
                             indices=indices, **kwargs)
    stop_ids_S = torch.tensor(sorted(policy.stop_ids))
    texts, stopped = [], []
    for ids_R, mask_R in zip(batch.response_ids_BR, batch.response_mask_BR):
        kept_R = ids_R[mask_R]
        is_stop_R = torch.isin(kept_R, stop_ids_S)
        content_R = kept_R[~is_stop_R & (kept_R != policy.tokenizer.pad_token_id)]
        text = policy.tokenizer.decode(content_R.tolist(), skip_special_tokens=False)
        texts.append(text)
        stopped.append(bool(is_stop_R.any()) or bool(stop_strings and any(s in text for s in stop_strings)))
    return texts, stopped, batch.prompt_index_B


def _math(policy, rollout, eval_cfg, source, seed, metrics, samples) -> None:
    """Each rank decodes its share of the problems (seeded by their place in the benchmark, so any world size
    samples the same); the counts are gathered so every rank has the metrics, the rows go to rank 0."""
    name, records = benchmark_name(source), load_records("math_benchmark", source)[: eval_cfg.limit]
    share = dist.shard_range(len(records))
    prompts = [chat_ids(policy.tokenizer, math_messages(records[i]["problem"], eval_cfg.prompt_suffix),
                        add_generation_prompt=True) for i in share]
    runs = [("sampled", eval_cfg.n, eval_cfg.temperature)] + ([("greedy", 1, GREEDY)] if eval_cfg.greedy else [])
    for decoding, n, temperature in runs:
        texts, _, owners = _generate(policy, rollout, prompts, n=n, temperature=temperature,
                                     max_new_tokens=eval_cfg.max_new_tokens, seed=seed, indices=list(share))
        correct_counts, rows = {i: 0 for i in share}, []
        for text, owner in zip(texts, owners):
            record = records[share[owner]]
            ok = grade_math(text, record["answer"])
            correct_counts[share[owner]] += ok
            rows.append({"benchmark": name, "decoding": decoding, "id": record["id"], "prompt": record["problem"],
                         "response": text, "extracted": extract_boxed(text), "gold": record["answer"], "correct": ok})
        counts = _merged(correct_counts)
        samples += dist.gather_to_main(rows)
        if decoding == "greedy":
            metrics[names.greedy(name)] = sum(counts.values()) / len(records)
        else:
            for k in eval_cfg.k:
                metrics[names.pass_at(name, k)] = sum(pass_at_k(n, c, k) for c in counts.values()) / len(records)


def _merged(mine: dict) -> dict:
    """Every rank's share of a per-item dict, merged, in item order, on every rank."""
    merged = {}
    for part in dist.all_gather_object(mine):
        merged.update(part)
    return dict(sorted(merged.items()))


def run_episodes(policy, rollout, records: list[dict], *, style: str, n: int, temperature: float,
                 max_new_tokens: int, seed: int, first: int = 0) -> list[Episode]:
    """n multi-turn episodes per tool instruction, all advanced together one turn per generate call.
    `first`: the global index of `records[0]` (a rank's share): an episode's seed is its global place. Every
    rank takes as many turns as the longest episode anywhere (a sharded model decodes together)."""
    episodes = [Episode(i, tool_messages(r, style)) for i, r in enumerate(records) for _ in range(n)]
    turn = 0
    while True:
        active_ids = [k for k, e in enumerate(episodes) if not e.done]
        if not dist.all_reduce([len(active_ids)], "max")[0]:
            return episodes
        active = [episodes[k] for k in active_ids]
        prompts = [chat_ids(policy.tokenizer, e.messages, add_generation_prompt=not e.open_turn,
                            continue_final_message=e.open_turn) for e in active]
        texts, stopped, _ = _generate(policy, rollout, prompts, n=1, temperature=temperature,
                                      max_new_tokens=max_new_tokens, seed=seed + 7919 * turn,
                                      indices=[first * n + k for k in active_ids], stop_strings=[STOP_STRING])
        for episode, text, ended in zip(active, texts, stopped):
            golden = records[episode.owner]["golden"]
            take_turn(episode, text, ended, golden, len(golden) + 2,
                      lambda observation: observation_message(observation, style))
        turn += 1


def _tools(policy, rollout, eval_cfg, source, seed, metrics, samples) -> None:
    name, records = benchmark_name(source), load_records("tool_eval", source)[: eval_cfg.limit]
    share = dist.shard_range(len(records))
    mine = records[share.start:share.stop]
    runs = [("sampled", eval_cfg.n, eval_cfg.temperature)] + ([("greedy", 1, GREEDY)] if eval_cfg.greedy else [])
    for decoding, n, temperature in runs:
        episodes = run_episodes(policy, rollout, mine, style=eval_cfg.tool_prompt_style, n=n, temperature=temperature,
                                max_new_tokens=eval_cfg.max_new_tokens, seed=seed, first=share.start)
        scores, rows = {share[i]: [0.0, 0.0] for i in range(len(mine))}, []
        for episode in episodes:
            record = mine[episode.owner]
            grade = grade_episode(episode, record["golden"])
            scores[share[episode.owner]][0] += grade.success / n
            scores[share[episode.owner]][1] += grade.first_call / n
            rows.append({"benchmark": name, "decoding": decoding, "id": record["id"], "prompt": record["instruction"],
                         "response": episode.turns, "extracted": episode.calls, "gold": record["golden"],
                         "correct": grade.success, "first_call": grade.first_call, "finished": episode.finished})
        merged = _merged(scores)
        samples += dist.gather_to_main(rows)
        success = sum(s for s, _ in merged.values()) / len(records)
        if decoding == "greedy":
            metrics[names.greedy(name)] = success
        else:
            metrics[names.tool(name, "success")] = success
            metrics[names.tool(name, "first_call")] = sum(f for _, f in merged.values()) / len(records)


def evaluate_policy(policy, rollout, eval_cfg, *, seed: int, tools: bool = True):
    """(metrics, per-sample rows) for the math benchmarks and (with `tools`) the tool benchmarks."""
    metrics, samples = {}, []
    for source in eval_cfg.benchmarks:
        _math(policy, rollout, eval_cfg, source, seed, metrics, samples)
    if eval_cfg.benchmarks:
        benches = [benchmark_name(s) for s in eval_cfg.benchmarks]
        averages = {names.pass_at(names.MATH_AVG, k): [names.pass_at(b, k) for b in benches] for k in eval_cfg.k}
        if eval_cfg.greedy:
            averages[names.greedy(names.MATH_AVG)] = [names.greedy(b) for b in benches]
        for key, parts in averages.items():
            metrics[key] = sum(metrics[p] for p in parts) / len(parts)
    for source in eval_cfg.tool_benchmarks if tools else []:
        _tools(policy, rollout, eval_cfg, source, seed, metrics, samples)
    return metrics, samples


PROBLEMS_FILE = "eval_problems.jsonl"  # a training stage's evaluations, per problem: what intervals are drawn from


def append_problems(path: Path, step: int, samples: list[dict]) -> None:
    """One line per benchmark problem of an evaluation at `step`: its correct samples out of n (sampled
    decoding), so differences between checkpoints can be paired problem by problem. A resumed run that
    evaluates a step again appends it again; readers keep the last."""
    counts: dict[tuple[str, str], list[int]] = {}
    for row in samples:
        if row["decoding"] == "sampled":
            count = counts.setdefault((row["benchmark"], row["id"]), [0, 0])
            count[0] += bool(row["correct"])
            count[1] += 1
    with open(path, "a") as handle:
        for (benchmark, problem), (correct, n) in counts.items():
            handle.write(json.dumps({"step": step, "benchmark": benchmark, "id": problem, "correct": correct,
                                     "n": n}) + "\n")


def write_samples(samples: list[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        for row in samples:
            handle.write(json.dumps(row, default=str) + "\n")
    return path


def print_metrics(title: str, metrics: dict[str, float], eval_cfg) -> None:
    from rich.console import Console
    from rich.table import Table

    if not dist.is_main():
        return
    table = Table(title=f"{title} (n={eval_cfg.n}, temperature={eval_cfg.temperature}, "
                        f"max_new_tokens={eval_cfg.max_new_tokens}{', greedy too' if eval_cfg.greedy else ''})")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in sorted(metrics.items()):
        table.add_row(key, f"{value:.4f}")
    Console().print(table)
