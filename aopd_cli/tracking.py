"""Run tracking behind a small interface (params, metrics, artifacts, tags, datasets, close), MLflow behind it.

MLflow is imported here and nowhere else, lazily. The default store is MLflow's own default, a SQLite
file `mlflow.db` in the working directory; `tracking.uri` points elsewhere (e.g. http://host:5000).

A tracker survives an outage of the tracking server: what it cannot send goes to a JSONL backlog in the
stage's output folder (one warning), and is sent as soon as the server answers again, by the next run
in that folder, or by `aopd sync OUTPUT_DIR`. A resumed run skips the metric steps it already logged.

    python -m pytest tests/test_tracking.py -q
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

from aopd_cli.errors import UserError

DEFAULT_URI = "sqlite:///mlflow.db"
BACKLOG_FILE = "tracking_backlog.jsonl"
RETRY_EVERY_S = 20.0  # while the server is away, try it again at most this often
CLOSE_WAIT_S = 90.0  # at the end of a run, how long to wait for an away server before leaving the backlog
EXPERIMENT_DESCRIPTION = ("Runs of aopd (Asymmetric On-Policy Distillation and its baselines). Each stage is a run; "
                          "pipelines and sweeps are parent runs. Compare with `aopd compare`.")


class Tracker(Protocol):
    run_id: str | None

    def log_params(self, params: dict[str, Any]) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None: ...
    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...
    def set_tags(self, tags: dict[str, str]) -> None: ...
    def log_dataset(self, name: str, source: str, rows: int, digest: str, context: str) -> None: ...
    def close(self, status: str = "FINISHED") -> None: ...


@contextmanager
def closing(tracker: Tracker):
    """Close the run as FINISHED, KILLED (a signal) or FAILED, however the block ends."""
    from aopd_cli.interrupts import Interrupted

    try:
        yield tracker
    except (KeyboardInterrupt, Interrupted):
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

    def log_dataset(self, name, source, rows, digest, context):
        pass

    def close(self, status="FINISHED"):
        pass


class MlflowTracker:
    """One MLflow run, addressed by id through MlflowClient (no global active-run state)."""

    def __init__(self, client, run_id: str, backlog: Path | None = None, logged: dict[str, int] | None = None):
        self.client, self.run_id, self.backlog = client, run_id, backlog
        self.logged = logged or {}  # metric -> last step already in the store (a resumed run)
        self.failing_since: float | None = None
        self.last_try = 0.0

    # every call goes through _send: sent now, or queued for later
    def _send(self, record: dict) -> None:
        if self.failing_since is not None or (self.backlog and self.backlog.is_file() and self.backlog.stat().st_size):
            self._queue(record)
            self.flush(quiet=True)
            return
        try:
            _apply(self.client, self.run_id, record)
        except Exception as err:  # noqa: BLE001 - the server is away: keep training, keep the record
            self._outage(err)
            self._queue(record)

    def _outage(self, err: Exception) -> None:
        if self.failing_since is None:
            self.failing_since = self.last_try = time.time()
            print(f"aopd: warning: the tracking store does not answer ({type(err).__name__}); training goes on and "
                  f"what cannot be sent is kept in {self.backlog} until it answers", file=sys.stderr)

    def _queue(self, record: dict) -> None:
        if self.backlog is None:
            return
        self.backlog.parent.mkdir(parents=True, exist_ok=True)
        with open(self.backlog, "a") as handle:
            handle.write(json.dumps({**record, "run_id": self.run_id}) + "\n")

    def flush(self, quiet: bool = False) -> bool:
        """Send the backlog; True when nothing is left."""
        if self.backlog is None or not self.backlog.is_file():
            self.failing_since = None
            return True
        if quiet and self.failing_since is not None and time.time() - self.last_try < RETRY_EVERY_S:
            return False
        self.last_try = time.time()
        sent = send_backlog(self.client, self.backlog)
        if sent is None:
            self.failing_since = self.failing_since or time.time()
            return False
        if self.failing_since is not None or not quiet:
            print(f"aopd: the tracking store answers again: sent {sent} queued record(s)", file=sys.stderr)
        self.failing_since = None
        return True

    def log_params(self, params):
        items = [[k, str(v)[:6000]] for k, v in params.items()]
        for start in range(0, len(items), 100):
            self._send({"op": "params", "items": items[start:start + 100]})

    def log_metrics(self, metrics, step=None):
        step = step or 0
        now = int(time.time() * 1000)
        items = [[k, float(v), now, step] for k, v in metrics.items()
                 if v is not None and step > self.logged.get(k, -1)]
        for start in range(0, len(items), 500):
            self._send({"op": "metrics", "items": items[start:start + 500]})

    def log_artifact(self, path, artifact_path=None):
        self._send({"op": "artifact", "path": str(Path(path).resolve()), "artifact_path": artifact_path})

    def set_tags(self, tags):
        self._send({"op": "tags", "items": [[k, str(v)[:5000]] for k, v in tags.items()]})

    def log_dataset(self, name, source, rows, digest, context):
        self._send({"op": "dataset", "name": name, "source": source, "rows": rows, "digest": digest,
                    "context": context})

    def close(self, status="FINISHED"):
        self._send({"op": "terminate", "status": status})
        # a short outage at the very end: wait for it to pass (briefly when killed: a grace period is ticking)
        deadline = time.time() + (CLOSE_WAIT_S if status == "FINISHED" else 10)
        while not self.flush() and time.time() < deadline:
            time.sleep(5)
        if self.failing_since is not None and self.backlog is not None:
            print(f"aopd: the tracking store still does not answer: the run's last records wait in {self.backlog}; "
                  f"send them with `aopd sync {self.backlog.parent}`", file=sys.stderr)


def _apply(client, run_id: str, record: dict) -> None:
    from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunTag

    op = record["op"]
    if op == "params":
        client.log_batch(run_id, params=[Param(k, v) for k, v in record["items"]])
    elif op == "metrics":
        client.log_batch(run_id, metrics=[Metric(k, v, t, s) for k, v, t, s in record["items"]])
    elif op == "tags":
        client.log_batch(run_id, tags=[RunTag(k, v) for k, v in record["items"]])
    elif op == "artifact":
        client.log_artifact(run_id, record["path"], record["artifact_path"])
    elif op == "dataset":
        profile = json.dumps({"num_rows": record["rows"]})
        dataset = Dataset(record["name"], record["digest"], "local" if os.path.exists(record["source"]) else "hub",
                          json.dumps({"uri": record["source"]}), profile=profile)
        client.log_inputs(run_id, [DatasetInput(dataset, [InputTag("mlflow.data.context", record["context"])])])
    elif op == "terminate":
        client.set_terminated(run_id, status=record["status"])


def send_backlog(client, backlog: Path) -> int | None:
    """Apply every queued record in order; the number sent, or None when the store does not answer
    (the records not yet sent stay in the file)."""
    lines = [line for line in backlog.read_text().splitlines() if line.strip()]
    for index, line in enumerate(lines):
        record = json.loads(line)
        try:
            _apply(client, record["run_id"], record)
        except Exception:  # noqa: BLE001 - still away: keep what is left
            backlog.write_text("".join(rest + "\n" for rest in lines[index:]))
            return None
    backlog.unlink()
    return len(lines)


def _quiet() -> None:
    # fail fast on an unreachable server instead of MLflow's default minutes of retries; no INFO lines
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    import mlflow  # noqa: F401 - it configures its loggers on import; quiet them after

    for name in ("mlflow", "alembic", "urllib3"):
        logging.getLogger(name).setLevel(logging.WARNING)


@contextmanager
def _sqlite_creation_lock(uri: str):
    """Two first runs in a new folder would both create `mlflow.db`'s tables: one waits for the other."""
    if not uri.startswith("sqlite:"):
        yield
        return
    import fcntl

    key = hashlib.sha256(os.path.abspath(uri.split(":///", 1)[-1]).encode()).hexdigest()[:16]
    with open(Path(tempfile.gettempdir()) / f"aopd-mlflow-{key}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def connect(uri: str | None):
    """An MlflowClient on the store, checked to answer (clear error before any work if not)."""
    _quiet()
    uri = absolute(uri or DEFAULT_URI)
    scheme = uri.split(":", 1)[0] if ":" in uri else "file"
    if scheme not in ("sqlite", "http", "https", "file", "postgresql", "mysql", "databricks") and "://" in uri:
        raise UserError(f"tracking.uri={uri!r}: unknown scheme {scheme!r} (use sqlite:///FILE, http://HOST:PORT "
                        "or a folder)")
    import mlflow
    from mlflow.tracking import MlflowClient

    try:
        with _sqlite_creation_lock(uri):
            client = MlflowClient(tracking_uri=uri)
            client.search_experiments(max_results=1)
    except Exception as err:  # noqa: BLE001 - any failure here means the store is unusable
        raise UserError(f"tracking store {uri!r} is unreachable ({type(err).__name__}: {str(err)[:200]}); "
                        "start it, set tracking.uri, or set tracking.enabled=false") from None
    mlflow.set_tracking_uri(uri)
    return client


def absolute(uri: str) -> str:
    """A SQLite store named relative to the working directory, made absolute: MLflow caches its stores by
    URI, so one process that changes directory would otherwise keep writing to the first folder's file."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri[len(prefix):].startswith("/"):
        return prefix + os.path.abspath(uri[len(prefix):])
    return uri


def experiment_id(client, name: str) -> str:
    """The experiment's id, created on first use: tagged as model training (the UI opens on its runs)."""
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    try:
        created = client.create_experiment(name, tags={"mlflow.experimentKind": "custom_model_development",
                                                       "mlflow.note.content": EXPERIMENT_DESCRIPTION})
    except Exception:  # noqa: BLE001 - another process created it between the two calls
        created = client.get_experiment_by_name(name).experiment_id
    return created


def start_run(tracking, *, run_name: str, tags: dict[str, str], parent_run_id: str | None = None,
              backlog: Path | None = None) -> Tracker:
    """A tracker for a new run. `tracking` is a TrackingConfig."""
    if not tracking.enabled:
        return NullTracker()
    client = connect(tracking.uri)
    all_tags = {"mlflow.runName": run_name, **tags}
    commit = git_commit()
    if commit:
        all_tags["git_commit"] = commit
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run = client.create_run(experiment_id(client, tracking.experiment), tags=all_tags, run_name=run_name)
    return MlflowTracker(client, run.info.run_id, backlog)


def resume_run(tracking, run_id: str, *, backlog: Path | None = None) -> Tracker | None:
    """A tracker that continues `run_id` (RUNNING again, metric steps already logged skipped), or None
    when that run is not in this store."""
    if not tracking.enabled:
        return NullTracker()
    client = connect(tracking.uri)
    if backlog is not None and backlog.is_file() and send_backlog(client, backlog) is None:
        raise UserError(f"the tracking store does not take the queued records of {backlog}; try again later")
    try:
        run = client.get_run(run_id)
    except Exception:  # noqa: BLE001 - deleted, or another store
        return None
    logged = {key: max((m.step for m in client.get_metric_history(run_id, key)), default=-1)
              for key in run.data.metrics}
    client.update_run(run_id, status="RUNNING")
    return MlflowTracker(client, run_id, backlog, logged)


def mark_run(tracking, run_id: str, status: str) -> None:
    """Close a run left RUNNING by a killed process (KILLED), when it is not resumed."""
    if tracking.enabled:
        try:
            connect(tracking.uri).set_terminated(run_id, status=status)
        except Exception:  # noqa: BLE001 - not in this store: nothing to mark
            pass


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


def sync(out_dir: Path, tracking_uri: str | None) -> int:
    """`aopd sync`: send a folder's queued records; how many were sent."""
    backlog = Path(out_dir) / BACKLOG_FILE
    if not backlog.is_file():
        return 0
    sent = send_backlog(connect(tracking_uri), backlog)
    if sent is None:
        raise UserError(f"the tracking store {tracking_uri or DEFAULT_URI!r} does not take the records of {backlog} yet")
    return sent
