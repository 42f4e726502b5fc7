"""The MLflow store: connecting (checked to answer, before any work), the experiment, starting, resuming
and marking runs, and reading them back. MLflow is imported in this package and nowhere else, lazily.
The default store is MLflow's own default, a SQLite file `mlflow.db` in the working directory;
`tracking.uri` points elsewhere (e.g. http://host:5000).

    python -m pytest tests/test_tracking.py -q
"""

from __future__ import annotations

import logging
import os
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

from aopd_cli.errors import UserError
from aopd_cli.tracking.tracker import (
    BACKLOG_FILE,
    MAX_TAG,
    MlflowTracker,
    NullTracker,
    Tracker,
    error_line,
    send_backlog,
)

DEFAULT_URI = "sqlite:///mlflow.db"
CREATION_RETRIES = 30  # seconds a first run waits for another process creating the same SQLite store
EXPERIMENT_DESCRIPTION = ("Runs of aopd (Asymmetric On-Policy Distillation and its baselines). Each stage is a run; "
                          "pipelines and sweeps are parent runs. Compare with `aopd compare`.")


def _quiet() -> None:
    # fail fast on an unreachable server instead of MLflow's default minutes of retries; no INFO lines
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    import mlflow  # noqa: F401 - it configures its loggers on import; quiet them after

    for name in ("mlflow", "alembic", "urllib3"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # it logs each failed write with its traceback before raising it; aopd says what failed, in one line
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)


@contextmanager
def _sqlite_creation_lock(uri: str):
    """Two first runs in a new folder would both create `mlflow.db`'s tables: one waits for the other. The
    lock is a file beside the store (never a shared, predictable name in /tmp), opened without following
    a link."""
    if not uri.startswith("sqlite:"):
        yield
        return
    import fcntl

    store = Path(uri.split(":///", 1)[-1])
    lock = store.with_name(f".{store.name}.aopd-lock")
    try:
        handle = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), 0o600)
    except OSError as err:  # a link planted there, or a folder aopd cannot write: the store would fail too
        raise UserError(f"tracking store {uri!r}: cannot take its lock {lock} ({err.strerror})") from None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(handle, fcntl.LOCK_UN)
        os.close(handle)


def _another_process_is_creating(uri: str, err: Exception) -> bool:
    """`mlflow ui` started on a new `mlflow.db` migrates its tables without aopd's lock: while it does, ours sees
    its half-made tables ("_alembic_tmp_... already exists") or a locked database. Both pass in seconds."""
    text = str(err)
    return uri.startswith("sqlite:") and ("already exists" in text or "database is locked" in text)


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

    for attempt in range(CREATION_RETRIES + 1):
        try:
            with _sqlite_creation_lock(uri):
                client = MlflowClient(tracking_uri=uri)
                client.search_experiments(max_results=1)
            break
        except Exception as err:  # noqa: BLE001 - any failure here means the store is unusable
            if attempt < CREATION_RETRIES and _another_process_is_creating(uri, err):
                time.sleep(1.0)
                continue
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
    all_tags = {"mlflow.runName": run_name, **{key: str(value)[:MAX_TAG] for key, value in tags.items()}}
    commit = git_commit()
    if commit:
        all_tags["git_commit"] = commit
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    try:
        run = client.create_run(experiment_id(client, tracking.experiment), tags=all_tags, run_name=run_name)
    except Exception as err:  # noqa: BLE001 - it answered the check but cannot write (a full disk, read-only)
        raise UserError(f"tracking store {tracking.uri or DEFAULT_URI!r} cannot start a run ({error_line(err)}); make "
                        "room there, set tracking.uri to another store, or set tracking.enabled=false") from None
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


def end_run(uri: str | None, run_id: str, *, backlog: Path | None = None, tags: dict[str, str] | None = None
            ) -> str | None:
    """Close a run that is not continued in store `uri` (left RUNNING by a killed process, or continued in
    another store) as KILLED, after sending it what `backlog` queued: why that could not be done (the store
    does not answer, or its file is gone), or None (done, or the run is not in that store)."""
    uri = absolute(uri or DEFAULT_URI)
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        return "its file is gone"  # connecting would make an empty store there
    try:
        client = connect(uri)
        if backlog is not None and backlog.is_file() and send_backlog(client, backlog) is None:
            return "it does not take the run's queued records"
    except UserError:
        return "it does not answer"
    try:
        run = client.get_run(run_id)
    except Exception:  # noqa: BLE001 - deleted, or never in this store: nothing to close
        return None
    if run.info.status == "RUNNING":
        try:
            for key, value in (tags or {}).items():
                client.set_tag(run_id, key, value)
            client.set_terminated(run_id, status="KILLED")
        except Exception as err:  # noqa: BLE001 - a store that answers reads but cannot write (a full disk)
            return error_line(err)
    return None


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
    if not Path(out_dir).is_dir():
        raise UserError(f"{out_dir}: no such folder (give a stage's output folder, e.g. outputs/lab/opd)")
    backlog = Path(out_dir) / BACKLOG_FILE
    if not backlog.is_file():
        return 0
    sent = send_backlog(connect(tracking_uri), backlog)
    if sent is None:
        raise UserError(f"the tracking store {tracking_uri or DEFAULT_URI!r} does not take the records of {backlog} yet")
    return sent
