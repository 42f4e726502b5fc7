"""`aopd compare` never misleads: a metric a run did not log is blank (never 0), runs are grouped by
their whole config less the seed and the run folders, the default is the latest sweep or pipeline (and
it says so), the terminal table fits 100 columns, and the plots keep rates in [0, 1], integer steps and
coinciding lines visible. The store is written with MlflowClient directly: no training, seconds."""

import csv

import pytest

from aopd_cli import metrics as names
from aopd_cli.results import plots
from aopd_cli.results.compare import group_runs, run_compare, select_runs
from aopd_cli.tracking.store import connect, find_runs

PASS1, TOOL = names.pass_at("lab_math", 1), names.tool("lab_tools", "success")
BASE = {"stage": "distill", "objective.name": "aopd", "objective.tau": "0.0", "train.steps": "3", "train.lr": "0.0005",
        "tracking.experiment": "t", "resume": "auto", "student.path": "/cache/warmup-1"}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A standalone pipeline (older), then a sweep: tau=-1,0 x seeds 0,1 of distill + eval (only tau=-1's
    evals logged tool success), a config with other train.steps, and a continual run without tool success."""
    root = tmp_path_factory.mktemp("store")
    uri = f"sqlite:///{root}/mlflow.db"
    client = connect(uri)
    experiment = client.create_experiment("t")
    clock = iter(range(1_000_000, 2_000_000, 1000))

    def run(name, tags, params=None, metrics=None, parent=None, steps=None):
        tags = {"mlflow.runName": name, **tags, **({"mlflow.parentRunId": parent} if parent else {})}
        made = client.create_run(experiment, start_time=next(clock), tags=tags, run_name=name)
        for key, value in (params or {}).items():
            client.log_param(made.info.run_id, key, value)
        for key, value in (metrics or {}).items():
            for step, v in (steps or {}).get(key, [(3, value)]):
                client.log_metric(made.info.run_id, key, v, step=step)
        client.set_terminated(made.info.run_id, "FINISHED")
        return made.info.run_id

    old = run("pipeline:lab", {"stage": "pipeline"})
    run("aopd", {"stage": "distill", "objective": "aopd"}, {**BASE, "seed": "0", "output_dir": "outputs/lab/aopd"},
        {PASS1: 0.9}, parent=old)
    sweep = run("sweep:pipeline:abc", {"stage": "sweep"})
    for tau, values in (("-1", (0.2, 0.4)), ("0", (0.5, 0.5))):
        for seed, value in zip(("0", "1"), values):
            child = f"outputs/sweeps/abc/{tau}{seed}"
            tags = {"sweep.objective.tau": tau, "sweep.seed": seed}
            pipe = run("pipeline:lab", {"stage": "pipeline", **tags}, parent=sweep)
            run("aopd", {"stage": "distill", "objective": "aopd", **tags},
                {**BASE, "objective.tau": f"{float(tau)}", "seed": seed, "output_dir": f"{child}/aopd"},
                {PASS1: value, names.train("intervention_ratio"): 0.3}, parent=pipe,
                steps={PASS1: [(0, 0.1), (2, value / 2), (3, value)]})
            run("eval_aopd", {"stage": "eval", **tags},
                {"stage": "eval", "seed": seed, "output_dir": f"{child}/eval_aopd",
                 "student.path": f"{child}/aopd/checkpoint"},
                {PASS1: value, **({TOOL: 0.75} if tau == "-1" else {})}, parent=pipe)
    run("aopd", {"stage": "distill", "objective": "aopd", "sweep.objective.tau": "0"},
        {**BASE, "train.steps": "5", "seed": "0", "output_dir": "outputs/sweeps/abc/x/aopd"}, {PASS1: 0.7}, parent=sweep)
    run("aopd_tools", {"stage": "continual", "objective": "aopd"},
        {**BASE, "stage": "continual", "seed": "0", "output_dir": "outputs/sweeps/abc/y/aopd_tools"},
        {PASS1: 0.25, names.retention(2, "change"): -0.125}, parent=sweep)
    return uri, sweep, old


def test_groups_are_seeds_of_one_config_never_other_steps(store):
    uri, sweep, _ = store
    runs, scope = select_runs(find_runs(uri, "t"), None, False)
    assert sweep in scope and "latest sweep" in scope
    groups, notes = group_runs(runs)
    sizes = {label: len(members) for label, members in groups.items()}
    assert sizes == {"distill:aopd tau=-1": 2, "distill:aopd tau=0 [train.steps=3]": 2,
                     "distill:aopd tau=0 [train.steps=5]": 1, "eval:eval_aopd tau=-1": 2, "eval:eval_aopd tau=0": 2,
                     "continual:aopd_tools": 1}
    assert notes == []
    every, _ = select_runs(find_runs(uri, "t"), None, True)
    assert len(every) == len(runs) + 1  # --all adds the standalone pipeline's stage


def test_table_and_csv_blank_a_missing_metric_and_fit_100_columns(store, tmp_path, capsys):
    uri, sweep, _ = store
    run_compare(experiment="t", parent=None, metrics=[], out_dir=str(tmp_path), tracking_uri=uri)
    printed = capsys.readouterr().out
    assert f"the latest sweep, sweep:pipeline:abc (run {sweep}" in printed
    assert max(len(line) for line in printed.splitlines()) <= 100
    row = next(line for line in printed.splitlines() if "distill:aopd tau=-1" in line)
    assert "0.300 ± 0.141" in row and " 2 " in row  # two seeds, std over seeds
    tools = next(line for line in printed.splitlines() if "continual:aopd_tools" in line)
    assert "0.000" not in tools
    with open(tmp_path / "compare.csv") as handle:
        rows = {r["group"]: r for r in csv.DictReader(handle)}
    assert rows["continual:aopd_tools"][TOOL] == "" and rows["continual:aopd_tools"][f"{TOOL} n"] == "0"
    assert rows["eval:eval_aopd tau=0"][TOOL] == "" and rows["eval:eval_aopd tau=0"]["seeds"] == "2"
    assert float(rows["distill:aopd tau=-1"][PASS1]) == pytest.approx(0.3)
    assert "|  |" in (tmp_path / "compare.md").read_text()  # a blank cell, not 0
    for name in ("pass_at_1_vs_step.png", "final_pass_at_k.png", "table2_continual.png", "advantage_histogram.png"):
        assert (tmp_path / name).stat().st_size > 0


def test_parent_and_all_choose_other_runs(store, tmp_path, capsys):
    uri, _, old = store
    run_compare(experiment="t", parent=old, metrics=[PASS1], out_dir=str(tmp_path), tracking_uri=uri)
    printed = capsys.readouterr().out
    assert "distill:aopd " in printed and "0.900" in printed and "tau=-1" not in printed
    run_compare(experiment="t", parent=None, metrics=[], out_dir=str(tmp_path), tracking_uri=uri, every=True)
    assert "every finished run" in capsys.readouterr().out


def test_a_missing_bar_is_marked_not_drawn_as_zero(tmp_path):
    plt = plots.pyplot()
    fig, ax = plt.subplots()
    plots._bars(ax, [None, 0.0, 0.5], [None, None, 0.1], 0, 0.5)
    texts = [t.get_text() for t in ax.texts]
    assert texts == ["not\nlogged", "0.000", "0.500"] and len(ax.patches) == 2
    plt.close(fig)
    k, labels, tool, change = plots.table2_data({"x": [_fake({names.retention(2, "change"): 0.1})]})
    assert tool == [None] and change == [0.1] and k == 2


def test_curves_keep_rates_in_0_1_integer_steps_and_say_what_coincides(tmp_path, monkeypatch):
    seen = {}
    monkeypatch.setattr(plots, "_save", lambda fig, ax, path, *rest: seen.update(ax=ax) or path)
    same = (1, ([1, 2, 3], [0.0, 0.0, 0.0], [0, 0, 0]))
    plots.line_plot({"opd": same, "aopd tau=-1": same, "gkd": (1, ([], [], []))}, tmp_path / "x.png", "t", "y",
                    True, PASS1)
    ax = seen["ax"]
    labels = ax.get_legend_handles_labels()[1]
    assert "aopd tau=-1 (1 seed), identical to opd" in labels
    assert "not logged (not drawn): gkd" in labels
    assert ax.get_ylim() == (0, 1)
    assert all(float(t).is_integer() for t in ax.get_xticks())
    plots.pyplot().close("all")


def _fake(metrics):
    from types import SimpleNamespace

    return SimpleNamespace(data=SimpleNamespace(metrics=metrics, tags={"stage": "continual"}, params={}),
                           info=SimpleNamespace(run_id="r"))


def test_an_unknown_parent_is_named_as_such(tmp_path):
    from cli_runs import run_aopd

    result = run_aopd("compare", "--parent", "deadbeef", cwd=tmp_path)
    assert result.returncode == 1 and "--parent deadbeef: no such run in experiment 'aopd'" in result.stderr
