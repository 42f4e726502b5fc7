"""Tracking lands in MLflow: a real `mlflow server` on loopback, and the default SQLite store."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from aopd_cli.config.schema import TrackingConfig
from aopd_cli.errors import UserError
from aopd_cli.tracking.store import connect, start_run


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def exercise(tracking: TrackingConfig, artifact: Path) -> str:
    tracker = start_run(tracking, run_name="t", tags={"stage": "distill", "objective": "aopd", "seed": "0"})
    tracker.log_params({"objective.tau": 0.5, "train.steps": 3})
    tracker.log_metrics({"train/loss": 1.5}, step=1)
    tracker.log_metrics({"train/loss": 1.25}, step=2)
    tracker.log_artifact(artifact)
    tracker.close()
    return tracker.run_id


def check(uri: str, run_id: str) -> None:
    client = connect(uri)
    run = client.get_run(run_id)
    assert run.data.params["objective.tau"] == "0.5"
    assert run.data.tags["stage"] == "distill" and run.data.tags["objective"] == "aopd"
    assert [m.value for m in client.get_metric_history(run_id, "train/loss")] == [1.5, 1.25]
    assert [a.path for a in client.list_artifacts(run_id)] == ["config.yaml"]


@pytest.fixture
def artifact(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("stage: distill\n")
    return path


def start_server(folder: Path, port: int, store: str | None = None, command: str = "server") -> subprocess.Popen:
    """A real `mlflow server` (or `mlflow ui`) on loopback (SQLite backend), answering when this returns."""
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", command, "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", store or f"sqlite:///{folder}/server.db", "--artifacts-destination",
         str(folder / "art"), "--workers", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=folder,
        start_new_session=True)
    deadline = time.time() + 90
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            connect(f"http://127.0.0.1:{port}")
            return server
        except (OSError, UserError):
            if time.time() > deadline or server.poll() is not None:
                stop_server(server)
                raise
            time.sleep(1)


def stop_server(server: subprocess.Popen) -> None:
    os.killpg(server.pid, signal.SIGTERM)  # the server and its workers
    server.wait(30)


@pytest.mark.slow
def test_run_lands_on_a_real_mlflow_server(tmp_path, artifact):
    port = free_port()
    server = start_server(tmp_path, port)
    uri = f"http://127.0.0.1:{port}"
    try:
        run_id = exercise(TrackingConfig(uri=uri, experiment="server-test"), artifact)
        check(uri, run_id)
    finally:
        stop_server(server)


@pytest.mark.slow
def test_training_goes_on_through_a_tracking_outage(tmp_path, tiny_checkpoint, lab_cache):
    from cli_runs import distill_args, start_aopd, wait_for

    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    server = start_server(tmp_path, port)
    log = tmp_path / "log"
    process = start_aopd(*distill_args(tiny_checkpoint, "out", "train.steps=14", "train.save_every=4",
                                       f"tracking.uri={uri}"), cwd=tmp_path, cache=lab_cache, log=log)
    try:
        wait_for(lambda: "step 3/14" in log.read_text() or process.poll() is not None, what="step 3")
        stop_server(server)
        wait_for(lambda: "does not answer" in log.read_text() or process.poll() is not None, what="the warning")
        wait_for(lambda: "step 8/14" in log.read_text() or process.poll() is not None, what="step 8")
        server = start_server(tmp_path, port)
        assert process.wait(timeout=600) == 0, log.read_text()[-3000:]
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        stop_server(server)
    text = log.read_text()
    assert text.count("does not answer") == 1 and "answers again" in text
    assert (tmp_path / "out/step_8").is_dir() and not (tmp_path / "out/tracking_backlog.jsonl").exists()
    server = start_server(tmp_path, port)
    try:
        client = connect(uri)
        run = client.search_runs([client.get_experiment_by_name("aopd").experiment_id])[0]
        assert run.info.status == "FINISHED"
        assert [m.step for m in sorted(client.get_metric_history(run.info.run_id, "train/loss"),
                                       key=lambda m: m.step)] == list(range(1, 15))
        assert "eval/lab_math/pass_at_1" in run.data.metrics
    finally:
        stop_server(server)


def test_default_store_is_sqlite_in_the_working_directory(tmp_path, artifact, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run_id = exercise(TrackingConfig(), artifact)
    assert (tmp_path / "mlflow.db").is_file()
    check("sqlite:///mlflow.db", run_id)


def test_a_store_another_process_is_creating_is_waited_for(tmp_path, monkeypatch):
    """`mlflow ui` migrating a new mlflow.db without aopd's lock: aopd retries instead of stopping the run."""
    import mlflow.tracking

    import aopd_cli.tracking.store as store

    real, calls = mlflow.tracking.MlflowClient, []

    def half_made(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("(sqlite3.OperationalError) table _alembic_tmp_experiments already exists")
        return real(*args, **kwargs)

    monkeypatch.setattr(mlflow.tracking, "MlflowClient", half_made)
    monkeypatch.setattr(store.time, "sleep", lambda seconds: None)
    client = connect(f"sqlite:///{tmp_path}/mlflow.db")
    assert len(calls) == 2 and client.search_experiments()[0].name == "Default"
    # any other failure is still one line at once
    def broken(*args, **kwargs):
        raise RuntimeError("disk I/O error")

    monkeypatch.setattr(mlflow.tracking, "MlflowClient", broken)
    with pytest.raises(UserError, match="unreachable"):
        connect(f"sqlite:///{tmp_path}/other.db")


def test_unreachable_server_fails_fast_with_a_clear_message():
    started = time.time()
    with pytest.raises(UserError, match="unreachable"):
        start_run(TrackingConfig(uri=f"http://127.0.0.1:{free_port()}"), run_name="x", tags={})
    assert time.time() - started < 30


def test_disabled_tracking_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tracker = start_run(TrackingConfig(enabled=False), run_name="x", tags={})
    tracker.log_metrics({"a": 1.0}, step=1)
    tracker.close()
    assert list(tmp_path.iterdir()) == []
