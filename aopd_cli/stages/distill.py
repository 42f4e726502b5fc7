"""`aopd distill`: on-policy distillation on math prompts (`objective=aopd|opd|gkd|seqkd|exopd`), with the
Pass@1 curve every `train.eval_every` steps and a closing evaluation. The loop itself is
`stages.onpolicy`, shared with `continual`.

    aopd distill objective=opd train.steps=10
"""

from __future__ import annotations

from pathlib import Path

from aopd_cli.eval.harness import PROBLEMS_FILE, append_problems, evaluate_policy, print_metrics
from aopd_cli.stages.onpolicy import (
    log_advantages,
    onpolicy_loop,
    prepare,  # noqa: F401 - run_stage calls it
    stage_engines,
)
from aopd_cli.training.distributed import is_main


def run(config, session, prepared) -> Path:
    student = prepared.student
    with stage_engines(config, prepared, session.out_dir) as engines:

        def evaluate(step: int, tools: bool = False) -> dict[str, float]:
            # one sampling seed at every step (common random numbers): a per-step seed moved every method's
            # curve together by +-3 points of Pass@1 at lr 0 (lab, 100 problems x 4 samples)
            metrics, samples = evaluate_policy(student, engines.evaluation, config.eval, seed=config.seed,
                                               tools=tools)
            if is_main():
                append_problems(session.out_dir / PROBLEMS_FILE, step, samples)
            return metrics

        if config.train.eval_every and config.eval.benchmarks and session.resume_from is None:
            session.tracker.log_metrics(evaluate(0), step=0)  # the curve starts at the warm-up checkpoint
        checkpoint, advantages = onpolicy_loop(config, session, prepared, engines, evaluate=evaluate)
        # the eval stage's seed: the closing evaluation and `aopd eval` of this checkpoint give one number
        metrics = evaluate(config.train.steps, tools=True)
    session.tracker.log_metrics(metrics, step=config.train.steps)
    if (session.out_dir / PROBLEMS_FILE).is_file():
        session.tracker.log_artifact(session.out_dir / PROBLEMS_FILE)
    print_metrics(session.name, metrics, config.eval)
    log_advantages(session.tracker, advantages, session.out_dir, config.objective.name)
    return checkpoint
