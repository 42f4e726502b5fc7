"""`aopd eval`: a checkpoint's Pass@k on math benchmarks and tool-call success on tool benchmarks
(the evaluation library `aopd_cli.eval.harness` does the work); per-sample JSONL and a summary table.

    aopd eval eval.n=4 eval.limit=20
"""

from __future__ import annotations

from pathlib import Path


def run_eval(config, *, parent_run_id: str | None = None, run_name: str | None = None,
             tags: dict[str, str] | None = None) -> dict[str, float]:
    from aopd_cli.engine import load_policy, seed_everything
    from aopd_cli.eval.harness import evaluate_policy, print_metrics, write_samples
    from aopd_cli.rollout import make_rollout
    from aopd_cli.stages.common import tracked_run

    seed_everything(config.seed)
    policy = load_policy(config.student, role="student", seed=config.seed)
    with tracked_run(config, run_name=run_name, parent_run_id=parent_run_id, tags=tags) as tracker:
        rollout = make_rollout(config.rollout.engine, policy, config.rollout, config.eval.batch_size)
        metrics, samples = evaluate_policy(policy, rollout, config.eval, seed=config.seed)
        tracker.log_metrics(metrics, step=0)
        tracker.log_artifact(write_samples(samples, Path(config.output_dir) / "samples.jsonl"))
        print_metrics(f"eval of {config.student.path or 'a fresh lab model'}", metrics, config.eval)
        return metrics
