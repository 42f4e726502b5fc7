"""Configs you can discover: `aopd ls`, each command's help, `aopd show`'s summary and --full, and the
check of local inputs (a missing file exits 2 unless an earlier stage of the pipeline writes it)."""

from pathlib import Path

import pytest
import yaml
from cli_runs import run_aopd

from aopd_cli.config.compose import load_stage_config
from aopd_cli.config.paths import looks_local, missing_inputs
from aopd_cli.errors import ConfigError


def test_ls_lists_experiments_with_descriptions_and_every_group(tmp_path):
    result = run_aopd("ls", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "lab_smoke" in result.stdout and "CPU lab, tiny Qwen3 models" in result.stdout
    for group in ("student", "teacher", "data", "objective", "rollout", "eval"):
        assert f"  {group}" in result.stdout
    assert "aopd, exopd, gkd, opd, seqkd" in result.stdout


def test_ls_group_gives_keys_defaults_and_ranges(tmp_path):
    result = run_aopd("ls", "objective", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert any(line.split()[:2] == ["tau", "0.0"] and ">= -1.0, <= 1.0" in line for line in lines)
    assert "objective=gkd" in result.stdout and any(line.split()[:2] == ["lmbda", "1.0"] for line in lines)
    assert "threshold | zero | accuracy" in result.stdout
    bad = run_aopd("ls", "objectiv", cwd=tmp_path)
    assert bad.returncode == 2 and "no such group" in bad.stderr


@pytest.mark.parametrize("command", ["warmup", "distill", "continual", "eval", "pipeline", "sweep", "compare",
                                     "show", "ls"])
def test_help_shows_groups_keys_and_two_examples(tmp_path, command):
    result = run_aopd(command, "--help", cwd=tmp_path)
    assert result.returncode == 0 and "Main keys:" in result.stdout and "Examples:" in result.stdout
    assert result.stdout.count(f"aopd {command}") >= 2


def test_pipeline_summary_is_one_screen_and_full_is_the_yaml(tmp_path, monkeypatch):
    from aopd_cli.config.summary import show_pipeline
    from aopd_cli.experiment.pipeline import plan_pipeline

    monkeypatch.chdir(tmp_path)
    plan = plan_pipeline(["experiment=paper_8b_3k"])
    summary = show_pipeline(plan, full=False)
    assert len(summary.splitlines()) < 60
    assert "aopd (distill)" in summary and "teacher Qwen/Qwen3-32B" in summary and "objective=aopd tau=0.0" in summary
    full = show_pipeline(plan, full=True)
    assert len(full.splitlines()) > 500 and "# --- sft (warmup)" in full
    first = full.split("# --- ")[1].split("\n", 1)[1]
    assert yaml.safe_load(first)["stage"] == "warmup"


def test_a_missing_data_file_exits_2_naming_it_and_writes_nothing(tmp_path):
    result = run_aopd("show", "distill", "data.source=/tmp/nope.jsonl", cwd=tmp_path)
    assert result.returncode == 2 and "data.source: no data file or folder at '/tmp/nope.jsonl'" in result.stderr
    assert list(tmp_path.iterdir()) == []
    result = run_aopd("show", "eval", "student.path=./ckpt", "--full", cwd=tmp_path)
    assert result.returncode == 2 and "student.path: no checkpoint at './ckpt'" in result.stderr


def test_a_pipeline_does_not_miss_the_checkpoints_its_own_stages_write(tmp_path, monkeypatch):
    from aopd_cli.config.summary import show_pipeline
    from aopd_cli.experiment.pipeline import plan_pipeline

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("AOPD_CACHE", str(tmp_path / "empty-cache"))  # no warm-up is cached yet
    summary = show_pipeline(plan_pipeline(["experiment=lab"]), full=False)
    assert "student ← student_sft; teacher ← teacher" in summary
    with pytest.raises(ConfigError, match="opd: student.path: no checkpoint at './gone'"):
        show_pipeline(plan_pipeline(["experiment=lab", "opd.student.path=./gone"]), full=False)


def test_hub_ids_known_names_and_paths_are_told_apart(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert not looks_local("Qwen/Qwen3-8B") and not looks_local("Qwen/Qwen2.5-7B")
    assert all(looks_local(p) for p in ("./x", "../x", "/x", "~/x", "mine.jsonl", "a/b/c", "org/data.parquet"))
    (tmp_path / "bad.csv").write_text("a\n")
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    config = load_stage_config("distill", ["student.path=Qwen/Qwen3-8B", "teacher.path=./ckpt",
                                           "data.source=bad.csv", "eval.benchmarks=[aime24,lab_math,bench.jsonl]"])
    problems = missing_inputs(config)
    assert problems == ["teacher.path: './ckpt' is not a checkpoint (no config.json in it)",
                        "data.source: 'bad.csv' is not a .jsonl, .json or .parquet file",
                        "eval.benchmarks: no benchmark file at 'bench.jsonl'"]
    assert len(missing_inputs(config, made_upstream={Path("ckpt")})) == 2  # an upstream stage writes it


def test_show_stage_notes_what_the_lab_writes_instead_of_refusing(tmp_path):
    result = run_aopd("show", "distill", "objective=aopd", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "# student.path: not there yet; `aopd pipeline` (the lab) writes it" in result.stdout
    assert len(result.stdout.splitlines()) < 20
