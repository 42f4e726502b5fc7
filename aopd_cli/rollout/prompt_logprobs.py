"""How aopd reads a vLLM engine's prompt log-probs (the teacher's scores), faster than vLLM's own way for
scoring many short sequences; the results are the same tensors.

- vLLM computes each request's prompt log-probs apart (`GPUModelRunner._get_prompt_logprobs_dict`: "a rare
  feature, a simple loop"): per request the output layer, a log-softmax and a top-K. Scoring 32 lab
  sequences of about 70 tokens, that loop took 15 of the engine's 70 ms on 2 CPU cores (cProfile). Here
  the requests of an engine step go through the output layer, the log-softmax and the top-K together (in
  groups of at most `GROUP_ROWS` positions, so the logits never outgrow vLLM's largest single request by
  much), and each request's rows are copied where vLLM's loop would have put them.
- vLLM then turns each request's tensors into Python objects, one per position and entry (on the lab's
  teacher 40% of a scoring call); here a request's `prompt_logprobs` stays the engine's tensors.

Both apply within `tensor_prompt_logprobs()` only, and to engines in this process (a tensor-parallel
engine's workers run vLLM's own loop). The batched loop mirrors vLLM 0.32's (0.33's is the same source):
another vLLM whose loop is not that one keeps its own (the same scores, at its own speed). On CUDA, vLLM
0.32 and 0.33 run their Model Runner V2 wherever Triton is installed, which computes a step's prompt
log-probs together itself (1,024 positions at a time): the batched loop, which replaces V1's method, is
then inert, and only the first half (tensors kept as they are, in vLLM's output processor) applies. Nothing
else in aopd reaches into a model runner.

    python -m pytest tests/test_vllm.py -q -k teacher
"""

from __future__ import annotations

import functools
import hashlib
import inspect
from contextlib import contextmanager

import torch

GROUP_ROWS = 4096  # positions a group's logits hold at most (plus one request's)
MIRRORED = "889fdb068dfc37dd"  # vLLM 0.32's `_get_prompt_logprobs_dict` (sha256 of its source, 16 digits)


@contextmanager
def tensor_prompt_logprobs():
    """Within the block, a request's `prompt_logprobs` is the engine's tensors as they are: a list of one
    (token ids [P - 1, K + 1], log-probs [P - 1, K + 1]) for a prompt of P tokens; row t is position t + 1,
    its actual token first, then the top K. The engine fills these tensors for each request once, on the
    CPU, and lets them go: keeping them is safe."""
    from vllm.v1.engine.logprobs import LogprobsProcessor
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    pythonize, per_request = LogprobsProcessor._update_prompt_logprobs, GPUModelRunner._get_prompt_logprobs_dict

    def keep(self, tensors) -> None:
        if getattr(self, "aopd_tensors", None) is None:  # first time: in place of the engine's container
            self.aopd_tensors = self.prompt_logprobs = []
        self.aopd_tensors.append((tensors[0], tensors[1]))

    LogprobsProcessor._update_prompt_logprobs = keep
    if _mirrors(per_request):  # V1's runner (CPU; CUDA without Triton): V2, CUDA's default, batches already
        GPUModelRunner._get_prompt_logprobs_dict = batched_prompt_logprobs
    try:
        yield
    finally:
        LogprobsProcessor._update_prompt_logprobs = pythonize
        GPUModelRunner._get_prompt_logprobs_dict = per_request


@functools.cache
def _mirrors(method) -> bool:
    try:
        source = inspect.getsource(method)
    except (OSError, TypeError):  # no source installed: nothing to compare with
        return False
    return hashlib.sha256(source.encode()).hexdigest()[:16] == MIRRORED


def batched_prompt_logprobs(self, hidden_states: torch.Tensor, num_scheduled_tokens: dict[str, int]) -> dict:
    """vLLM's `GPUModelRunner._get_prompt_logprobs_dict` (vLLM 0.32) with the requests together: the same
    bookkeeping (chunked prefills, requests done with their prompt), one output layer, log-softmax and
    top-K for each group of requests asking the same K."""
    from vllm.v1.outputs import LogprobsTensors

    wanted = self.num_prompt_logprobs
    if not wanted:
        return {}
    finished, done, pending = {}, [], {}  # pending: K -> [(tensors, rows of the step, first row, count, ids)]
    for req_id, k in wanted.items():
        num_tokens = num_scheduled_tokens.get(req_id)
        request = self.requests[req_id]
        if num_tokens is None or request.prompt_token_ids is None:  # preempted in prefill; prompt embeddings
            continue
        prompt = request.prompt_token_ids
        tensors = request.in_progress_prompt_logprobs_cpu
        if tensors is None:  # the whole prompt's tensors; a chunked prefill fills them slice by slice
            tensors = request.in_progress_prompt_logprobs_cpu = LogprobsTensors.empty_cpu(len(prompt) - 1, k + 1)
        start = request.num_computed_tokens
        remaining = len(prompt) - start - 1
        count = num_tokens
        if num_tokens > remaining:  # its last chunk (at ==, vLLM returns it with the next step's tokens)
            count = remaining
            done.append(req_id)
            finished[req_id] = tensors
        if count > 0:
            offset = int(self.query_start_loc.np[self.input_batch.req_id_to_index[req_id]])
            pending.setdefault(k, []).append((tensors, offset, start, count, prompt[start + 1:start + 1 + count]))
    for k, parts in pending.items():
        group, rows = [], 0
        for part in parts:
            group.append(part)
            rows += part[3]
            if rows >= GROUP_ROWS or part is parts[-1]:
                _score_group(self, hidden_states, group, k)
                group, rows = [], 0
    for req_id in done:
        del wanted[req_id]
        self.requests[req_id].in_progress_prompt_logprobs_cpu = None
    if finished:  # the copies below are non-blocking on a GPU
        self._sync_device()
    return finished


def _score_group(self, hidden_states: torch.Tensor, group: list, k: int) -> None:
    rows_N = torch.cat([torch.arange(offset, offset + count) for _, offset, _, count, _ in group])
    rows_N = rows_N.to(hidden_states.device)
    logits_NV = self.model.compute_logits(hidden_states.index_select(0, rows_N))
    targets_N = torch.tensor([t for *_, ids in group for t in ids], dtype=torch.long, device=logits_NV.device)
    if self.model_config.logprobs_mode in ("raw_logits", "processed_logits"):  # prompts skip the processors
        scores_NV = logits_NV.to(torch.float32)
    else:
        scores_NV = self.sampler.compute_logprobs(logits_NV)
    ids_NK, logprobs_NK, ranks_N, *_ = self.sampler.gather_logprobs(scores_NV, k, targets_N)
    at = 0
    for tensors, _, start, count, _ in group:
        chunk, mine = slice(start, start + count), slice(at, at + count)
        tensors.logprob_token_ids[chunk].copy_(ids_NK[mine], non_blocking=True)
        tensors.logprobs[chunk].copy_(logprobs_NK[mine], non_blocking=True)
        tensors.selected_token_ranks[chunk].copy_(ranks_N[mine], non_blocking=True)
        at += count
