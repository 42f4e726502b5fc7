"""`aopd continual`: the on-policy loop on tool-use prompts (ToolAlpaca format), with the math
benchmarks evaluated before and after it (paper Table 2): tool success, math average Pass@k before and
after, and the change.

    aopd continual train.steps=10
"""

from __future__ import annotations

import json
from pathlib import Path

from aopd_cli import metrics as names
from aopd_cli.eval.harness import evaluate_policy, print_metrics
from aopd_cli.stages.lifecycle import read_record
from aopd_cli.stages.onpolicy import (
    log_advantages,
    onpolicy_loop,
    prepare,  # noqa: F401 - run_stage calls it
    stage_engines,
)


def run(config, session, prepared) -> Path:
    student = prepared.student
    measured = session.out_dir / "before.json"
    with stage_engines(config, prepared, session.out_dir) as engines:
        before = read_record(measured) if session.resume_from is not None else None  # the run this one continues
        if before is None:
            before, _ = evaluate_policy(student, engines.evaluation, config.eval, seed=config.seed)
            session.tracker.log_metrics(before, step=0)
            measured.write_text(json.dumps(before))
        checkpoint, advantages = onpolicy_loop(config, session, prepared, engines)
        after, _ = evaluate_policy(student, engines.evaluation, config.eval, seed=config.seed)
    retention = {}
    for k in config.eval.k:
        key = names.pass_at(names.MATH_AVG, k)
        if key in before:
            retention |= {names.retention(k, "before"): before[key], names.retention(k, "after"): after[key],
                          names.retention(k, "change"): after[key] - before[key]}
    session.tracker.log_metrics({**after, **retention}, step=config.train.steps)
    print_metrics(session.name, {**after, **retention}, config.eval)
    log_advantages(session.tracker, advantages, session.out_dir, config.objective.name)
    return checkpoint
