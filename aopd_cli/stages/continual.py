"""`aopd continual`: the distillation loop on tool-use prompts (ToolAlpaca format), with the math
benchmarks evaluated before and after it (paper Table 2): tool success, math average Pass@k before and
after, and the change.

    aopd continual train.steps=10
"""

from __future__ import annotations

from pathlib import Path

from aopd_cli.rollout import make_rollout
from aopd_cli.stages.common import tracked_run
from aopd_cli.stages.distill import distill_loop, log_advantages, prepare
from aopd_cli.stages.evaluate import evaluate_policy, print_metrics


def run_continual(config, *, parent_run_id: str | None = None, run_name: str | None = None,
                  tags: dict[str, str] | None = None) -> Path:
    records, student, teacher, base = prepare(config)
    with tracked_run(config, run_name=run_name, parent_run_id=parent_run_id, tags=tags) as tracker:
        eval_rollout = make_rollout("hf", student, None, config.eval.batch_size)
        before, _ = evaluate_policy(student, eval_rollout, config.eval, seed=config.seed)
        tracker.log_metrics(before, step=0)
        checkpoint, advantages = distill_loop(config, tracker, records, student, teacher, base)
        after, _ = evaluate_policy(student, eval_rollout, config.eval, seed=config.seed)
        retention = {}
        for k in config.eval.k:
            key = f"eval/math_avg/pass_at_{k}"
            if key in before:
                retention |= {f"retention/math_pass_at_{k}_before": before[key],
                              f"retention/math_pass_at_{k}_after": after[key],
                              f"retention/math_pass_at_{k}_change": after[key] - before[key]}
        tracker.log_metrics({**after, **retention}, step=config.train.steps)
        print_metrics(f"continual {run_name or config.objective.name}", {**after, **retention}, config.eval)
        log_advantages(tracker, advantages, Path(config.output_dir), config.objective.name)
        return checkpoint
