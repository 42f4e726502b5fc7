"""The chunked output layer: the student's logits are computed chunk by chunk inside the loss, and
recomputed in backward, so at most `chunk_size x V` logits are alive (never `B x T x V`).

`LMHead` is what the engine hands an objective instead of logits; `chunked_gather` returns the
log-probabilities of chosen ids (the sampled token, the teacher's top-K) and the entropy per row.

    python -m pytest tests/test_objectives.py -q -k lmhead
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LMHead:
    """The student's output layer: logits = hidden @ weight.T, computed chunk by chunk."""

    hidden: torch.Tensor  # [B,T,H]
    weight: torch.Tensor  # [V,H]
    chunk_size: int = 1024


class _ChunkedGather(torch.autograd.Function):
    """log_softmax(hidden @ weight.T).gather(ids), without keeping [N,V] alive.

    Backward recomputes each chunk's logits: d logp_j / d z = onehot(ids_j) - softmax(z).
    """

    @staticmethod
    def forward(ctx, hidden_NH, weight_VH, ids_NJ, chunk_size):
        n_rows = hidden_NH.shape[0]
        out_dtype = _at_least_f32(weight_VH.dtype)
        gathered_NJ = hidden_NH.new_empty(ids_NJ.shape, dtype=out_dtype)
        entropy_N = hidden_NH.new_empty(n_rows, dtype=out_dtype)
        for start in range(0, n_rows, chunk_size):
            stop = min(start + chunk_size, n_rows)
            logits_CV = logits_f32(hidden_NH[start:stop], weight_VH)
            logp_CV = torch.log_softmax(logits_CV, dim=-1)
            gathered_NJ[start:stop] = logp_CV.gather(-1, ids_NJ[start:stop])
            entropy_N[start:stop] = -(logp_CV.exp() * logp_CV).sum(-1)
            del logits_CV, logp_CV
        ctx.save_for_backward(hidden_NH, weight_VH, ids_NJ)
        ctx.chunk_size = chunk_size
        ctx.mark_non_differentiable(entropy_N)
        return gathered_NJ, entropy_N

    @staticmethod
    def backward(ctx, grad_gathered_NJ, _grad_entropy_N):
        hidden_NH, weight_VH, ids_NJ = ctx.saved_tensors
        want_hidden, want_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        accumulate_dtype = _at_least_f32(weight_VH.dtype)
        grad_hidden_NH = torch.zeros_like(hidden_NH, dtype=accumulate_dtype) if want_hidden else None
        # the weight gradient accumulates in the weights' own dtype: a float32 copy of a 152k x 4096 head
        # would cost 2.3 GiB, more than all the chunks together (each chunk's matmul accumulates in fp32)
        grad_weight_VH = torch.zeros_like(weight_VH) if want_weight else None
        grad_gathered_NJ = grad_gathered_NJ.to(accumulate_dtype)
        for start in range(0, hidden_NH.shape[0], ctx.chunk_size):
            stop = min(start + ctx.chunk_size, hidden_NH.shape[0])
            hidden_CH = hidden_NH[start:stop]
            probs_CV = torch.softmax(logits_f32(hidden_CH, weight_VH), dim=-1)
            grad_CJ = grad_gathered_NJ[start:stop]
            grad_logits_CV = probs_CV.mul_(-grad_CJ.sum(-1, keepdim=True))
            grad_logits_CV.scatter_add_(-1, ids_NJ[start:stop], grad_CJ)
            grad_logits_CV = grad_logits_CV.to(weight_VH.dtype)
            if want_hidden:
                grad_hidden_NH[start:stop] = grad_logits_CV @ weight_VH
            if want_weight:
                grad_weight_VH += grad_logits_CV.T @ hidden_CH.to(weight_VH.dtype)
            del probs_CV, grad_logits_CV
        return (
            grad_hidden_NH.to(hidden_NH.dtype) if want_hidden else None,
            grad_weight_VH.to(weight_VH.dtype) if want_weight else None,
            None,
            None,
        )


def _at_least_f32(dtype: torch.dtype) -> torch.dtype:
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def to_f32(x: torch.Tensor) -> torch.Tensor:
    """At least float32: bf16/fp16 are upcast, float64 (tests) is kept."""
    return x.to(_at_least_f32(x.dtype))


def logits_f32(hidden_CH: torch.Tensor, weight_VH: torch.Tensor) -> torch.Tensor:
    """hidden @ weight.T with float32 output, never rounded through bf16 on the way: at V = 152k, logits up
    to ~43 rounded to bf16 (a step of 0.25 there) moved top-32 log-probs by 0.045 nats on average, 0.23 at
    worst, and the teacher's and the student's roundings differ, which AOPD's gate compares. On a GPU (and
    on the planner's fake tensors) the bf16 matmul writes its float32 accumulator out as it is; a CPU has
    no such kernel, so low-precision inputs are upcast there (the lab computes in float32 anyway)."""
    hidden_CH = hidden_CH.to(weight_VH.dtype)
    if weight_VH.dtype in (torch.float32, torch.float64):
        return hidden_CH @ weight_VH.T
    if hidden_CH.device.type == "cuda" or is_fake(hidden_CH):
        try:
            return torch.mm(hidden_CH, weight_VH.T, out_dtype=torch.float32)
        except (TypeError, RuntimeError):  # a torch before `out_dtype` (2.8): right, at a float32 weight's cost
            pass
    return hidden_CH.float() @ weight_VH.float().T


def is_fake(tensor: torch.Tensor) -> bool:
    from torch._subclasses.fake_tensor import is_fake as fake

    return fake(tensor)


def chunked_gather(head: LMHead, hidden_NH: torch.Tensor, ids_NJ: torch.Tensor):
    """(log P(ids) [N,J] with gradient, entropy [N] without) for the rows `hidden_NH` of `head`."""
    return _ChunkedGather.apply(hidden_NH, head.weight, ids_NJ, head.chunk_size)
