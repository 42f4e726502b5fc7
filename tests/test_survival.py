"""Runs that survive, round 3 (issue 21), as a careless user and a flaky machine would try them, with real
subprocesses: a changed input is a new run, a damaged newest checkpoint is passed over, every bad input
is one line before any folder, lock or MLflow run exists, sweeps and refusals leave no RUNNING run, and
the store's creation lock follows no link."""

import json
import os
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_runs import distill_args, run_aopd, start_aopd, wait_for, whole_and_killed
from safetensors.torch import load_file

from aopd_cli.tracking.store import connect

pytestmark = pytest.mark.slow
FIXTURES = Path(__file__).parent / "fixtures"


def runs(work: Path, experiment: str = "aopd") -> list:
    if not (work / "mlflow.db").is_file():
        return []
    client = connect(f"sqlite:///{work}/mlflow.db")
    found = client.get_experiment_by_name(experiment)
    return list(client.search_runs([found.experiment_id])) if found else []


def prompts_file(path: Path, problems: list[str]) -> Path:
    path.write_text("".join(json.dumps({"question": q, "final_answer": "1"}) + "\n" for q in problems))
    return path


@pytest.fixture
def work(tmp_path, tiny_checkpoint):
    prompts_file(tmp_path / "prompts.jsonl", [f"compute {i}+1 left to right." for i in range(8)])
    (tmp_path / "bench.jsonl").write_text("".join(json.dumps({"id": str(i), "problem": f"compute {i}*2.",
                                                              "answer": str(2 * i)}) + "\n" for i in range(4)))
    return tmp_path


def test_an_edited_data_file_is_a_new_run_never_a_resume(work, tiny_checkpoint, lab_cache):
    args = distill_args(tiny_checkpoint, "out", "train.steps=2", "data.source=prompts.jsonl")
    first = run_aopd(*args, cwd=work, cache=lab_cache)
    assert first.returncode == 0, first.stderr[-2000:]
    again = run_aopd(*args, cwd=work, cache=lab_cache)
    assert "already finished" in again.stdout  # the same inputs: nothing to do
    prompts_file(work / "prompts.jsonl", [f"compute {i}+2 left to right." for i in range(8)])
    edited = run_aopd(*args, cwd=work, cache=lab_cache)
    assert edited.returncode == 0, edited.stderr[-2000:]
    assert "data.source=prompts.jsonl changed since the earlier run" in edited.stdout
    assert list(work.glob("out.archived-*"))  # the earlier run is kept, not overwritten


def test_an_edited_benchmark_is_evaluated_again(work, tiny_checkpoint, lab_cache):
    args = ["eval", f"student.path={tiny_checkpoint}", "eval.benchmarks=[bench.jsonl]", "eval.n=1", "eval.k=[1]",
            "eval.max_new_tokens=8", "output_dir=ev"]
    assert run_aopd(*args, cwd=work, cache=lab_cache).returncode == 0
    (work / "bench.jsonl").write_text(json.dumps({"id": "0", "problem": "compute 5*5.", "answer": "25"}) + "\n")
    edited = run_aopd(*args, cwd=work, cache=lab_cache)
    assert edited.returncode == 0 and "already finished" not in edited.stdout
    assert "eval.benchmarks=bench.jsonl changed since the earlier run" in edited.stdout


def test_a_damaged_newest_checkpoint_is_skipped_and_diagnostics_survive_the_resume(work, tiny_checkpoint, lab_cache):
    # 40 steps: the kill lands mid-run however fast the steps go (at 10 steps/s a run of 6 once ended within
    # one poll of the step 4 checkpoint); the two newest step checkpoints are kept, the newer one is damaged
    args = ["train.steps=40", "train.save_every=2"]
    whole_and_killed(work, tiny_checkpoint, lab_cache, 4, *args)
    older, newest = sorted(int(p.name.removeprefix("step_")) for p in (work / "killed").glob("step_*"))
    state = work / f"killed/step_{newest}/rank0.pt"  # damaged in place: same size, other bytes
    state.write_bytes(bytes(len(state.read_bytes())))
    rerun = run_aopd(*distill_args(tiny_checkpoint, "killed", *args), cwd=work, cache=lab_cache)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert f"step_{newest} is damaged (rank0.pt is not what was written (checksum))" in rerun.stdout
    assert f"resuming distill aopd from step {older} of 40" in rerun.stdout
    a, b = load_file(str(work / "whole/checkpoint/model.safetensors")), \
        load_file(str(work / "killed/checkpoint/model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the advantage sample of the resumed run is the whole run's, not only the steps after the resume
    whole_adv, resumed_adv = np.load(work / "whole/advantages.npy"), np.load(work / "killed/advantages.npy")
    assert len(whole_adv) > 0 and np.array_equal(whole_adv, resumed_adv)


BAD_TOOLS = [  # (what is wrong, how the record is spoiled, the line)
    ("steps are numbers", lambda api: api["Instances"][0].__setitem__("intermediate_steps", [1, 2]),
     "field 'Instances.intermediate_steps': instance 0: expected [[action, input, log], observation]"),
    ("descriptions are a list", lambda api: api.__setitem__("Function_Description", ["a", "b"]),
     "field 'Function_Description': expected dict or str, got list"),
]


@pytest.mark.parametrize("what, spoil, text", BAD_TOOLS, ids=[c[0] for c in BAD_TOOLS])
def test_bad_tool_records_are_one_line(work, tiny_checkpoint, lab_cache, what, spoil, text):
    apis = json.loads((FIXTURES / "toolalpaca/train_data.json").read_text())
    spoil(apis[0])
    (work / "tools.json").write_text(json.dumps(apis))
    result = run_aopd("continual", f"student.path={tiny_checkpoint}", f"teacher.path={tiny_checkpoint}",
                      "data.source=tools.json", "train.steps=1", "output_dir=cont", cwd=work, cache=lab_cache)
    assert result.returncode == 1 and text in result.stderr and "Traceback" not in result.stderr, result.stderr[-800:]
    assert not (work / "cont").exists() and not runs(work)


def refusals(work: Path, checkpoint) -> list[tuple[str, list[str], int, str]]:
    """(name, command line, exit code, text of the one line): every probe of the issue."""
    prompts_file(work / "empty_problem.jsonl", ["compute 1+1.", "   "])
    prompts_file(work / "huge.jsonl", ["compute 1+1.", "7+" * 500_000])
    (work / "zero.json").write_text("[]")
    evals = json.loads((FIXTURES / "toolalpaca/eval_simulated.json").read_text())
    evals[0]["Instructions"][0] = 42
    (work / "tool_eval.json").write_text(json.dumps(evals))
    recipes = work / "recipes"
    shutil.copytree(Path(__file__).parents[1] / "recipes", recipes)
    (recipes / "objective/broken.yaml").write_text("name: opd\nreduction: [unclosed\n")
    (recipes / "objective/evil.yaml").write_text("name: !!python/object/apply:os.system ['touch pwned']\n")
    (work / "escape.yaml").write_text("name: ../../x\nstages: [{name: a, stage: eval}]\n")
    distill = distill_args(checkpoint, "out", "train.steps=1")
    return [
        ("empty problem", [*distill, "data.source=empty_problem.jsonl"], 1, "row 1: field 'question': empty"),
        ("top_k past the vocabulary", [*distill, "objective.top_k=100000"], 2,
         "objective.top_k=100000: more than the student's vocabulary"),
        ("zero steps", [*distill[:-1], "train.steps=0"], 2, "train.steps=0: 0 steps train nothing"),
        ("experiment name leaves outputs/", ["pipeline", "experiment=escape.yaml"], 2,
         "'../../x' is used as a folder name under outputs/"),
        ("tracking experiment ../x", [*distill, "tracking.experiment=../x"], 2, "tracking.experiment='../x'"),
        ("0-row benchmark, distill", [*distill, "eval.benchmarks=[zero.json]"], 1, "zero.json: no rows"),
        ("0-row benchmark, eval", ["eval", f"student.path={checkpoint}", "eval.benchmarks=[zero.json]"], 1,
         "zero.json: no rows"),
        ("1 MB prompt", [*distill, "data.source=huge.jsonl"], 1, "passes the model's context of 1,024 tokens"),
        ("tool instruction a number", ["eval", f"student.path={checkpoint}", "eval.benchmarks=[]",
                                       "eval.tool_benchmarks=[tool_eval.json]"], 1,
         "field 'Instructions': instruction 0: expected a non-empty string, got 42"),
        ("recipe YAML syntax error", [*distill, "objective=broken"], 2, "broken.yaml: line 3, column 1: not valid YAML"),
        ("recipe YAML python tag", [*distill, "objective=evil"], 2, "Python objects are not allowed"),
    ]


def test_every_bad_input_is_one_line_before_any_folder_or_run(work, tiny_checkpoint, lab_cache):
    failed = []
    for name, args, code, text in refusals(work, tiny_checkpoint):
        before = {p.name for p in work.iterdir()}
        env_recipes = {"AOPD_RECIPES": str(work / "recipes")} if "objective=" in " ".join(args) else {}
        os.environ.update(env_recipes)
        try:
            result = run_aopd(*args, cwd=work, cache=lab_cache, timeout=300)
        finally:
            for key in env_recipes:
                os.environ.pop(key)
        lines = [line for line in result.stderr.splitlines() if line.startswith("aopd:")]
        created = {p.name for p in work.iterdir()} - before - {"mlflow.db", ".mlflow.db.aopd-lock"}
        if result.returncode != code or text not in result.stderr or "Traceback" in result.stderr or len(lines) != 1 \
                or created or runs(work):
            failed.append(f"{name}: exit {result.returncode}, created {sorted(created)}, {len(runs(work))} runs, "
                          f"stderr {result.stderr[-400:]!r}")
    assert not failed, "\n".join(failed)
    assert not (work / "pwned").exists()


def test_damaged_records_are_named_and_passed_over(work, tiny_checkpoint, lab_cache):
    args = distill_args(tiny_checkpoint, "out", "train.steps=2")
    assert run_aopd(*args, cwd=work, cache=lab_cache).returncode == 0
    for record in ("aopd_run.json", "aopd_done.json"):
        (work / "out" / record).write_text('{"identity": "ab')  # cut mid-write
    rerun = run_aopd(*args, cwd=work, cache=lab_cache)
    assert rerun.returncode == 0 and "Traceback" not in rerun.stderr, rerun.stderr[-1500:]
    assert "aopd_done.json is damaged" in rerun.stdout and "aopd_run.json is damaged" in rerun.stdout
    assert list(work.glob("out.archived-*"))  # what could not be read is kept, not overwritten


def test_a_backlog_line_cut_by_a_crash_does_not_stop_the_resume(work, tiny_checkpoint, lab_cache):
    args = distill_args(tiny_checkpoint, "out", "train.steps=6", "train.save_every=2")
    process = start_aopd(*args, cwd=work, cache=lab_cache, log=work / "run.log")
    wait_for(lambda: (work / "out/step_2/meta.json").is_file() or process.poll() is not None, what="a checkpoint")
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    run_id = json.loads((work / "out/aopd_run.json").read_text())["run_id"]
    (work / "out/tracking_backlog.jsonl").write_text(
        json.dumps({"op": "tags", "items": [["queued", "yes"]], "run_id": run_id}) + "\n" + '{"op": "metrics", "it')
    rerun = run_aopd(*args, cwd=work, cache=lab_cache)
    assert rerun.returncode == 0 and "resuming distill aopd from step 2" in rerun.stdout, rerun.stderr[-1500:]
    assert "line 2 is damaged (cut by a crash?) and is dropped" in rerun.stderr
    assert connect(f"sqlite:///{work}/mlflow.db").get_run(run_id).data.tags["queued"] == "yes"  # line 1 was sent


def test_a_sweep_whose_child_fails_ends_failed_and_a_refused_sweep_leaves_no_run(work, tiny_checkpoint, lab_cache):
    base = [arg for arg in distill_args(tiny_checkpoint, "unused", "train.steps=1")[1:]  # the sweep sets these
            if not arg.startswith(("output_dir=", "objective.top_k="))]
    failing = run_aopd("sweep", "distill", "--param", "top_k=4,100000", *base, cwd=work, cache=lab_cache)
    assert failing.returncode == 2 and "objective.top_k=100000" in failing.stderr
    statuses = {r.data.tags.get("stage"): r.info.status for r in runs(work)}
    assert statuses == {"sweep": "FAILED", "distill": "FINISHED"}, statuses
    shutil.move(work / "mlflow.db", work / "first.db")
    refused = run_aopd("sweep", "distill", "--param", "tau=0,1", *base, "eval.benchmarks=[nowhere.jsonl]",
                       cwd=work, cache=lab_cache)
    assert refused.returncode == 2 and "no benchmark file at 'nowhere.jsonl'" in refused.stderr
    assert not runs(work)


def test_the_store_lock_is_beside_the_store_and_follows_no_link(work, tiny_checkpoint, lab_cache, tmp_path_factory):
    target = tmp_path_factory.mktemp("elsewhere") / "victim"
    target.write_text("keep me")
    (work / ".mlflow.db.aopd-lock").symlink_to(target)
    result = run_aopd(*distill_args(tiny_checkpoint, "out", "train.steps=1"), cwd=work, cache=lab_cache)
    assert result.returncode == 1 and "cannot take its lock" in result.stderr and "Traceback" not in result.stderr
    assert target.read_text() == "keep me" and not (work / "out").exists()
    (work / ".mlflow.db.aopd-lock").unlink()
    assert run_aopd(*distill_args(tiny_checkpoint, "out", "train.steps=1"), cwd=work, cache=lab_cache).returncode == 0
    assert (work / ".mlflow.db.aopd-lock").is_file() and not (work / ".mlflow.db.aopd-lock").is_symlink()


def test_a_warmup_whose_closing_evaluation_fails_is_not_trained_again(work, lab_cache):
    """The closing evaluation made to fail once (as an OOM would): the rerun evaluates the checkpoint it has."""
    import subprocess
    import sys

    script = (
        "import os, sys\n"
        "import aopd_cli.stages.warmup as warmup\n"
        "from aopd_cli.errors import UserError\n"
        "from aopd_cli.cli import app\n"
        "real = warmup.evaluate_policy\n"
        "def failing(*args, **kwargs):\n"
        "    raise UserError('out of memory in the closing evaluation (injected)')\n"
        "warmup.evaluate_policy = failing if os.environ.get('FAIL_EVAL') else real\n"
        "app(sys.argv[1:], prog_name='aopd')\n")
    args = ["warmup", "student=lab_student", "train.steps=3", "train.batch_size=4", "train.micro_batch_size=4",
            "eval.limit=4", "eval.n=1", "eval.k=[1]", "eval.max_new_tokens=8", "output_dir=wu"]
    env = {**os.environ, "AOPD_CACHE": str(lab_cache)}
    failed = subprocess.run([sys.executable, "-c", script, *args], cwd=work, capture_output=True, text=True,
                            env={**env, "FAIL_EVAL": "1"})
    assert failed.returncode == 1 and "injected" in failed.stderr and (work / "wu/checkpoint/config.json").is_file()
    rerun = subprocess.run([sys.executable, "-c", script, *args], cwd=work, capture_output=True, text=True, env=env)
    assert rerun.returncode == 0, rerun.stderr[-1500:]
    assert "resuming warmup from step 3 of 3" in rerun.stdout and "steps 1-3 of 3" not in rerun.stdout
    assert "eval/lab_math/pass_at_1" in rerun.stdout  # evaluated this time
