"""Tracking lands in MLflow: a real `mlflow server` on loopback, and the default SQLite store."""

import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from aopd_cli.config.schema import TrackingConfig
from aopd_cli.errors import UserError
from aopd_cli.tracking import connect, start_run


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


@pytest.mark.slow
def test_run_lands_on_a_real_mlflow_server(tmp_path, artifact):
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{tmp_path}/server.db", "--artifacts-destination", str(tmp_path / "art"),
         "--workers", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                connect(uri)
                break
            except (OSError, UserError):
                if time.time() > deadline or server.poll() is not None:
                    raise
                time.sleep(1)
        run_id = exercise(TrackingConfig(uri=uri, experiment="server-test"), artifact)
        check(uri, run_id)
    finally:
        server.terminate()
        server.wait(30)


def test_default_store_is_sqlite_in_the_working_directory(tmp_path, artifact, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run_id = exercise(TrackingConfig(), artifact)
    assert (tmp_path / "mlflow.db").is_file()
    check("sqlite:///mlflow.db", run_id)


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
