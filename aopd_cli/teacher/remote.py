"""A teacher served apart (`teacher.engine=server`): aopd's teacher service (`aopd teacher serve`, packed
arrays) when the server is one, else a plain vLLM OpenAI server (JSON). A micro-batch goes to the service
in one request (it batches what waits itself), to an OpenAI server in requests of `teacher.request_sequences`,
`teacher.max_in_flight` at once; with timeouts and retries, and back as `TeacherTopK`. The checks before
any work refuse a server that returns fewer than K log-probs a position or tokenizes otherwise than the
student.

    python -m pytest tests/test_teacher_service.py -q
"""

from __future__ import annotations

import sys
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import torch

from aopd_cli.errors import UserError
from aopd_cli.teacher.http import ServerError, free_port, request, running_server, started_on_main
from aopd_cli.teacher.topk import assemble, sequences_of
from aopd_cli.teacher.wire import pack_request, tokenizer_fingerprint, unpack_scores


def service_info(url: str, timeout: float) -> dict | None:
    """What an aopd teacher service says of itself; None for another server (an OpenAI one)."""
    try:
        info = request(f"{url}/aopd/info", timeout=min(timeout, 30.0))
    except ServerError as err:
        if err.status is None:
            raise UserError(f"teacher.url={url}: no server answers there ({err})") from None
        return None
    return info if isinstance(info, dict) and info.get("service") == "aopd-teacher" else None


def check_service(url: str, info: dict, student_tokenizer, vocabulary: int, top_k: int) -> None:
    """One line, before any work, if this service cannot score the student's tokens with K log-probs."""
    if top_k > info["max_logprobs"]:
        raise UserError(f"teacher.url={url}: the service returns at most {info['max_logprobs']} log-probs a "
                        f"position, objective.top_k={top_k} needs {top_k}: restart it with --max-logprobs {top_k}, "
                        "or lower objective.top_k")
    problems = []
    if info["vocab_size"] != vocabulary:
        problems.append(f"output vocabulary {info['vocab_size']} vs the student's {vocabulary}")
    if info["tokenizer"] != tokenizer_fingerprint(student_tokenizer):
        problems.append("its tokenizer is another (vocabulary, special tokens or end of sequence differ)")
    if problems:
        raise UserError(f"teacher.url={url}: the served model {info['model']!r} does not share the student's "
                        "tokenizer: " + "; ".join(problems) + ". Teacher and student must share the tokenizer and "
                        "vocabulary.")


def served_scorer(post, unpack, k: int, vocabulary: int, teacher_cfg, request_sequences: int | None):
    """A micro-batch's scored rows posted in requests of `request_sequences` (None: one request),
    `max_in_flight` at once; `post(rows)` is one request's answer, `unpack(answer)` its rows' scores. The two halves may run apart:
    `score.fetch(micro)` is network only and may run on a helper thread, `score.finish(micro, fetched)`
    makes the tensors on the trainer's thread. Torch work on a helper thread starts a second OpenMP team
    beside the trainer's, and the two fight over the cores: on 2 cores the lab's rollout took 2x as long."""
    def fetch(micro):
        rows = sequences_of(micro)
        scored = [row for row in rows if row[2]]
        size = request_sequences or max(1, len(scored))
        chunks = [scored[start:start + size] for start in range(0, len(scored), size)]
        with ThreadPoolExecutor(max(1, min(teacher_cfg.max_in_flight, len(chunks)))) as pool:
            return rows, list(pool.map(post, chunks))

    def finish(micro, fetched):
        rows, answers = fetched
        results = iter([scores for answer in answers for scores in unpack(answer)])
        return assemble([next(results) if count else None for _, _, count in rows], micro, k, vocabulary)

    def score(micro):
        return finish(micro, fetch(micro))

    score.fetch, score.finish = fetch, finish
    return score


def service_scorer(url: str, k: int, vocabulary: int, teacher_cfg):
    def post(chunk):
        try:
            answer = request(f"{url}/aopd/score", pack_request(chunk, k), timeout=teacher_cfg.timeout_s,
                             retries=teacher_cfg.retries)
        except ServerError as err:
            raise UserError(f"teacher service {url}: scoring failed (after {teacher_cfg.retries} retries): {err}; "
                            "the last step checkpoint is kept: rerun the same command to resume") from None
        return answer

    # one request a micro-batch: the trainer needs all of it at once, and the service scores what waits in one
    # engine call; split in two, it often took two (the second request a millisecond late): ~10% more scoring
    return served_scorer(post, unpack_scores, k, vocabulary, teacher_cfg, request_sequences=None)


def openai_scorer(url: str, model: str, k: int, vocabulary: int, teacher_cfg):
    def post(chunk):
        payload = {"model": model, "prompt": [ids for ids, _, _ in chunk], "max_tokens": 1, "temperature": 1.0,
                   "prompt_logprobs": k}
        try:
            answer = request(f"{url}/v1/completions", payload, timeout=teacher_cfg.timeout_s,
                             retries=teacher_cfg.retries)
        except ServerError as err:
            raise UserError(f"teacher server {url}: scoring failed (after {teacher_cfg.retries} retries): {err}"
                            ) from None
        choices = sorted(answer["choices"], key=lambda choice: choice["index"])  # answers may come in any order
        return [(choice["prompt_logprobs"], ids, start, count) for choice, (ids, start, count) in zip(choices, chunk)]

    return served_scorer(post, lambda answer: [_from_json(*row, k) for row in answer], k, vocabulary,
                         teacher_cfg, teacher_cfg.request_sequences)


def _from_json(entries, ids: list[int], start: int, count: int, k: int):
    """The server's prompt log-probs: per position {str(id): {logprob, rank}} (the actual token merged in)."""
    token, top_ids, top_logprobs = [], [], []
    for position in range(start, start + count):
        row = entries[position]
        token.append(row[str(ids[position])]["logprob"])
        by_rank = {}
        for token_id, value in row.items():  # one id per rank 1..K (an exact tie may add the actual token)
            if value["rank"] <= k:
                by_rank.setdefault(value["rank"], (int(token_id), value["logprob"]))
        ranked = [by_rank[rank] for rank in sorted(by_rank)]
        top_ids.append([token_id for token_id, _ in ranked])
        top_logprobs.append([logprob for _, logprob in ranked])
    return torch.tensor(token), torch.tensor(top_ids, dtype=torch.long), torch.tensor(top_logprobs)


def service_command(teacher, top_k: int, dtype: str, port: int) -> list[str]:
    """`aopd teacher serve` for `teacher` on 127.0.0.1:`port`."""
    command = [sys.executable, "-m", "aopd_cli", "teacher", "serve", f"teacher.path={teacher.path}",
               f"teacher.dtype={dtype}", f"teacher.kv_cache_gib={teacher.kv_cache_gib}",
               f"teacher.gpu_memory_utilization={teacher.gpu_memory_utilization}",
               f"teacher.trust_remote_code={str(teacher.trust_remote_code).lower()}",
               "--host", "127.0.0.1", "--port", str(port), "--max-logprobs", str(top_k),
               "--tensor-parallel-size", str(teacher.tensor_parallel_size)]
    if teacher.max_model_len:
        command.append(f"teacher.max_model_len={teacher.max_model_len}")
    return command + list(teacher.server_args)


@contextmanager
def teacher_url(teacher, top_k: int, dtype: str, log_path: Path):
    """`teacher.url`, or the url of an `aopd teacher serve` started for the block (rank 0 starts it, the
    node shares it)."""
    if teacher.url:
        yield teacher.url.rstrip("/")
        return

    @contextmanager
    def service():
        port = free_port()
        with running_server(service_command(teacher, top_k, dtype, port), port,
                            what=f"aopd teacher serve for {teacher.path}", log_path=log_path,
                            startup_timeout=teacher.startup_timeout_s) as url:
            yield url

    with started_on_main(service) as url:
        yield url
