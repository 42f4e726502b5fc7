"""The command line as a user meets it: help, show, refusals that write nothing."""

import statistics
import subprocess
import sys
import time

import pytest
from helpers import run_aopd

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
    (("eval", "eval.n=2", "eval.k=[1,4]"), ["k must be <= n"]),
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
