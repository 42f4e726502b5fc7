"""`aopd continual`: the on-policy loop on tool-use prompts (ToolAlpaca format), with the math
benchmarks evaluated before and after it (paper Table 2): tool success, math average Pass@k before and
after, and the change.

    aopd continual train.steps=10
"""

from __future__ import annotations

from pathlib import Path

from aopd_cli import metrics as names
from aopd_cli.eval.harness import evaluate_policy, print_metrics
from aopd_cli.rollout import make_rollout
from aopd_cli.stages.common import tracked_run
from aopd_cli.stages.onpolicy import log_advantages, onpolicy_loop, prepare


def run_continual(config, *, parent_run_id: str | None = None, run_name: str | None = None,
                  tags: dict[str, str] | None = None) -> Path:
    records, student, teacher, base = prepare(config)
    with tracked_run(config, run_name=run_name, parent_run_id=parent_run_id, tags=tags) as tracker:
        eval_rollout = make_rollout("hf", student, None, config.eval.batch_size)
        before, _ = evaluate_policy(student, eval_rollout, config.eval, seed=config.seed)
        tracker.log_metrics(before, step=0)
        checkpoint, advantages = onpolicy_loop(config, tracker, records, student, teacher, base)
        after, _ = evaluate_policy(student, eval_rollout, config.eval, seed=config.seed)
        retention = {}
        for k in config.eval.k:
            key = names.pass_at(names.MATH_AVG, k)
            if key in before:
                retention |= {names.retention(k, "before"): before[key], names.retention(k, "after"): after[key],
                              names.retention(k, "change"): after[key] - before[key]}
        tracker.log_metrics({**after, **retention}, step=config.train.steps)
        print_metrics(f"continual {run_name or config.objective.name}", {**after, **retention}, config.eval)
        log_advantages(tracker, advantages, Path(config.output_dir), config.objective.name)
        return checkpoint
