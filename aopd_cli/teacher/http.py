"""A served teacher's plumbing, whichever server it is (aopd's teacher service, or a vLLM OpenAI server):
requests with timeouts and retries, and a server process aopd starts for a stage and always stops.

- Requests: JSON or packed bytes over `urllib`, a timeout each, retries with exponential backoff on
  connection errors, timeouts and 5xx; a 4xx is the server refusing the request and is reported as it says.
- A server aopd starts: on a free 127.0.0.1 port, healthy when `GET /health` answers; under torchrun rank 0
  starts it and every rank of the node uses it. Stopped, always: at the block's end, on an error, Ctrl-C
  or SIGTERM, SIGTERM to the server's whole process group (its engine and worker processes), SIGKILL after
  a grace period, until none of them is left. If aopd itself is killed outright the kernel sends the
  server SIGTERM (`PR_SET_PDEATHSIG`), so no server outlives it.

    python -m pytest tests/test_vllm.py -q -k server
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import ExitStack, contextmanager
from pathlib import Path

from aopd_cli.errors import UserError
from aopd_cli.progress import say
from aopd_cli.training import distributed as dist


class ServerError(RuntimeError):
    def __init__(self, status: int | None, message: str):
        super().__init__(message)
        self.status = status


def request(url: str, payload: dict | bytes | None = None, *, timeout: float, retries: int = 0):
    """GET (no payload) or POST JSON (a dict: the decoded answer) or bytes (the answer's bytes). Retries what
    may pass (connection refused or reset, timeouts, 5xx) after 1, 2, 4, ... s; raises ServerError with the
    server's own message."""
    for attempt in range(retries + 1):
        try:
            return _once(url, payload, timeout)
        except urllib.error.HTTPError as err:
            message = _message(err.read().decode(errors="replace")) or err.reason
            if err.code < 500 or attempt == retries:
                raise ServerError(err.code, f"HTTP {err.code}: {message}") from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as err:  # refused, reset, timed out,
            # or cut off mid-answer (a server killed while it wrote: IncompleteRead, BadStatusLine)
            if attempt == retries:
                raise ServerError(None, str(getattr(err, "reason", err))) from None
        time.sleep(min(30.0, 2.0**attempt))
    raise AssertionError("unreachable")


def _once(url: str, payload, timeout: float):
    binary = isinstance(payload, (bytes, bytearray))
    headers = {"Content-Type": "application/octet-stream" if binary else "application/json"}
    if os.environ.get("AOPD_TEACHER_API_KEY"):  # a team server started with --api-key
        headers["Authorization"] = f"Bearer {os.environ['AOPD_TEACHER_API_KEY']}"
    data = payload if binary else json.dumps(payload).encode() if payload is not None else None
    with urllib.request.urlopen(urllib.request.Request(url, data=data, headers=headers), timeout=timeout) as answer:
        body = answer.read()
    if binary:
        return body
    try:
        return json.loads(body) if body else {}
    except ValueError:
        raise ServerError(None, f"{url} answered with something that is not JSON ({body[:80]!r})") from None


def _message(body: str) -> str:
    try:
        error = json.loads(body).get("error", {})
        return error.get("message", "") if isinstance(error, dict) else str(error)
    except (ValueError, AttributeError):
        return body[:300]


@contextmanager
def started_on_main(start, *args):
    """The url of a server `start(*args)` runs for the block, started by rank 0 and shared with the node."""
    if int(os.environ.get("LOCAL_WORLD_SIZE", dist.world_size())) != dist.world_size():
        raise UserError("teacher.engine=server across nodes needs teacher.url: start `aopd teacher serve` on GPUs "
                        "of its own (docs/gpus.md) and pass its url")
    with ExitStack() as stack:
        outcome = None
        if dist.is_main():
            try:
                outcome = stack.enter_context(start(*args))
            except UserError as err:
                outcome = err
        outcome = dist.broadcast(outcome)
        if isinstance(outcome, UserError):
            raise UserError(str(outcome))
        yield outcome


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def running_server(command: list[str], port: int, *, what: str, log_path: Path, startup_timeout: float,
                   env: dict | None = None):
    """`command` serving on 127.0.0.1:`port` for the block; its url. Stopped, with every process it started,
    however the block ends."""
    env = {k: v for k, v in (env or os.environ).items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}
    env.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")  # a 2-core machine keeps both cores for the worker
    log_path.parent.mkdir(parents=True, exist_ok=True)
    url = f"http://127.0.0.1:{port}"
    say(f"teacher: starting {what} at {url} (log: {log_path})")
    started = time.perf_counter()
    with open(log_path, "ab") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                   preexec_fn=_die_with_parent)
    try:
        _wait_healthy(url, process, startup_timeout, log_path)
        say(f"teacher: server healthy after {time.perf_counter() - started:.0f} s")
        yield url
    finally:
        stop_group(process)


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when the parent dies, even by SIGKILL (Linux)."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


def _wait_healthy(url: str, process, timeout: float, log_path: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise UserError(f"the teacher server exited ({process.returncode}) while starting: "
                            f"{_last_error(log_path)} (log: {log_path})")
        try:
            request(f"{url}/health", timeout=2.0)
            return
        except ServerError:
            time.sleep(0.5)
    raise UserError(f"the teacher server was not healthy after {timeout:.0f} s (teacher.startup_timeout_s; "
                    f"log: {log_path})")


def _last_error(log_path: Path) -> str:
    lines = [line.strip() for line in log_path.read_text(errors="replace").splitlines() if line.strip()]
    errors = [line for line in lines if "Error" in line or "error" in line]
    return (errors or lines or ["no output"])[-1][:300]


def stop_group(process, grace: float = 30.0) -> None:
    """SIGTERM to the process group, SIGKILL after `grace` s, then wait until none of it is left."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            process.poll()  # reap the server itself, so it does not linger as a zombie of the group
            try:
                os.killpg(process.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.2)
    process.poll()
