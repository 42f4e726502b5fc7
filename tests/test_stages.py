"""The stages end to end on the lab: `aopd pipeline experiment=lab_smoke` as a user runs it."""

import pytest
from cli_runs import run_aopd

from aopd_cli.tracking.store import connect


@pytest.fixture(scope="module")
def smoke(tmp_path_factory, lab_cache):
    work = tmp_path_factory.mktemp("smoke")
    result = run_aopd("pipeline", "experiment=lab_smoke", cwd=work, cache=lab_cache)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return work, result


def runs_by_name(work):
    client = connect(f"sqlite:///{work}/mlflow.db")
    experiment = client.get_experiment_by_name("aopd")
    runs = client.search_runs([experiment.experiment_id])
    return client, {r.data.tags["mlflow.runName"]: r for r in runs}


@pytest.mark.slow
def test_smoke_pipeline_runs_every_stage_under_one_parent(smoke):
    work, result = smoke
    assert "Table 1: Pass@1 / Pass@2" in result.stdout and "| SFT ckpt | " in result.stdout and "Table 2: continual learning" in result.stdout
    client, runs = runs_by_name(work)
    parent = runs["lab_smoke"]
    stages = {name: run.data.tags["stage"] for name, run in runs.items()}
    assert set(stages.values()) == {"pipeline", "warmup", "distill", "continual", "eval"}
    for name, run in runs.items():
        assert run.info.status == "FINISHED", name
        if name != "lab_smoke":
            assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
    aopd_run = runs["aopd"]
    assert aopd_run.data.tags["objective"] == "aopd" and aopd_run.data.params["objective.tau"] == "0.0"
    for key in ("train/intervention_ratio", "train/entropy", "train/grad_norm", "train/loss", "train/adv_mean",
                "time/rollout_s", "time/teacher_s", "time/update_s", "train/response_len"):
        assert len(client.get_metric_history(aopd_run.info.run_id, key)) == 3, key
    assert [m.step for m in client.get_metric_history(aopd_run.info.run_id, "eval/lab_math/pass_at_1")] == [0, 2, 3]
    assert "eval/lab_math/pass_at_1" in runs["eval_sft"].data.metrics
    assert "retention/math_pass_at_2_change" in runs["aopd_tools"].data.metrics
    artifacts = {a.path for a in client.list_artifacts(aopd_run.info.run_id)}
    assert {"aopd_config.yaml", "advantages.png"} <= artifacts
    assert "samples.jsonl" in {a.path for a in client.list_artifacts(runs["eval_sft"].info.run_id)}
    assert (work / "outputs/lab_smoke/comparison.md").is_file()


@pytest.mark.slow
def test_progress_reaches_a_log_file_as_plain_lines(smoke):
    _, result = smoke  # stdout is a pipe here, as in a cluster log
    assert "aopd: opd: steps 1-3 of 3" in result.stdout and "aopd: opd step 3/3 loss " in result.stdout
    assert " it/s eta " in result.stdout and "aopd: opd: done, 3 steps in" in result.stdout
    assert "━" not in result.stdout.split("Table 1")[0].split("aopd: opd: steps")[1].split("aopd: opd: done")[0]
    assert "INFO mlflow" not in result.stderr and "Loading weights" not in result.stderr


@pytest.mark.slow
def test_second_run_reuses_the_cached_warmups(smoke, lab_cache):
    work, _ = smoke
    result = run_aopd("pipeline", "experiment=lab_smoke", "output_dir=outputs/again", "opd.train.steps=1",
                  "aopd.train.steps=1", cwd=work, cache=lab_cache)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("reusing the cached warm-up checkpoint") == 2
    # the stage folder shows the reused checkpoint, where `aopd distill student.path=...` would look
    assert (work / "outputs/again/student_sft/checkpoint/config.json").is_file()


def test_tracking_overrides_reach_shared_stages_and_the_parent_run(lab_cache):
    from aopd_cli.experiment.pipeline import plan_pipeline

    plan = plan_pipeline(["experiment=lab_smoke", "tracking.enabled=false", "seed=3"])
    assert all(not config.tracking.enabled for config in plan.configs.values())
    assert plan.configs["teacher"].seed == 0 and plan.configs["aopd"].seed == 3  # shared warm-ups keep theirs


@pytest.mark.slow
def test_same_seed_gives_identical_metrics(smoke, lab_cache):
    work, _ = smoke
    teacher = next((lab_cache / "checkpoints").glob("warmup-*"))
    histories = []
    for out in ("det1", "det2"):
        args = ["distill", f"student.path={teacher}", f"teacher.path={teacher}", "train.steps=2", "train.batch_size=8",
                "train.micro_batch_size=4", "objective.top_k=4", "eval.limit=4", "eval.n=2", "eval.k=[1]",
                "train.eval_every=0", f"output_dir={out}", "tracking.experiment=det"]
        result = run_aopd(*args, cwd=work, cache=lab_cache)
        assert result.returncode == 0, result.stderr[-2000:]
    client = connect(f"sqlite:///{work}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("det").experiment_id])
    for run in runs:
        histories.append({k: [m.value for m in client.get_metric_history(run.info.run_id, k)]
                          for k in ("train/loss", "train/grad_norm", "train/entropy", "eval/lab_math/pass_at_1")})
    assert len(histories) == 2 and histories[0] == histories[1]


@pytest.mark.slow
def test_mismatched_teacher_vocabulary_is_refused_before_training(smoke, lab_cache, tmp_path):
    work, _ = smoke
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    teacher = next((lab_cache / "checkpoints").glob("warmup-*"))
    tokenizer = AutoTokenizer.from_pretrained(teacher)
    model = AutoModelForCausalLM.from_pretrained(teacher)
    tokenizer.add_tokens(["<other>"])
    model.resize_token_embeddings(len(tokenizer))
    model.save_pretrained(tmp_path / "other")
    tokenizer.save_pretrained(tmp_path / "other")
    _, before = runs_by_name(work)
    result = run_aopd("distill", f"student.path={teacher}", f"teacher.path={tmp_path / 'other'}", "output_dir=refused",
                  cwd=work, cache=lab_cache)
    assert result.returncode == 1
    assert "the teacher cannot score the student's tokens" in result.stderr and "vocabulary" in result.stderr
    assert not (work / "refused").exists()
    _, after = runs_by_name(work)
    assert len(after) == len(before)
    del torch


@pytest.mark.slow
def test_distill_syncs_the_rollout_weights_after_every_step(smoke, lab_cache, tmp_path, monkeypatch):
    import aopd_cli.stages.onpolicy as onpolicy
    from aopd_cli.config.compose import load_stage_config
    from aopd_cli.rollout.interface import Rollout
    from aopd_cli.stages.runner import run_stage

    teacher = next((lab_cache / "checkpoints").glob("warmup-*"))
    calls = []
    real_make_rollout = onpolicy.make_rollout

    def counting_rollout(engine, policy, cfg, batch_size=256, **options):
        rollout = real_make_rollout(engine, policy, cfg, batch_size, **options)
        return Rollout(rollout.generate, lambda: calls.append(len(calls)))

    monkeypatch.setattr(onpolicy, "make_rollout", counting_rollout)
    monkeypatch.setenv("AOPD_CACHE", str(lab_cache))
    config = load_stage_config("distill", [f"student.path={teacher}", f"teacher.path={teacher}", "train.steps=3",
                                           "train.batch_size=4", "train.micro_batch_size=2", "objective.top_k=4",
                                           "eval.benchmarks=[]", "train.eval_every=0", "tracking.enabled=false",
                                           f"output_dir={tmp_path / 'sync'}"])
    run_stage(config)
    assert len(calls) == 3  # once per optimizer step, after it


@pytest.mark.slow
def test_gkd_off_policy_mix_is_refused_without_reference_responses(smoke, lab_cache):
    work, _ = smoke
    teacher = next((lab_cache / "checkpoints").glob("warmup-*"))
    result = run_aopd("continual", "objective=gkd", "objective.lmbda=0.5", f"student.path={teacher}",
                      f"teacher.path={teacher}", "output_dir=gkd_refused", cwd=work, cache=lab_cache)
    assert result.returncode == 1 and "objective.lmbda=0.5" in result.stderr and "use objective.lmbda=1" in result.stderr
    assert not (work / "gkd_refused").exists()
