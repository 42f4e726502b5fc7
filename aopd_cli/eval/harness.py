"""Running a benchmark: Pass@k with n samples per problem on math benchmarks (math-verify), tool-call
success and first-call accuracy on tool benchmarks, per-sample rows and a summary table. The eval stage
and the training stages (their Pass@1 curves, the continual stage's before/after) all call
`evaluate_policy`.

    aopd eval eval.n=4 eval.limit=20
"""

from __future__ import annotations

import json
from pathlib import Path

from aopd_cli import metrics as names
from aopd_cli.data.loaders import load_records
from aopd_cli.data.prompts import chat_ids, math_messages, tool_messages
from aopd_cli.eval.math import extract_boxed, grade_math, pass_at_k
from aopd_cli.eval.tools import grade_tool_calls


def benchmark_name(source: str) -> str:
    return Path(source).stem if ("/" in source or "." in source) else source


def _responses(policy, rollout, prompts, eval_cfg, seed) -> tuple[list[str], list[int]]:
    batch = rollout.generate(prompts, n=eval_cfg.n, temperature=eval_cfg.temperature,
                             max_new_tokens=eval_cfg.max_new_tokens, seed=seed)
    texts = [policy.tokenizer.decode(ids[mask].tolist(), skip_special_tokens=True)
             for ids, mask in zip(batch.response_ids_BR, batch.response_mask_BR)]
    return texts, batch.prompt_index_B


def evaluate_policy(policy, rollout, eval_cfg, *, seed: int, tools: bool = True):
    """(metrics, per-sample rows) for the math benchmarks and (with `tools`) the tool benchmarks."""
    metrics, samples = {}, []
    for source in eval_cfg.benchmarks:
        name, records = benchmark_name(source), load_records("math_benchmark", source)[: eval_cfg.limit]
        prompts = [chat_ids(policy.tokenizer, math_messages(r["problem"], eval_cfg.prompt_suffix),
                            add_generation_prompt=True) for r in records]
        texts, owners = _responses(policy, rollout, prompts, eval_cfg, seed)
        correct_counts = [0] * len(records)
        for text, owner in zip(texts, owners):
            ok = grade_math(text, records[owner]["answer"])
            correct_counts[owner] += ok
            samples.append({"benchmark": name, "id": records[owner]["id"], "prompt": records[owner]["problem"],
                            "response": text, "extracted": extract_boxed(text), "gold": records[owner]["answer"],
                            "correct": ok})
        for k in eval_cfg.k:
            metrics[names.pass_at(name, k)] = sum(pass_at_k(eval_cfg.n, c, k) for c in correct_counts) / len(records)
    if eval_cfg.benchmarks:
        for k in eval_cfg.k:
            values = [metrics[names.pass_at(benchmark_name(s), k)] for s in eval_cfg.benchmarks]
            metrics[names.pass_at(names.MATH_AVG, k)] = sum(values) / len(values)
    for source in eval_cfg.tool_benchmarks if tools else []:
        name, records = benchmark_name(source), load_records("tool_eval", source)[: eval_cfg.limit]
        prompts = [chat_ids(policy.tokenizer, tool_messages(r, eval_cfg.tool_prompt_style), add_generation_prompt=True)
                   for r in records]
        texts, owners = _responses(policy, rollout, prompts, eval_cfg, seed)
        grades = [grade_tool_calls(text, records[owner]["golden"]) for text, owner in zip(texts, owners)]
        for text, owner, grade in zip(texts, owners, grades):
            samples.append({"benchmark": name, "id": records[owner]["id"], "prompt": records[owner]["instruction"],
                            "response": text, "extracted": None, "gold": records[owner]["golden"],
                            "correct": grade.success, "first_call": grade.first_call})
        metrics[names.tool(name, "success")] = sum(g.success for g in grades) / len(grades)
        metrics[names.tool(name, "first_call")] = sum(g.first_call for g in grades) / len(grades)
    return metrics, samples


def write_samples(samples: list[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        for row in samples:
            handle.write(json.dumps(row, default=str) + "\n")
    return path


def print_metrics(title: str, metrics: dict[str, float], eval_cfg) -> None:
    from rich.console import Console
    from rich.table import Table

    from aopd_cli.distributed import is_main

    if not is_main():
        return
    table = Table(title=f"{title} (n={eval_cfg.n}, temperature={eval_cfg.temperature}, "
                        f"max_new_tokens={eval_cfg.max_new_tokens})")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in sorted(metrics.items()):
        table.add_row(key, f"{value:.4f}")
    Console().print(table)
