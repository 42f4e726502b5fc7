"""Metric names round-trip through their one owner; plots read what was logged, never a default."""

from types import SimpleNamespace

from aopd_cli import metrics as names
from aopd_cli.results.plots import _table2, table2_data


def fake_run(metrics: dict, stage: str = "continual"):
    return SimpleNamespace(data=SimpleNamespace(metrics=metrics, tags={"stage": stage}, params={}),
                           info=SimpleNamespace(run_id="r"))


def test_metric_names_are_built_and_parsed_in_one_place():
    assert names.parse_eval(names.pass_at("aime24", 4)) == names.EvalKey("aime24", "pass_at", 4)
    assert names.parse_eval(names.tool("lab_tools", "success")).kind == "success"
    assert names.parse_eval(names.train("loss")) is None
    assert names.parse_retention(names.retention(2, "change")) == (2, "change")
    keys = [names.pass_at("a", 1), names.pass_at("a", 8), names.pass_at(names.MATH_AVG, 4), names.tool("t", "success")]
    assert names.largest_k(keys) == 8 and names.math_benchmarks(keys) == ["a"] and names.tool_benchmarks(keys) == ["t"]
    timings = {}
    with names.timed("rollout", timings):
        pass
    assert list(timings) == ["time/rollout_s"]


def test_table2_plot_uses_the_largest_k_evaluated(tmp_path):
    # lab_smoke evaluates k = 1, 2: the plot must show the Pass@2 change, not a Pass@4 default of 0
    run = fake_run({names.tool("lab_tools", "success"): 0.25, names.retention(1, "change"): 0.1,
                    names.retention(2, "change"): -0.125, names.retention(2, "before"): 0.5})
    k, labels, tool, change = table2_data({"continual:aopd_tools": [run]})
    assert (k, labels, tool, change) == (2, ["continual:aopd_tools"], [0.25], [-0.125])
    assert _table2({"continual:aopd_tools": [run]}, tmp_path).stat().st_size > 0


def test_table2_says_when_no_retention_was_logged(tmp_path):
    run = fake_run({names.tool("lab_tools", "success"): 0.5})
    k, _, tool, change = table2_data({"x": [run]})
    assert k is None and tool == [0.5] and change == [None]
    assert _table2({"x": [run]}, tmp_path).is_file()
