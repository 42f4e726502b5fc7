"""Data parallelism on the CPU: torchrun with 2 processes (gloo), FSDP2-sharded models.

- one update at world size 2 equals the update at world size 1 on the same global batch;
- `aopd distill --nproc-per-node 2` finishes with one MLflow run and a final checkpoint transformers
  loads, and a step checkpoint written at world size 2 resumes;
- SIGTERM to every process, as a scheduler sends it, stops both ranks after one step with its checkpoint;
- a rank that raises stops every rank quickly, with its error shown;
- an evaluation split over 2 processes gives the metrics and samples of one process.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from cli_runs import distill_args, run_aopd, start_aopd, wait_for

from aopd_cli.tracking.store import connect

pytestmark = pytest.mark.slow
SCRIPTS = Path(__file__).parent / "scripts"


def torchrun(*args, cwd, cache, nproc=2, timeout=600):
    env = {**os.environ, "AOPD_CACHE": str(cache)}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                           *map(str, args)], cwd=cwd, capture_output=True, text=True, env=env, timeout=timeout)


def test_one_update_is_the_same_at_world_size_1_and_2(tmp_path, lab_cache):
    one = subprocess.run([sys.executable, SCRIPTS / "one_update.py", tmp_path / "w1.pt"], capture_output=True, text=True,
                         env={**os.environ, "AOPD_CACHE": str(lab_cache)})
    assert one.returncode == 0, one.stderr[-2000:]
    two = torchrun(SCRIPTS / "one_update.py", tmp_path / "w2.pt", cwd=tmp_path, cache=lab_cache)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = torch.load(tmp_path / "w1.pt"), torch.load(tmp_path / "w2.pt")
    assert a["loss"] == pytest.approx(b["loss"], abs=1e-6) and a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
    errors = [(a["weights"][k] - b["weights"][k]).abs().max().item() for k in a["weights"]]
    assert max(errors) < 1e-5, max(errors)
    assert all(not torch.equal(a["before"][k], a["weights"][k]) for k in a["weights"])  # the step moved every tensor


def test_distill_on_two_processes_tracks_once_saves_and_resumes(tmp_path, tiny_checkpoint, lab_cache):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"  # absolute: it names this test's processes
    args = [*distill_args(tiny_checkpoint, out, "train.steps=6", "train.save_every=2"), "--nproc-per-node", "2"]
    process = start_aopd(*args, cwd=tmp_path, cache=lab_cache, log=tmp_path / "log")
    wait_for(lambda: (out / "step_2/meta.json").is_file() or process.poll() is not None, what="step_2")
    # torchrun starts each rank in a session of its own: kill the launcher and the ranks, as a scheduler does
    subprocess.run(["pkill", "-9", "-f", f"output_dir={out}"])
    process.wait()
    assert (out / "step_2/rank1.pt").is_file() and not (out / "checkpoint").exists()
    started = time.time()
    rerun = run_aopd(*args, cwd=tmp_path, cache=lab_cache)
    assert rerun.returncode == 0, rerun.stdout[-2000:] + rerun.stderr[-3000:]
    assert "resuming distill aopd from step 2 of 6" in rerun.stdout
    assert rerun.stdout.count("distill done") == 1  # rank 0 alone prints
    client = connect(f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("aopd").experiment_id])
    assert len(runs) == 1 and runs[0].data.tags["world_size"] == "2" and runs[0].info.status == "FINISHED"
    assert sorted(m.step for m in client.get_metric_history(runs[0].info.run_id, "train/loss")) == [1, 2, 3, 4, 5, 6]
    model = AutoModelForCausalLM.from_pretrained(out / "checkpoint")
    assert all(torch.isfinite(p).all() for p in model.parameters())
    print(f"world-2 resumed run: {time.time() - started:.1f} s")


def test_sigterm_to_every_process_stops_both_ranks_after_the_same_step_with_a_checkpoint(tmp_path, tiny_checkpoint,
                                                                                          lab_cache):
    """What Ray's job stop and Slurm's scancel do: SIGTERM to torchrun and to each rank at once; torchrun then
    forwards one more to each rank. The ranks agree on a step, write its checkpoint, and the run ends KILLED."""
    out = tmp_path / "out"
    args = [*distill_args(tiny_checkpoint, out, "train.steps=2000", "train.save_every=1000", "train.log_every=1"),
            "--nproc-per-node", "2"]
    process = start_aopd(*args, cwd=tmp_path, cache=lab_cache, log=tmp_path / "log")
    wait_for(lambda: "step 3/2000" in (tmp_path / "log").read_text() or process.poll() is not None, what="step 3")
    subprocess.run(["pkill", "-TERM", "-f", f"output_dir={out}"])
    assert process.wait(timeout=300) != 0  # torchrun's own exit code for a SIGTERM: 1
    log = (tmp_path / "log").read_text()
    assert "rerun the same command to resume" in log, log[-3000:]
    assert "[rank0]: Traceback" not in log and "[rank1]: Traceback" not in log, log[-3000:]  # torchrun's own may be
    [saved] = out.glob("step_*")
    assert (saved / "rank0.pt").is_file() and (saved / "rank1.pt").is_file(), log[-3000:]
    client = connect(f"sqlite:///{tmp_path}/mlflow.db")
    [run] = client.search_runs([client.get_experiment_by_name("aopd").experiment_id])
    assert run.info.status == "KILLED", log[-3000:]


def test_a_rank_that_raises_stops_every_rank(tmp_path, tiny_checkpoint, lab_cache):
    started = time.time()
    result = torchrun(SCRIPTS / "rank_fails.py", *distill_args(tiny_checkpoint, "out", "train.steps=4"),
                      "tracking.enabled=false", cwd=tmp_path, cache=lab_cache, timeout=300)
    assert result.returncode != 0
    assert "aopd: rank 1: injected failure on rank 1" in result.stdout + result.stderr
    assert time.time() - started < 200  # start-up included; the failure itself ends both ranks in seconds


def test_an_evaluation_over_two_processes_equals_one(tmp_path, tiny_checkpoint, lab_cache):
    args = ["eval", f"student.path={tiny_checkpoint}", "eval.benchmarks=[lab_math]", "eval.tool_benchmarks=[lab_tools]",
            "eval.limit=9", "eval.n=3", "eval.k=[1,2]", "eval.max_new_tokens=24", "eval.greedy=true"]
    metrics = {}
    for nproc in (1, 2):
        out = tmp_path / f"world{nproc}"
        result = run_aopd(*args, f"output_dir={out}", "--nproc-per-node", str(nproc), cwd=tmp_path, cache=lab_cache)
        assert result.returncode == 0, result.stdout[-1500:] + result.stderr[-3000:]
        run_id = json.loads((out / "aopd_run.json").read_text())["run_id"]
        metrics[nproc] = connect(f"sqlite:///{tmp_path}/mlflow.db").get_run(run_id).data.metrics
        rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
        metrics[f"rows{nproc}"] = sorted(json.dumps(row, sort_keys=True) for row in rows)
    assert metrics[1] == metrics[2] and len(metrics[1]) >= 6, (metrics[1], metrics[2])
    assert metrics["rows1"] == metrics["rows2"]  # every sample, not only the averages
