"""`aopd eval`: a checkpoint's Pass@k on math benchmarks and tool-call success on tool benchmarks
(the evaluation library `aopd_cli.eval.harness` does the work); per-sample JSONL and a summary table.

    aopd eval eval.n=4 eval.limit=20
"""

from __future__ import annotations


def prepare(config):
    from aopd_cli.training.models import load_policy, seed_everything

    seed_everything(config.seed)
    from aopd_cli.stages.preflight import check_benchmark_prompts

    policy = load_policy(config.student, role="student", seed=config.seed)
    if config.rollout.engine == "vllm":  # refused here, before any run, when vLLM cannot run the model
        from aopd_cli.rollout.vllm import check_rollout_model

        check_rollout_model(policy)
    check_benchmark_prompts(policy, config.eval, config.rollout.max_model_len if config.rollout.engine == "vllm"
                            else None)
    return policy


def run(config, session, policy) -> dict[str, float]:
    from aopd_cli.data.loaders import load_records
    from aopd_cli.eval.harness import evaluate_policy, print_metrics, write_samples
    from aopd_cli.rollout.engines import make_rollout
    from aopd_cli.stages.lifecycle import log_dataset

    for kind, sources in (("math_benchmark", config.eval.benchmarks), ("tool_eval", config.eval.tool_benchmarks)):
        for source in sources:
            log_dataset(session, "eval", source, load_records(kind, source)[: config.eval.limit])
    rollout = make_rollout(config.rollout.engine, policy, config.rollout, config.eval.batch_size)
    try:
        metrics, samples = evaluate_policy(policy, rollout, config.eval, seed=config.seed)
    finally:
        rollout.close()
    session.tracker.log_metrics(metrics, step=0)
    session.tracker.log_artifact(write_samples(samples, session.out_dir / "samples.jsonl"))
    print_metrics(f"eval of {config.student.path or 'a fresh lab model'}", metrics, config.eval)
    return metrics
