"""What a researcher meets in `mlflow ui`: a real UI server on loopback, on the runs of a small pipeline
sweep, read through the REST API its pages call (`/ajax-api/2.0/mlflow/...`): the experiment opens on
its runs with a description, runs are named by what they are and carry their params, tags, metrics and
datasets, and the view aopd's closing line links to has the useful columns.

    python -m pytest tests/test_mlflow_ui.py -q
"""

import json
import os
import signal
import urllib.parse
import urllib.request

import pytest
from cli_runs import run_aopd, start_aopd, wait_for
from test_tracking import free_port, start_server, stop_server

# a distillation and the evaluation of its checkpoint, as small as a pipeline gets
EXPERIMENT = """\
name: ui_check
overrides: [train.batch_size=8, train.micro_batch_size=4, objective.top_k=4, eval.limit=4, eval.n=2, "eval.k=[1]",
            train.eval_every=0, rollout.max_new_tokens=24, eval.max_new_tokens=24, "eval.tool_benchmarks=[]"]
stages:
  - {{name: aopd, stage: distill, overrides: [objective=aopd, "student.path={0}", "teacher.path={0}", train.steps=2]}}
  - {{name: eval_aopd, stage: eval, overrides: ["student.path=@aopd"]}}
"""


def ui(base: str, path: str, body: dict | None = None) -> dict:
    """One call as the UI makes it: GET with a query, or POST with a JSON body."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(f"{base}/ajax-api/2.0/mlflow/{path}", data=data,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)


def pairs(items: list[dict]) -> dict[str, str]:
    return {item["key"]: item["value"] for item in items}


@pytest.fixture(scope="module")
def ui_server(tmp_path_factory, tiny_checkpoint, lab_cache):
    """The sweep's store served by `mlflow ui`; yields (base URL, the sweep's output). Stopped however the
    tests end."""
    work = tmp_path_factory.mktemp("ui")
    (work / "ui_check.yaml").write_text(EXPERIMENT.format(tiny_checkpoint))
    swept = run_aopd("sweep", "pipeline", f"experiment={work / 'ui_check.yaml'}", "--param", "tau=-1,0",
                     cwd=work, cache=lab_cache)
    assert swept.returncode == 0, swept.stdout[-3000:] + swept.stderr[-3000:]
    port = free_port()
    server = start_server(work, port, store=f"sqlite:///{work}/mlflow.db", command="ui")
    try:
        yield f"http://127.0.0.1:{port}", swept.stdout
    finally:
        stop_server(server)


@pytest.mark.slow
def test_the_experiment_opens_on_its_runs_with_a_description(ui_server):
    base, stdout = ui_server
    with urllib.request.urlopen(base, timeout=30) as page:
        assert page.status == 200 and "<div id=\"root\"" in page.read().decode()
    experiment = ui(base, "experiments/get-by-name?experiment_name=aopd")["experiment"]
    tags = pairs(experiment["tags"])
    assert tags["mlflow.experimentKind"] == "custom_model_development"  # model training, not GenAI
    assert "aopd compare" in tags["mlflow.note.content"]
    # the closing line links to the runs table in its Model training view, with a shared view of columns
    link = f"/#/experiments/{experiment['experiment_id']}/runs?workflowType=machine_learning&viewStateShareKey=aopd"
    assert link in stdout and "mlflow ui --backend-store-uri sqlite:///mlflow.db" in stdout
    view = json.loads(tags["mlflow.sharedViewState.aopd"])
    assert view["selectedColumns"][:2] == ["tags.`objective`", "tags.`sweep.objective.tau`"]  # eval runs have them
    assert {"metrics.`eval/lab_math/pass_at_1`", "metrics.`train/loss`"} <= set(view["selectedColumns"])
    # the view lists the sweep's training runs, one flat list by name (sorted by start time, the UI folds
    # them); the eval runs, which repeat their stage's closing evaluation, are left out
    listed = ui(base, "runs/search", {"experiment_ids": [experiment["experiment_id"]], "filter": view["searchFilter"],
                                      "order_by": [view["orderByKey"] + " ASC"]})["runs"]
    assert [run["info"]["run_name"] for run in listed] == ["aopd tau=-1 seed=0", "aopd tau=0 seed=0"]


@pytest.mark.slow
def test_runs_are_named_by_what_they_are_and_carry_params_tags_metrics_and_datasets(ui_server):
    base, _ = ui_server
    experiment = ui(base, "experiments/get-by-name?experiment_name=aopd")["experiment"]
    runs = ui(base, "runs/search", {"experiment_ids": [experiment["experiment_id"]], "max_results": 100,
                                    "order_by": ["attributes.start_time ASC"]})["runs"]
    by_name = {run["info"]["run_name"]: run for run in runs}
    assert [name for name in by_name if not name.startswith("sweep pipeline ")] == [
        "ui_check tau=-1 seed=0", "aopd tau=-1 seed=0", "eval_aopd tau=-1 seed=0",
        "ui_check tau=0 seed=0", "aopd tau=0 seed=0", "eval_aopd tau=0 seed=0"]
    for tau in ("-1", "0"):
        pipeline = by_name[f"ui_check tau={tau} seed=0"]["info"]["run_id"]
        distill, evaluation = by_name[f"aopd tau={tau} seed=0"], by_name[f"eval_aopd tau={tau} seed=0"]
        params, tags = pairs(distill["data"]["params"]), pairs(distill["data"]["tags"])
        assert params["objective.name"] == "aopd" and float(params["objective.tau"]) == float(tau)
        assert params["train.lr"] and params["train.steps"] == "2"
        assert {k: tags[k] for k in ("stage", "objective", "seed", "world_size", "sweep.objective.tau")} == {
            "stage": "distill", "objective": "aopd", "seed": "0", "world_size": "1", "sweep.objective.tau": tau}
        assert {"train/loss", "train/intervention_ratio", "eval/lab_math/pass_at_1"} <= {
            m["key"] for m in distill["data"]["metrics"]}
        history = ui(base, "metrics/get-history?" + urllib.parse.urlencode(
            {"run_id": distill["info"]["run_id"], "metric_key": "train/loss"}))["metrics"]
        assert sorted(m["step"] for m in history) == [1, 2]
        eval_tags = pairs(evaluation["data"]["tags"])
        assert {k: eval_tags[k] for k in ("stage", "evaluates", "objective", "seed", "sweep.objective.tau")} == {
            "stage": "eval", "evaluates": "aopd", "objective": "aopd", "seed": "0", "sweep.objective.tau": tau}
        assert eval_tags["mlflow.parentRunId"] == tags["mlflow.parentRunId"] == pipeline
        assert "eval/lab_math/pass_at_1" in {m["key"] for m in evaluation["data"]["metrics"]}
        for run, context, rows in ((distill, "train", None), (evaluation, "eval", 4)):
            (used,) = [d for d in run["inputs"]["dataset_inputs"] if pairs(d["tags"])["mlflow.data.context"] == context]
            assert used["dataset"]["name"] == "lab_math" and len(used["dataset"]["digest"]) == 16
            assert json.loads(used["dataset"]["source"]) == {"uri": "lab_math"}
            logged_rows = json.loads(used["dataset"]["profile"])["num_rows"]
            assert logged_rows == rows if rows else logged_rows > 0


@pytest.mark.slow
def test_the_link_works_while_the_pipeline_runs(tmp_path, tiny_checkpoint, lab_cache):
    """The view is written when the pipeline starts: opened mid-run, it lists the stage that is running."""
    (tmp_path / "ui_check.yaml").write_text(EXPERIMENT.format(tiny_checkpoint).replace("train.steps=2",
                                                                                       "train.steps=5000"))
    process = start_aopd("pipeline", f"experiment={tmp_path / 'ui_check.yaml'}", cwd=tmp_path, cache=lab_cache,
                         log=tmp_path / "pipeline.log")
    server = None
    try:
        wait_for(lambda: "watch its runs with" in (tmp_path / "pipeline.log").read_text() or process.poll() is not None,
                 what="the pipeline's first line with the link")
        # as a user would: the line says to start `mlflow ui`; started once the store exists (aopd also waits out a
        # UI that is still creating a new store's tables, but the UI's own migration may not wait for aopd's)
        port = free_port()
        server = start_server(tmp_path, port, store=f"sqlite:///{tmp_path}/mlflow.db", command="ui")
        base = f"http://127.0.0.1:{port}"
        wait_for(lambda: "step 1/5000" in (tmp_path / "pipeline.log").read_text() or process.poll() is not None,
                 what="the distillation's first step")
        assert process.poll() is None, (tmp_path / "pipeline.log").read_text()[-2000:]
        link = next(line for line in (tmp_path / "pipeline.log").read_text().splitlines() if "watch its runs" in line)
        experiment = ui(base, "experiments/get-by-name?experiment_name=aopd")["experiment"]
        assert f"#/experiments/{experiment['experiment_id']}/runs?workflowType=machine_learning&viewStateShareKey=aopd" in link
        view = json.loads(pairs(experiment["tags"])["mlflow.sharedViewState.aopd"])
        listed = ui(base, "runs/search", {"experiment_ids": [experiment["experiment_id"]],
                                          "filter": view["searchFilter"]})["runs"]
        assert [(run["info"]["run_name"], run["info"]["status"]) for run in listed] == [("aopd", "RUNNING")]
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=120)
        if server is not None:
            stop_server(server)
