"""Run tracking behind a small interface (params, metrics, artifacts, tags, close), MLflow behind it.

MLflow is imported here and nowhere else, lazily. The default store is MLflow's own default, a SQLite
file `mlflow.db` in the working directory; `tracking.uri` points elsewhere (e.g. http://host:5000).

    python -m pytest tests/test_tracking.py -q
"""

from __future__ import annotations

import os
import subprocess
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

from aopd_cli.errors import UserError

DEFAULT_URI = "sqlite:///mlflow.db"


class Tracker(Protocol):
    run_id: str | None

    def log_params(self, params: dict[str, Any]) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None: ...
    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...
    def set_tags(self, tags: dict[str, str]) -> None: ...
    def close(self, status: str = "FINISHED") -> None: ...


@contextmanager
def closing(tracker: Tracker):
    """Close the run as FINISHED, KILLED (Ctrl-C) or FAILED, however the block ends."""
    try:
        yield tracker
    except KeyboardInterrupt:
        tracker.close("KILLED")
        raise
    except BaseException:
        tracker.close("FAILED")
        raise
    tracker.close("FINISHED")


class NullTracker:
    run_id = None

    def log_params(self, params):
        pass

    def log_metrics(self, metrics, step=None):
        pass

    def log_artifact(self, path, artifact_path=None):
        pass

    def set_tags(self, tags):
        pass

    def close(self, status="FINISHED"):
        pass


class MlflowTracker:
    """One MLflow run, addressed by id through MlflowClient (no global active-run state)."""

    def __init__(self, client, run_id: str):
        self.client, self.run_id = client, run_id

    def log_params(self, params):
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for start in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[start:start + 100])

    def log_metrics(self, metrics, step=None):
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step or 0) for k, v in metrics.items() if v is not None]
        for start in range(0, len(items), 500):
            self.client.log_batch(self.run_id, metrics=items[start:start + 500])

    def log_artifact(self, path, artifact_path=None):
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def set_tags(self, tags):
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, str(value))

    def close(self, status="FINISHED"):
        self.client.set_terminated(self.run_id, status=status)


def _quiet_http() -> None:
    # fail fast on an unreachable server instead of MLflow's default minutes of retries
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def connect(uri: str | None):
    """An MlflowClient on the store, checked to answer (clear error before any work if not)."""
    _quiet_http()
    import mlflow
    from mlflow.tracking import MlflowClient

    uri = uri or DEFAULT_URI
    client = MlflowClient(tracking_uri=uri)
    try:
        client.search_experiments(max_results=1)
    except Exception as err:  # noqa: BLE001 - any failure here means the store is unusable
        raise UserError(f"tracking store {uri!r} is unreachable ({type(err).__name__}: {str(err)[:200]}); "
                        "start it, set tracking.uri, or set tracking.enabled=false") from None
    mlflow.set_tracking_uri(uri)
    return client


def _experiment_id(client, name: str) -> str:
    experiment = client.get_experiment_by_name(name)
    return experiment.experiment_id if experiment else client.create_experiment(name)


def start_run(tracking, *, run_name: str, tags: dict[str, str], parent_run_id: str | None = None) -> Tracker:
    """A tracker for one run. `tracking` is a TrackingConfig."""
    if not tracking.enabled:
        return NullTracker()
    client = connect(tracking.uri)
    all_tags = {"mlflow.runName": run_name, **tags}
    commit = git_commit()
    if commit:
        all_tags["git_commit"] = commit
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run = client.create_run(_experiment_id(client, tracking.experiment), tags=all_tags, run_name=run_name)
    return MlflowTracker(client, run.info.run_id)


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def find_runs(tracking_uri: str | None, experiment: str, filter_string: str = "") -> list:
    """All runs of an experiment matching an MLflow filter, oldest first."""
    client = connect(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return []
    runs, token = [], None
    while True:
        page = client.search_runs([found.experiment_id], filter_string=filter_string, max_results=1000,
                                  page_token=token, order_by=["attributes.start_time ASC"])
        runs += list(page)
        token = page.token
        if not token:
            return runs


def metric_history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    """(step, value) pairs of one metric; `client` from `connect` (one per command, not per call)."""
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def run_tracker(tracking_uri: str | None, run_id: str) -> Tracker:
    """A tracker on an existing run (to add artifacts to a parent run, say)."""
    return MlflowTracker(connect(tracking_uri), run_id)
