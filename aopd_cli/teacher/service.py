"""`aopd teacher serve`: the teacher behind HTTP, scoring token ids with vLLM's own engine (`vllm.LLM`:
tensor parallel on GPUs of its own, or the CPU) and answering in packed arrays (teacher/wire.py).

- `GET /health`; `GET /aopd/info`: the model, the most log-probs a position it returns (`--max-logprobs`),
  its vocabulary and its tokenizer's fingerprint, which a trainer checks before any work;
- `POST /aopd/score`: a batch of sequences; per scored position the sampled token's log-prob and the
  top-K ids and log-probs (vLLM's `prompt_logprobs`, at temperature 1, no detokenisation).

Requests that arrive together are scored a few at a time, in arrival order (a trainer sends a step's
micro-batches at once and trains on the first while the next are scored): each engine call takes the
waiting requests, and those that come within `GATHER_S` of the last, up to `BATCH_TOKENS` tokens. The
engine runs on the main thread, the HTTP handlers on helper threads. Bound to 127.0.0.1 unless `--host`
says otherwise. Stops on SIGTERM / Ctrl-C, with the engine's processes.

    aopd teacher serve teacher.path=outputs/lab/teacher/checkpoint --port 8100
"""

from __future__ import annotations

import json
import queue
import signal
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from aopd_cli.teacher.topk import engine_scores
from aopd_cli.teacher.wire import pack_scores, tokenizer_fingerprint, unpack_request

BATCH_TOKENS = 4096  # waiting requests join an engine call until it holds this many tokens
GATHER_S = 0.003  # and those that come within this of the last one


def engine_scorer(llm, k: int):
    """(sequences) -> per sequence (sampled log-prob [count], top-K ids [count, K], top-K log-probs)."""
    return lambda sequences: engine_scores(llm, sequences, k)


def batching_worker(score, jobs: queue.Queue, stop: threading.Event) -> None:
    """Take every request waiting, score them in one engine call, hand each its answer."""
    while not stop.is_set():
        try:
            batch = [jobs.get(timeout=0.2)]
        except queue.Empty:
            continue
        tokens = _tokens(batch[0])
        while tokens < BATCH_TOKENS:  # a few at a time: the first answers come early
            try:  # a step's micro-batches arrive a millisecond or so apart: each waits for the next a little
                batch.append(jobs.get(timeout=GATHER_S))
            except queue.Empty:
                break
            tokens += _tokens(batch[-1])
        work = [(index, seq) for index, job in enumerate(batch) for seq in job["sequences"] if seq[2] > 0]
        try:
            scored = score([seq for _, seq in work]) if work else []
            answers = [[] for _ in batch]
            for (index, _), result in zip(work, scored):
                answers[index].append(result)
            for job, mine in zip(batch, answers):
                mine = iter(mine)
                # packed here, on the engine's thread: torch work on the handlers' threads would start
                # more OpenMP teams beside the engine's (see teacher/remote.py's `served_scorer`)
                scores = [next(mine) if seq[2] > 0 else _empty(job["k"]) for seq in job["sequences"]]
                job["answer"] = pack_scores(scores, job["k"], job["dtype"])
        except Exception as err:  # noqa: BLE001 - the engine failed: every waiting request says so
            for job in batch:
                job["error"] = f"{type(err).__name__}: {err}"
        for job in batch:
            job["done"].set()


def _tokens(job: dict) -> int:
    return sum(len(ids) for ids, _, _ in job["sequences"])


def _empty(k: int):
    import torch

    return torch.empty(0), torch.empty(0, k, dtype=torch.long), torch.empty(0, k)


def handler_for(info: dict, jobs: queue.Queue):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # a trainer's steady requests are not news
            pass

        def _send(self, status: int, body: bytes, kind: str = "application/octet-stream") -> None:
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _error(self, status: int, message: str) -> None:
            self._send(status, json.dumps({"error": {"message": message}}).encode(), "application/json")

        def do_GET(self):
            if self.path == "/health":  # an empty 200, as vLLM's servers answer
                self._send(200, b"", "text/plain")
            elif self.path == "/aopd/info":
                self._send(200, json.dumps(info).encode(), "application/json")
            else:
                self._error(404, f"no {self.path} here: GET /health, GET /aopd/info, POST /aopd/score")

        def do_POST(self):
            if self.path != "/aopd/score":
                return self._error(404, f"no {self.path} here: POST /aopd/score")
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            try:
                k, dtype, sequences = unpack_request(body)
            except (ValueError, KeyError, TypeError) as err:
                return self._error(400, f"not a score request: {err}")
            if k > info["max_logprobs"]:
                return self._error(400, f"Requested prompt logprobs of {k}, which is greater than max allowed: "
                                        f"{info['max_logprobs']} (restart with --max-logprobs {k})")
            job = {"k": k, "dtype": dtype, "sequences": sequences, "done": threading.Event()}
            jobs.put(job)
            job["done"].wait()
            if "error" in job:
                return self._error(500, job["error"])
            self._send(200, job["answer"])

    return Handler


def serve(teacher, *, host: str, port: int, max_logprobs: int, tensor_parallel_size: int, announce=print) -> None:
    """Serve `teacher` (a TeacherConfig) until SIGTERM or Ctrl-C."""
    import torch
    from transformers import AutoConfig, AutoTokenizer

    from aopd_cli.rollout.vllm_engine import start_engine
    from aopd_cli.training.models import compute_dtype

    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    tokenizer = AutoTokenizer.from_pretrained(teacher.path, trust_remote_code=teacher.trust_remote_code)
    config = AutoConfig.from_pretrained(teacher.path, trust_remote_code=teacher.trust_remote_code)
    dtype = compute_dtype(teacher.dtype, device)
    llm, close = start_engine(
        "aopd teacher serve", model=teacher.path, dtype=dtype, seed=0, max_model_len=teacher.max_model_len,
        tensor_parallel_size=tensor_parallel_size, gpu_memory_utilization=teacher.gpu_memory_utilization,
        kv_cache_gib=teacher.kv_cache_gib, max_logprobs=max_logprobs, trust_remote_code=teacher.trust_remote_code,
        skip_tokenizer_init=True, standalone=True)
    info = {"service": "aopd-teacher", "version": 1, "model": teacher.path, "max_logprobs": max_logprobs,
            "vocab_size": config.vocab_size, "tokenizer": tokenizer_fingerprint(tokenizer),
            "dtype": str(dtype).removeprefix("torch."), "tensor_parallel_size": tensor_parallel_size}
    jobs, stop = queue.Queue(), threading.Event()
    server = ThreadingHTTPServer((host, port), handler_for(info, jobs))
    server.daemon_threads = True
    # HTTP on a helper thread, the engine on this one, which started it: on the CPU its calls from another
    # thread took 10-25% longer (lab teacher). A trainer on the same cores waits for its scores rather than
    # computing beside it (stages/onpolicy.py): beside one, some main-thread calls took 140-440 ms.
    http = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True)

    def stopping(signum, frame):
        stop.set()

    previous = {sig: signal.signal(sig, stopping) for sig in (signal.SIGTERM, signal.SIGINT)}
    http.start()
    announce(f"aopd: teacher {teacher.path} serving at http://{host}:{server.server_address[1]} "
             f"(K up to {max_logprobs}, tensor parallel {tensor_parallel_size}, {info['dtype']})")
    try:
        batching_worker(engine_scorer(llm, max_logprobs), jobs, stop)
    finally:
        server.shutdown()
        server.server_close()
        close()
        for sig, old in previous.items():
            signal.signal(sig, old)
