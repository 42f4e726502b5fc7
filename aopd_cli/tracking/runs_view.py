"""The link that opens MLflow's runs table on a stage's, pipeline's or sweep's runs: the `mlflow ui` command,
and a shared view of the experiment (its columns and filter) that the UI reads from an experiment tag.

    python -m pytest tests/test_mlflow_ui.py -q
"""

from __future__ import annotations

import json

from aopd_cli.tracking.store import DEFAULT_URI, connect, experiment_id

UI_URL = "http://127.0.0.1:5000"  # where `mlflow ui` serves by default
UI_VIEW = "aopd"  # the runs table's shared view that aopd writes and links to


# keys that differ between runs by construction, or name data and models rather than a method's knob
_NOT_KNOBS = ("output_dir", "tracking.", "seed", "resume", "threads", "dist_timeout_s", "student.", "teacher.", "base.",
              "data.", "eval.", "tool_data.", "stage")


def _flat(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat |= _flat(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def varying_keys(configs, limit: int = 4) -> list[str]:
    """The knobs that differ between the training stages of these configs (an ablation's), as columns."""
    found = []
    for stage in ("distill", "continual"):  # within a kind of stage: a continual stage's lr is not a knob
        flats = [_flat(c.model_dump(mode="json")) for c in configs if c.stage == stage]
        keys = sorted({key for flat in flats for key in flat if not key.startswith(_NOT_KNOBS)} - {"objective.name"})
        # a key that only some objectives have (beta: aopd and gkd) varies only where it has two values
        found += [key for key in keys if len({repr(flat[key]) for flat in flats if key in flat}) > 1]
    return list(dict.fromkeys(found))[:limit]


def table_columns(configs, swept=()) -> list[str]:
    """The runs table's columns for runs of these stage configs, as the UI names them: the objective and
    the swept values as tags (eval runs carry them too), the knobs that differ between the stages (an
    ablation's, as params; else `objective.tau`), each benchmark's Pass@1 and tool success, the loss."""
    from aopd_cli import metrics as names

    configs = list(configs)
    tags = ["objective", *(f"sweep.{key}" for key in swept if key != "seed")]
    knobs = [key for key in varying_keys(configs) if key not in swept] or (["objective.tau"] if len(tags) == 1 else [])
    evals = [config.eval for config in configs if getattr(config, "eval", None) is not None]
    metrics = ([names.pass_at(b, 1) for e in evals for b in e.benchmarks]
               + [names.tool(b, "success") for e in evals for b in e.tool_benchmarks] + [names.train("loss")])
    return ([f"tags.`{k}`" for k in tags] + [f"params.`{k}`" for k in knobs]
            + [f"metrics.`{k}`" for k in dict.fromkeys(metrics)])


# the rows a view lists: the training stages (an eval stage repeats its stage's closing evaluation) and no
# warm-up reused from the cache (it trained nothing)
TRAINING_ROWS = "tags.stage != 'eval' and tags.stage != 'pipeline' and tags.reused_checkpoint IS NULL"


def runs_view(client, experiment: str, columns: list[str], search: str = "") -> str:
    """Write the runs table's view (these columns; the runs matching `search`, one flat list by name) as a
    shared view of the experiment, an experiment tag the UI reads; the URL fragment that opens it in the
    UI's Model training workflow. A shared view cannot unfold parent runs, and sorted by start time the
    table folds stages under their pipeline: sorted by name it lists them, `aopd tau=-1` next to `aopd tau=0`."""
    exp = experiment_id(client, experiment)
    # columns wide enough for their names (the UI's 100 px cut `eval/lab_math/pass_at_1` to `eval/lab_math/p`)
    widths = {"attributes.`Run Name`": 260, **{c: min(220, 40 + 7 * len(c.split("`")[1])) for c in columns}}
    view = {"searchFilter": search, "orderByKey": "tags.`mlflow.runName`", "orderByAsc": True,
            "selectedColumns": columns, "columnOrder": list(widths), "columnWidths": widths}
    client.set_experiment_tag(exp, f"mlflow.sharedViewState.{UI_VIEW}", json.dumps(view))
    return f"#/experiments/{exp}/runs?workflowType=machine_learning&viewStateShareKey={UI_VIEW}"


def runs_link(tracking, columns: list[str], search: str = "") -> str:
    """How to see the runs: the `mlflow ui` command and a link to the runs table with these columns.
    Without it MLflow 3.17's UI opens on its GenAI overview ("Traces 0": its GenAI / Model training switch
    wins over the experiment's kind tag) and a new runs table shows no param or metric column."""
    uri = tracking.uri or DEFAULT_URI
    served = uri.startswith(("http://", "https://"))
    how, base = ("", uri.rstrip("/")) if served else (f"`mlflow ui --backend-store-uri {uri}`, then ", UI_URL)
    try:
        return f"{how}{base}/{runs_view(connect(uri), tracking.experiment, columns, search)}"
    except Exception:  # noqa: BLE001 - the view is a convenience: the command alone still opens the store
        return how + base
