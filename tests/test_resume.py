"""Runs that survive: rerun-to-resume bit for bit after SIGKILL, SIGTERM / SIGINT with a checkpoint,
finished stages left alone, resume=never, one process per folder, tidy folders, NaN steps skipped.
Real subprocesses and real signals; the NaN scores are injected into the scorer in-process."""

import json
import os
import signal

import pytest
import torch
from cli_runs import distill_args, run_aopd, start_aopd, wait_for, whole_and_killed
from safetensors.torch import load_file

from aopd_cli.tracking.store import connect

pytestmark = pytest.mark.slow


def runs_of(work, experiment="aopd"):
    client = connect(f"sqlite:///{work}/mlflow.db")
    found = client.get_experiment_by_name(experiment)
    return client, (client.search_runs([found.experiment_id]) if found else [])


def history(client, run_id, key):
    return [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]


def weights(out):
    return load_file(str(out / "checkpoint" / "model.safetensors"))


def test_a_killed_run_resumes_bit_for_bit_in_the_same_mlflow_run(tmp_path, tiny_checkpoint, lab_cache):
    args = ["train.steps=6", "train.save_every=2", "train.eval_every=3"]
    whole_and_killed(tmp_path, tiny_checkpoint, lab_cache, 2, *args)
    assert not (tmp_path / "killed/checkpoint").exists()
    rerun = run_aopd(*distill_args(tiny_checkpoint, "killed", *args), cwd=tmp_path, cache=lab_cache)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "resuming distill aopd from step 2 of 6" in rerun.stdout
    a, b = weights(tmp_path / "whole"), weights(tmp_path / "killed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    client, runs = runs_of(tmp_path)
    assert len(runs) == 2 and {r.info.status for r in runs} == {"FINISHED"}  # the killed run was continued
    by_dir = {json.loads((tmp_path / d / "aopd_run.json").read_text())["run_id"]: d for d in ("whole", "killed")}
    metrics = {by_dir[r.info.run_id]: r.info.run_id for r in runs}
    for key in ("train/loss", "train/grad_norm", "train/entropy", "eval/lab_math/pass_at_1"):
        whole_history, killed_history = history(client, metrics["whole"], key), history(client, metrics["killed"], key)
        assert whole_history == killed_history, key  # the same values, each step once
        assert len({step for step, _ in killed_history}) == len(killed_history)


def test_sigterm_writes_a_checkpoint_and_the_rerun_resumes(tmp_path, tiny_checkpoint, lab_cache):
    args = distill_args(tiny_checkpoint, "out", "train.steps=6", "train.save_every=100")
    process = start_aopd(*args, cwd=tmp_path, cache=lab_cache, log=tmp_path / "log")
    wait_for(lambda: "step 2/6" in (tmp_path / "log").read_text() or process.poll() is not None, what="step 2")
    os.killpg(process.pid, signal.SIGTERM)
    assert process.wait(timeout=120) == 143
    log = (tmp_path / "log").read_text()
    assert "SIGTERM: finishing this step, then writing a checkpoint" in log and "rerun the same command" in log
    saved = [p.name for p in (tmp_path / "out").glob("step_*")]
    assert len(saved) == 1
    client, runs = runs_of(tmp_path)
    assert [r.info.status for r in runs] == ["KILLED"]
    rerun = run_aopd(*args, cwd=tmp_path, cache=lab_cache)
    assert rerun.returncode == 0 and f"from {saved[0].replace('step_', 'step ')} of 6" in rerun.stdout
    _, runs = runs_of(tmp_path)
    assert [r.info.status for r in runs] == ["FINISHED"]
    again = run_aopd(*args, cwd=tmp_path, cache=lab_cache)  # a finished stage is not rerun
    assert again.returncode == 0 and "already finished" in again.stdout
    assert len(runs_of(tmp_path)[1]) == 1


def test_sigint_says_what_it_does_and_exits_130(tmp_path, tiny_checkpoint, lab_cache):
    process = start_aopd(*distill_args(tiny_checkpoint, "out", "train.steps=6"), cwd=tmp_path, cache=lab_cache,
                         log=tmp_path / "log")
    wait_for(lambda: "step 1/6" in (tmp_path / "log").read_text() or process.poll() is not None, what="step 1")
    os.killpg(process.pid, signal.SIGINT)
    assert process.wait(timeout=120) == 130
    log = (tmp_path / "log").read_text()
    assert "SIGINT (Ctrl-C): finishing this step" in log and "Ctrl-C again to stop now" in log
    assert list((tmp_path / "out").glob("step_*")) and runs_of(tmp_path)[1][0].info.status == "KILLED"


def test_resume_never_keeps_the_old_folder_and_a_busy_folder_is_refused(tmp_path, tiny_checkpoint, lab_cache):
    args = distill_args(tiny_checkpoint, "out", "train.steps=2")
    assert run_aopd(*args, cwd=tmp_path, cache=lab_cache).returncode == 0
    fresh = run_aopd(*args, "resume=never", cwd=tmp_path, cache=lab_cache)
    assert fresh.returncode == 0, fresh.stderr[-2000:]
    archived = list(tmp_path.glob("out.archived-*"))
    assert len(archived) == 1 and (archived[0] / "checkpoint/config.json").is_file()
    assert len(runs_of(tmp_path)[1]) == 2
    # a run far too long to finish while the second one starts (20 steps did, on a loaded machine)
    process = start_aopd(*distill_args(tiny_checkpoint, "busy", "train.steps=5000"), cwd=tmp_path, cache=lab_cache,
                         log=tmp_path / "log")
    try:
        wait_for(lambda: "steps 1-5000" in (tmp_path / "log").read_text() or process.poll() is not None, what="start")
        assert process.poll() is None, (tmp_path / "log").read_text()[-2000:]
        second = run_aopd(*distill_args(tiny_checkpoint, "busy", "train.steps=5000"), cwd=tmp_path, cache=lab_cache)
        assert second.returncode == 1 and f"is in use by pid {process.pid}" in second.stderr
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    # the dead process's lock is stale: the next run takes it over, and marks nothing twice
    stale = run_aopd(*distill_args(tiny_checkpoint, "busy", "train.steps=20", "resume=never"), cwd=tmp_path,
                     cache=lab_cache)
    assert stale.returncode == 0 and "taking over" in stale.stdout and f"pid {process.pid}" in stale.stdout


def test_keep_last_and_leftovers(tmp_path, tiny_checkpoint, lab_cache):
    (tmp_path / "out/.tmp-step_9").mkdir(parents=True)  # what a killed writer leaves
    result = run_aopd(*distill_args(tiny_checkpoint, "out", "train.steps=5", "train.save_every=1", "train.keep_last=2"),
                      cwd=tmp_path, cache=lab_cache)
    assert result.returncode == 0, result.stderr[-2000:]
    assert sorted(p.name for p in (tmp_path / "out").glob("step_*")) == ["step_3", "step_4"]
    assert not list((tmp_path / "out").glob(".tmp-*"))


def step_weights(folder):
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(folder / "state", folder / "flat.pt")
    return torch.load(folder / "flat.pt", weights_only=False)["model"]


def test_non_finite_teacher_scores_skip_steps_then_stop(tmp_path, tiny_checkpoint, lab_cache, monkeypatch):
    import aopd_cli.stages.onpolicy as onpolicy
    from aopd_cli.config.compose import load_stage_config
    from aopd_cli.errors import UserError
    from aopd_cli.stages.runner import run_stage

    real_scorer, calls = onpolicy.hf_scorer, []

    def scorer(policy, top_k):
        score = real_scorer(policy, top_k)

        def poisoned(micro):
            calls.append(1)
            scores = score(micro)
            if len(calls) in (3, 7, 9):  # two micro-batches a step: steps 2, 4 and 5 get a NaN
                scores.token_logprobs.fill_(float("nan"))
            return scores
        return poisoned

    monkeypatch.setattr(onpolicy, "hf_scorer", scorer)
    monkeypatch.chdir(tmp_path)
    config = load_stage_config("distill", distill_args(tiny_checkpoint, "out", "train.steps=8", "train.save_every=1",
                                                       "train.max_skipped=2")[1:])
    with pytest.raises(UserError, match=r"stopped at step 5: the loss was non-finite for 2 steps in a row.*step_4"):
        run_stage(config)
    client, runs = runs_of(tmp_path)
    assert runs[0].info.status == "FAILED"
    skipped = dict(history(client, runs[0].info.run_id, "train/skipped_steps"))
    assert (skipped[1], skipped[2], skipped[3], skipped[4], skipped[5]) == (0, 1, 1, 2, 3)
    out = tmp_path / "out"
    assert sorted(p.name for p in out.glob("step_*")) == ["step_3", "step_4"] and not (out / "checkpoint").exists()
    before, after = step_weights(out / "step_3"), step_weights(out / "step_4")
    assert all(torch.equal(before[k], after[k]) for k in before)  # the skipped step 4 left the weights alone
    assert all(torch.isfinite(t).all() for t in after.values())


TINY_PIPELINE = """
name: tiny
overrides: [train.batch_size=8, train.micro_batch_size=4, objective.top_k=4, eval.limit=4, eval.n=2, "eval.k=[1]",
            train.eval_every=0, rollout.max_new_tokens=24, eval.max_new_tokens=24, "eval.tool_benchmarks=[]"]
stages:
  - {name: warm, stage: warmup, overrides: [student=lab_student, train.steps=3, "eval.benchmarks=[]"]}
  - {name: first, stage: distill, overrides: [student.path=@warm, teacher.path=@warm, train.steps=2]}
  - {name: second, stage: distill, overrides: [student.path=@warm, teacher.path=@warm, train.steps=8,
                                               train.save_every=2]}
  - {name: eval_second, stage: eval, overrides: [student.path=@second]}
table1: {second: eval_second}
"""


def test_a_pipeline_rerun_skips_finished_stages_and_resumes_the_interrupted_one(tmp_path, lab_cache):
    (tmp_path / "tiny.yaml").write_text(TINY_PIPELINE)
    process = start_aopd("pipeline", "experiment=tiny.yaml", cwd=tmp_path, cache=lab_cache, log=tmp_path / "log")
    wait_for(lambda: (tmp_path / "outputs/tiny/second/step_2/meta.json").is_file() or process.poll() is not None,
             what="the second distillation's first checkpoint")
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    client, runs = runs_of(tmp_path)
    parent_id = next(r.info.run_id for r in runs if r.data.tags["stage"] == "pipeline")
    rerun = run_aopd("pipeline", "experiment=tiny.yaml", cwd=tmp_path, cache=lab_cache)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "warm already finished" in rerun.stdout and "first already finished" in rerun.stdout
    assert "resuming second from step" in rerun.stdout and "| second |" in rerun.stdout
    _, runs = runs_of(tmp_path)
    names = sorted(r.data.tags["mlflow.runName"] for r in runs)
    assert names == ["eval_second", "first", "second", "tiny", "warm"]  # one run each: the same ones continued
    assert all(r.info.status == "FINISHED" for r in runs)
    assert all(r.data.tags.get("mlflow.parentRunId") == parent_id for r in runs if r.info.run_id != parent_id)
    assert next(r for r in runs if r.data.tags["mlflow.runName"] == "eval_second").data.tags["evaluates"] == "second"
