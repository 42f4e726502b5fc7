"""Sweeps (grid, aliases, validation first, resume) and the comparison on a store made by a smoke sweep."""

import shutil
from pathlib import Path

import pytest
from cli_runs import run_aopd

from aopd_cli.config.compose import ConfigError
from aopd_cli.experiment.sweep import expand, plan_sweep
from aopd_cli.tracking.store import connect


def test_grid_expansion_with_aliases_and_hydra_sweep_grammar():
    grid = expand(["tau=-1,0", "objective.beta=range(0,1,0.5)", "intervention=choice(threshold,zero)"])
    assert len(grid) == 8
    assert grid[0] == {"objective.tau": "-1", "objective.beta": "0.0", "objective.intervention": "threshold"}
    assert {g["objective.tau"] for g in grid} == {"-1", "0"}
    assert expand([]) == [{}]


def test_every_value_is_validated_before_the_first_run(tmp_path, monkeypatch, lab_cache):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"objective.tau=3"):
        plan_sweep("distill", ["tau=0,3"], 1, [])
    with pytest.raises(ConfigError, match="objective.tauu"):
        plan_sweep("distill", ["objective.tauu=0"], 1, [])
    with pytest.raises(ConfigError, match="sweep STAGE"):
        plan_sweep("distil", ["tau=0"], 1, [])
    plan = plan_sweep("distill", ["tau=-1,0"], 2, ["train.steps=1"])
    assert len(plan.children) == 4 and {c.target.objective.tau for c in plan.children} == {-1.0, 0.0}
    assert {c.target.seed for c in plan.children} == {0, 1}
    assert plan_sweep("distill", ["tau=-1,0"], 2, ["train.steps=1"]).sweep_id == plan.sweep_id
    assert list(tmp_path.iterdir()) == []  # planning writes nothing


@pytest.fixture(scope="module")
def swept(tmp_path_factory, lab_cache):
    work = tmp_path_factory.mktemp("sweep")
    args = ["sweep", "pipeline", "experiment=lab_smoke", "--param", "tau=-1,0"]
    first = run_aopd(*args, cwd=work, cache=lab_cache)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    second = run_aopd(*args, cwd=work, cache=lab_cache)
    assert second.returncode == 0, second.stderr[-3000:]
    return work, first, second


@pytest.mark.slow
def test_pipeline_sweep_leaves_one_parent_and_tagged_children(swept):
    work, _, _ = swept
    client = connect(f"sqlite:///{work}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("aopd").experiment_id])
    parents = [r for r in runs if r.data.tags.get("stage") == "sweep"]
    assert len(parents) == 1
    aopd_runs = [r for r in runs if r.data.tags.get("stage") == "distill" and r.data.tags.get("objective") == "aopd"]
    assert sorted(r.data.params["objective.tau"] for r in aopd_runs) == ["-1.0", "0.0"]
    assert sorted(r.data.tags["sweep.objective.tau"] for r in aopd_runs) == ["-1", "0"]
    pipelines = [r for r in runs if r.data.tags.get("stage") == "pipeline"]
    assert all(r.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for r in pipelines)


@pytest.mark.slow
def test_running_the_same_sweep_again_skips_finished_children(swept):
    _, first, second = swept
    assert "2 runs, 0 already done" in first.stdout
    assert "2 runs, 2 already done" in second.stdout and second.stdout.count("skipped") == 2


@pytest.mark.slow
def test_compare_prints_the_table_and_writes_plots(swept, lab_cache):
    work, _, _ = swept
    client = connect(f"sqlite:///{work}/mlflow.db")
    parent = client.search_runs([client.get_experiment_by_name("aopd").experiment_id], "tags.stage = 'sweep'")[0]
    result = run_aopd("compare", "--parent", parent.info.run_id, "--out", "cmp", cwd=work, cache=lab_cache)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "distill:aopd tau=-1" in result.stdout and "distill:aopd tau=0" in result.stdout
    for name in ("compare.csv", "compare.md", "pass_at_1_vs_step.png", "intervention_ratio_vs_step.png",
                 "entropy_vs_step.png", "grad_norm_vs_step.png", "advantage_histogram.png", "final_pass_at_k.png",
                 "table2_continual.png"):
        assert (work / "cmp" / name).stat().st_size > 0, name
    header = (work / "cmp" / "compare.csv").read_text().splitlines()[0]
    assert "eval/lab_math/pass_at_1" in header
    logged = {a.path for a in client.list_artifacts(parent.info.run_id, "compare")}
    assert "compare/pass_at_1_vs_step.png" in logged


def test_compare_on_an_empty_store_says_what_to_do(tmp_path, lab_cache):
    result = run_aopd("compare", cwd=tmp_path, cache=lab_cache)
    assert result.returncode == 1 and "run a stage or a sweep first" in result.stderr


@pytest.mark.slow
def test_a_stage_sweep_tags_its_runs_and_compares_by_swept_value(swept, lab_cache):
    work, _, _ = swept
    teacher = next((lab_cache / "checkpoints").glob("warmup-*"))
    args = ["sweep", "distill", "--param", "tau=-1,1", f"student.path={teacher}", f"teacher.path={teacher}",
            "train.steps=1", "train.batch_size=4", "train.micro_batch_size=4", "objective.top_k=4", "eval.limit=4",
            "eval.n=2", "eval.k=[1]", "train.eval_every=0", "tracking.experiment=stage-sweep"]
    result = run_aopd(*args, cwd=work, cache=lab_cache)
    assert result.returncode == 0, result.stderr[-2000:]
    client = connect(f"sqlite:///{work}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("stage-sweep").experiment_id], "tags.stage = 'distill'")
    assert sorted(r.data.params["objective.tau"] for r in runs) == ["-1.0", "1.0"]
    table = run_aopd("compare", "--experiment", "stage-sweep", "--out", "cmp2", cwd=work, cache=lab_cache)
    assert "distill:aopd tau=-1" in table.stdout and "distill:aopd tau=1" in table.stdout


def test_an_edited_experiment_file_is_another_sweep(tmp_path, lab_cache, monkeypatch):
    """The same command after an edit to the experiment it names must not call the old runs "done before";
    an edit to another experiment leaves the sweep (and its resume) as it was."""
    experiments = tmp_path / "experiments"
    shutil.copytree(Path(__file__).parents[1] / "experiments", experiments)
    monkeypatch.setenv("AOPD_EXPERIMENTS", str(experiments))
    first = plan_sweep("pipeline", [], 1, ["experiment=lab_smoke"]).sweep_id
    assert plan_sweep("pipeline", [], 1, ["experiment=lab_smoke"]).sweep_id == first
    (experiments / "ablation_tau.yaml").write_text("name: ablation_tau\nstages: []\n")
    assert plan_sweep("pipeline", [], 1, ["experiment=lab_smoke"]).sweep_id == first
    smoke = experiments / "lab_smoke.yaml"
    smoke.write_text(smoke.read_text().replace("train.steps=3", "train.steps=4"))
    assert plan_sweep("pipeline", [], 1, ["experiment=lab_smoke"]).sweep_id != first


def test_an_experiment_with_two_stages_of_one_name_is_refused(tmp_path):
    experiment = tmp_path / "twice.yaml"
    experiment.write_text("name: twice\nstages:\n  - {name: a, stage: eval}\n  - {name: a, stage: eval}\n")
    result = run_aopd("show", "pipeline", f"experiment={experiment}", cwd=tmp_path)
    assert result.returncode == 2 and "stage name 'a' is used more than once" in result.stderr
    assert "Traceback" not in result.stderr
