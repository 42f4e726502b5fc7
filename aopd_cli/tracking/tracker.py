"""The tracker: a small interface (params, metrics, artifacts, tags, datasets, close), the null tracker,
and one MLflow run behind it.

A tracker survives an outage of the tracking server: what it cannot send goes to a JSONL backlog in the
stage's output folder (one warning), and is sent as soon as the server answers again, by the next run
in that folder, or by `aopd sync OUTPUT_DIR`. A resumed run skips the metric steps it already logged.

    python -m pytest tests/test_tracking.py -q
"""

from __future__ import annotations

import json
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

from aopd_cli.errors import Interrupted, UserError

BACKLOG_FILE = "tracking_backlog.jsonl"
RETRY_EVERY_S = 20.0  # while the server is away, try it again at most this often
MAX_TAG = 8000  # characters of a tag value MLflow 3 stores
CLOSE_WAIT_S = 90.0  # at the end of a run, how long to wait for an away server before leaving the backlog


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
        self.disk_full = False

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
            self.disk_full = "disk is full" in str(err)  # a SQLite store's disk: an outage that lasts
            print(f"aopd: warning: the tracking store does not answer ({error_line(err)}); training goes on and "
                  f"what cannot be sent is kept in {self.backlog} until it answers", file=sys.stderr)

    def _queue(self, record: dict) -> None:
        if self.backlog is None:
            return
        try:
            self.backlog.parent.mkdir(parents=True, exist_ok=True)
            with open(self.backlog, "a") as handle:
                handle.write(json.dumps({**record, "run_id": self.run_id}) + "\n")
        except OSError as err:  # the output folder's disk is full too: the records have nowhere to go
            raise UserError(f"the tracking store does not answer and {self.backlog} cannot be written either "
                            f"({err.strerror or err}): the run stops here; make room and rerun the same "
                            "command") from None

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
        self._send({"op": "tags", "items": [[k, str(v)[:MAX_TAG]] for k, v in tags.items()]})

    def log_dataset(self, name, source, rows, digest, context):
        self._send({"op": "dataset", "name": name, "source": source, "rows": rows, "digest": digest,
                    "context": context})

    def close(self, status="FINISHED"):
        self._send({"op": "terminate", "status": status})
        # a short outage at the very end: wait for it to pass (briefly when killed: a grace period is ticking)
        # (none for a store whose disk is full: it will not have room in a minute unless someone makes it)
        deadline = time.time() + (0 if self.disk_full else CLOSE_WAIT_S if status == "FINISHED" else 10)
        while not self.flush() and time.time() < deadline:
            time.sleep(5)
        if self.failing_since is not None and self.backlog is not None:
            print(f"aopd: the tracking store still does not answer: the run's last records wait in {self.backlog}; "
                  f"send them with `aopd sync {self.backlog.parent}`", file=sys.stderr)


def error_line(err: Exception) -> str:
    """The line of an MLflow or SQLAlchemy error that says what went wrong (not the SQL, not the advice)."""
    noise = ("[SQL", "[param", "(Back")
    lines = [line for line in str(err).splitlines() if line.strip() and not line.startswith(noise)]
    found = next((line for line in lines if "Error)" in line), lines[0] if lines else "")
    return f"{type(err).__name__}: {found[:200]}" if found else type(err).__name__


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
    lines = [line for line in backlog.read_text(errors="replace").splitlines() if line.strip()]
    for index, line in enumerate(lines):
        try:
            record = json.loads(line)
            record["op"], record["run_id"]
        except (ValueError, KeyError, TypeError):  # a line cut by a crash mid-write: the rest still goes
            print(f"aopd: warning: {backlog}: line {index + 1} is damaged (cut by a crash?) and is dropped",
                  file=sys.stderr)
            continue
        try:
            _apply(client, record["run_id"], record)
        except Exception:  # noqa: BLE001 - still away: keep what is left
            backlog.write_text("".join(rest + "\n" for rest in lines[index:]))
            return None
    backlog.unlink()
    return len(lines)
