"""Bad files and settings get one line naming the file or key, a non-zero exit, no traceback, and
nothing written; checks run before any model loads."""

import shutil
import subprocess
import sys
import time

import pytest
from cli_runs import distill_args, run_aopd

pytestmark = pytest.mark.slow


@pytest.fixture
def bad_files(tmp_path, tiny_checkpoint):
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "broken.jsonl").write_text('{"question": "1+1", "final_answer": "2"}\n{not json\n')
    (tmp_path / "noise.parquet").write_bytes(bytes(range(256)) * 3)
    shutil.copytree(tiny_checkpoint, tmp_path / "truncated")
    weights = tmp_path / "truncated/model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    (tmp_path / "a_file").write_text("x")
    return tmp_path


CASES = [  # (arguments after the tiny distill ones, exit code, text in the one line)
    (["data.source=empty.jsonl"], 1, "empty.jsonl: empty (no rows)"),
    (["data.source=broken.jsonl"], 1, "broken.jsonl: line 2: not valid JSON"),
    (["data.source=noise.parquet"], 1, "noise.parquet: cannot read it as parquet"),
    (["student.path=truncated"], 1, "truncated/model.safetensors: truncated"),
    (["tracking.uri=foo://bar"], 1, "unknown scheme 'foo'"),
    (["output_dir=a_file/out"], 1, "output_dir=a_file/out: cannot write there"),
    (["data.source=data/mine.jsonl"], 2, "data.source: no data file or folder at 'data/mine.jsonl'"),
    (["eval.benchmarks=[nowhere.jsonl]"], 2, "eval.benchmarks: no benchmark file at 'nowhere.jsonl'"),
    (["train.lr=inf"], 2, "train.lr=inf: Input should be a finite number"),
    (["objective=exopd", "objective.lam=inf"], 2, "objective.lam=inf: Input should be a finite number"),
]


@pytest.mark.parametrize("extra, code, text", CASES, ids=[c[2].split(":")[0] for c in CASES])
def test_one_clear_line_and_nothing_written(bad_files, tiny_checkpoint, lab_cache, extra, code, text):
    before = set(bad_files.iterdir())
    started = time.time()
    result = run_aopd(*distill_args(tiny_checkpoint, "out", "train.steps=1"), *extra, cwd=bad_files, cache=lab_cache)
    assert result.returncode == code, result.stderr[-2000:]
    assert text in result.stderr and "Traceback" not in result.stderr
    assert len([line for line in result.stderr.splitlines() if line.startswith("aopd:")]) == 1
    assert set(bad_files.iterdir()) - before <= {bad_files / "mlflow.db", bad_files / ".mlflow.db.aopd-lock"}  # no output folder
    assert time.time() - started < 60  # no hub retries for a missing relative path


def test_bad_sweep_grammar_is_refused(tmp_path):
    result = run_aopd("sweep", "distill", "--param", "tau=range(0,1", cwd=tmp_path)
    assert result.returncode == 2 and "not Hydra's sweep grammar" in result.stderr and "Traceback" not in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_no_room_on_disk_is_caught_before_the_run(tiny_checkpoint, tmp_path, monkeypatch):
    import collections

    import aopd_cli.stages.preflight as preflight
    from aopd_cli.config.compose import load_stage_config
    from aopd_cli.errors import UserError

    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda path: collections.namedtuple("u", "free")(1000))
    config = load_stage_config("distill", distill_args(tiny_checkpoint, str(tmp_path / "out"))[1:])
    with pytest.raises(UserError, match=r"free on its disk, one checkpoint needs about"):
        preflight.check_output(config, training=True)


def test_a_truncated_cached_warmup_is_rebuilt(tmp_path, monkeypatch):
    """In a cache of its own: the truncated checkpoint is set aside as `warmup-*.changed-*`, which the tests
    sharing the session's cache would otherwise pick up as a warm-up (five failed so, by the order of a run)."""
    lab_cache = tmp_path / "cache"
    monkeypatch.setenv("AOPD_CACHE", str(lab_cache))  # for cached_checkpoint below, read in this process
    args = ["warmup", "student=lab_student", "train.steps=2", "train.batch_size=4", "train.micro_batch_size=4",
            "eval.benchmarks=[]", "reuse_cached=true", "tracking.enabled=false"]
    from aopd_cli.config.compose import load_stage_config
    from aopd_cli.stages.warmup import cached_checkpoint

    first = run_aopd(*args, "output_dir=one", cwd=tmp_path, cache=lab_cache)
    assert first.returncode == 0, first.stderr[-2000:]
    cached = cached_checkpoint(load_stage_config("warmup", args[1:]))
    weights = cached / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:500])
    second = run_aopd(*args, "output_dir=two", cwd=tmp_path, cache=lab_cache)
    assert second.returncode == 0 and "reusing the cached" not in second.stdout
    from aopd_cli.training.checkpoints import checkpoint_problem

    assert checkpoint_problem(cached) is None  # rebuilt in place
    third = run_aopd(*args, "output_dir=three", cwd=tmp_path, cache=lab_cache)
    assert "reusing the cached warm-up checkpoint" in third.stdout


def test_two_first_runs_share_a_new_mlflow_db(tmp_path, tiny_checkpoint, lab_cache):
    import os

    env = {**os.environ, "AOPD_CACHE": str(lab_cache)}
    procs = [subprocess.Popen([sys.executable, "-m", "aopd_cli.cli", *distill_args(tiny_checkpoint, f"out{i}",
                                                                                     "train.steps=1")],
                              cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    outputs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-1500:] for _, err in outputs]
