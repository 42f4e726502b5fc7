"""The losses of `method.md`, as pure torch functions of tensors, and their per-token diagnostics.

Every objective works on the counted tokens only: `mask_BT` selects them and the per-token maths runs on
flat `[N]` tensors (N = counted tokens), so padding and prompt positions never cost a vocabulary row. The
selection is made once per call (`counted`: on a GPU, the one point where the host waits for the device),
and the diagnostics stay tensors on the device: the update reads them back once per step.
The student is given either as logits `[B,T,V]` or as an `LMHead` (hidden states and the output
embedding); the `LMHead` path computes logits chunk by chunk and recomputes them in backward, so its
peak memory is bounded by `chunk_size * V`, never by `B*T*V`.

`OBJECTIVES` is the one table of what each objective needs from the training loop (samples from whom,
teacher scores, a frozen base, reference responses, correctness flags): the loop asks it, never the name.

Reduction and micro-batching: a loss is `sum_t w_t * l_t` with the weights of `method.md`. Pass
`normalizer=global_normalizer(full_batch_mask_BT, reduction)` when the batch is split into
micro-batches (gradient accumulation, data parallelism): the micro-batch losses then add up to exactly the
loss of the whole batch. Without it, the normaliser of the given batch is used.

    python -m pytest tests/test_objectives.py -q
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Literal

import torch

from aopd_cli.training.lm_head import LMHead, chunked_gather, to_f32

Reduction = Literal["seq-mean-token-mean", "token-mean"]
Support = Literal["raw", "renorm", "tail"]
Intervention = Literal["threshold", "zero", "accuracy"]

# Log-probabilities below this are clamped: an -inf from a scorer would otherwise turn into NaN
# (0 * inf) in the divergences. exp(-1e4) is 0 in float32, so the value of every term is unchanged.
LOGP_FLOOR = -1.0e4


@dataclass(frozen=True)
class TeacherTopK:
    """What a teacher scorer returns for each response position."""

    token_logprobs: torch.Tensor  # [B,T] log P_T of the sampled token
    topk_ids: torch.Tensor  # [B,T,K] the K most likely ids, descending
    topk_logprobs: torch.Tensor  # [B,T,K] their full-vocabulary log-probs

    def to(self, device) -> "TeacherTopK":
        return TeacherTopK(self.token_logprobs.to(device), self.topk_ids.to(device), self.topk_logprobs.to(device))


@dataclass
class ObjectiveOutput:
    loss: torch.Tensor  # 0-dim
    metrics: dict[str, torch.Tensor]  # 0-dim, detached, on the loss's device
    advantages: torch.Tensor | None = None  # [N] detached K1 advantages of the counted tokens (histograms)
    token_logprobs: torch.Tensor | None = None  # [N] detached log P_S(y_t) of the counted tokens (engine drift)
    counted_N: torch.Tensor | None = None  # [N] their flat positions in the micro-batch (`counted`)


def counted(mask_BT: torch.Tensor) -> torch.Tensor:
    """[N] flat positions (row * T + column) of the counted tokens. Selecting by these indices is free of
    host syncs; making them is one (the count N sizes every flat tensor)."""
    return torch.arange(mask_BT.numel(), device=mask_BT.device)[mask_BT.reshape(-1)]


def flat(values_BT: torch.Tensor, index_N: torch.Tensor) -> torch.Tensor:
    """values_BT[mask_BT] for the `counted` positions `index_N`: [B, T, ...] -> [N, ...]. Row and column
    indices, so a strided view (the hidden states past the prompt) is never copied whole."""
    index_N = index_N.to(values_BT.device)
    width = values_BT.shape[1]
    return values_BT[index_N // width, index_N % width]


@dataclass(frozen=True)
class _StudentView:
    token_logp_N: torch.Tensor  # log P_S(y_t), carries gradient
    support_logp_NK: torch.Tensor | None  # log P_S(v) for v in S_t, carries gradient
    entropy_N: torch.Tensor  # no gradient
    index_N: torch.Tensor  # the counted positions (`counted`)


def _student_view(student, tokens_BT, mask_BT, support_ids_BTK) -> _StudentView:
    index_N = counted(mask_BT)
    ids_NJ = flat(tokens_BT, index_N).unsqueeze(-1)
    if support_ids_BTK is not None:
        ids_NJ = torch.cat([ids_NJ, flat(support_ids_BTK, index_N)], dim=-1)
    if isinstance(student, LMHead):
        gathered_NJ, entropy_N = chunked_gather(student, flat(student.hidden, index_N), ids_NJ)
    else:
        # float32 even for bf16 logits: log-softmax over a large vocabulary loses mass in bf16
        logp_NV = torch.log_softmax(to_f32(flat(student, index_N)), dim=-1)
        gathered_NJ = logp_NV.gather(-1, ids_NJ)
        with torch.no_grad():
            entropy_N = -(logp_NV.exp() * logp_NV).sum(-1)
    support_logp_NK = gathered_NJ[:, 1:] if support_ids_BTK is not None else None
    return _StudentView(gathered_NJ[:, 0], support_logp_NK, entropy_N, index_N)


def global_normalizer(mask_BT: torch.Tensor, reduction: Reduction) -> int:
    """The normaliser of a whole batch, to pass to each of its micro-batches."""
    if reduction == "token-mean":
        return int(mask_BT.sum())
    return int((mask_BT.sum(-1) > 0).sum())


def _reduce(loss_N, mask_BT, index_N, reduction: Reduction, normalizer) -> torch.Tensor:
    if normalizer is None:
        normalizer = global_normalizer(mask_BT, reduction)
    if reduction == "token-mean":
        return loss_N.sum() / max(normalizer, 1)
    counts_B = mask_BT.sum(-1)
    seq_N = _seq_index(mask_BT, index_N)
    return (loss_N / counts_B[seq_N].to(loss_N.dtype)).sum() / max(normalizer, 1)


def _seq_index(mask_BT, index_N) -> torch.Tensor:
    """[N] the sequence (row) of each counted token."""
    return index_N // mask_BT.shape[1]


def _log_tail(logp_NK) -> torch.Tensor:
    # log(1 - sum_S P), clamped where the support holds all the mass (its tail term is then 0 anyway)
    tail_N1 = -torch.expm1(torch.logsumexp(logp_NK, dim=-1, keepdim=True))
    return torch.log(tail_N1.clamp_min(torch.finfo(logp_NK.dtype).tiny))


def apply_support(teacher_logp_NK, student_logp_NK, support: Support):
    """The two distributions on S_t under a support convention of method.md."""
    if support == "raw":
        return teacher_logp_NK, student_logp_NK
    if support == "renorm":
        return (
            teacher_logp_NK - torch.logsumexp(teacher_logp_NK, -1, keepdim=True),
            student_logp_NK - torch.logsumexp(student_logp_NK, -1, keepdim=True),
        )
    if support == "tail":
        return (
            torch.cat([teacher_logp_NK, _log_tail(teacher_logp_NK)], dim=-1),
            torch.cat([student_logp_NK, _log_tail(student_logp_NK)], dim=-1),
        )
    raise ValueError(f"support must be raw, renorm or tail, got {support!r}")


def divergence_beta(teacher_logp_NK, student_logp_NK, beta: float) -> torch.Tensor:
    """D_beta per token: beta=1 forward KL(P_T||P_S), beta=0 reverse KL, in between the generalized JSD
    with M = (1-beta) P_T + beta P_S (TRL's generalized_jsd_loss with beta_trl = 1 - beta)."""
    teacher_p_NK, student_p_NK = teacher_logp_NK.exp(), student_logp_NK.exp()
    if beta == 1.0:
        return (teacher_p_NK * (teacher_logp_NK - student_logp_NK)).sum(-1)
    if beta == 0.0:
        return (student_p_NK * (student_logp_NK - teacher_logp_NK)).sum(-1)
    mix_logp_NK = torch.logaddexp(teacher_logp_NK + math.log(1 - beta), student_logp_NK + math.log(beta))
    return (1 - beta) * (teacher_p_NK * (teacher_logp_NK - mix_logp_NK)).sum(-1) + beta * (
        student_p_NK * (student_logp_NK - mix_logp_NK)
    ).sum(-1)


def _mean(values_N: torch.Tensor) -> torch.Tensor:
    """The mean as a detached 0-dim float32 tensor on the values' device; 0 for no values (never NaN)."""
    values_N = values_N.detach().float()
    return values_N.mean() if values_N.numel() else values_N.new_zeros(())


def _quantile(values_N: torch.Tensor, q: float) -> torch.Tensor:
    values_N = values_N.detach().float()
    return torch.quantile(values_N, q) if values_N.numel() else values_N.new_zeros(())


def _diagnostics(view, teacher_token_logp_N, teacher_topk_logp_NK, zero_eps: float) -> dict[str, torch.Tensor]:
    metrics = {"entropy": _mean(view.entropy_N)}
    if teacher_token_logp_N is None:
        return metrics
    with torch.no_grad():
        adv_N = teacher_token_logp_N - view.token_logp_N
        student_logp_NK = view.support_logp_NK
        metrics.update(
            adv_mean=_mean(adv_N),
            adv_std=adv_N.float().std(unbiased=False) if adv_N.numel() else _mean(adv_N),
            adv_p01=_quantile(adv_N, 0.01),
            adv_p99=_quantile(adv_N, 0.99),
            adv_neg_frac=_mean(adv_N < 0),
            adv_zero_frac=_mean(adv_N.abs() <= zero_eps),
            teacher_mass=_mean(teacher_topk_logp_NK.exp().sum(-1)),
            student_mass=_mean(student_logp_NK.exp().sum(-1)),
            fkl=_mean(divergence_beta(teacher_topk_logp_NK, student_logp_NK, 1.0)),
        )
    return metrics


def _teacher_flat(teacher: TeacherTopK, index_N):
    return (
        to_f32(flat(teacher.token_logprobs, index_N)).clamp_min(LOGP_FLOOR),
        to_f32(flat(teacher.topk_logprobs, index_N)).clamp_min(LOGP_FLOOR),
    )


def opd_loss(student, tokens, mask, teacher: TeacherTopK, *, reduction: Reduction = "seq-mean-token-mean",
             normalizer: int | None = None, zero_eps: float = 1e-2) -> ObjectiveOutput:
    """On-policy distillation: -sg[log P_T(y_t) - log P_S(y_t)] * log P_S(y_t)."""
    view = _student_view(student, tokens, mask, teacher.topk_ids)
    teacher_token_logp_N, teacher_topk_logp_NK = _teacher_flat(teacher, view.index_N)
    student_token_logp_N = view.token_logp_N.detach()
    adv_N = teacher_token_logp_N - student_token_logp_N
    loss = _reduce(-adv_N * view.token_logp_N, mask, view.index_N, reduction, normalizer)
    return ObjectiveOutput(loss, _diagnostics(view, teacher_token_logp_N, teacher_topk_logp_NK, zero_eps), adv_N,
                           student_token_logp_N, view.index_N)


def aopd_loss(student, tokens, mask, teacher: TeacherTopK, *, tau: float = 0.0, beta: float = 1.0,
              intervention: Intervention = "threshold", zero_eps: float = 1e-2,
              correct: torch.Tensor | None = None, support: Support = "raw",
              reduction: Reduction = "seq-mean-token-mean", normalizer: int | None = None) -> ObjectiveOutput:
    """AOPD: G_t * D_beta(S_t)/K + (1 - G_t) * OPD, with the gate G_t of `intervention`."""
    view = _student_view(student, tokens, mask, teacher.topk_ids)
    teacher_token_logp_N, teacher_topk_logp_NK = _teacher_flat(teacher, view.index_N)
    top_k = teacher.topk_ids.shape[-1]
    student_token_logp_N = view.token_logp_N.detach()
    adv_N = teacher_token_logp_N - student_token_logp_N
    if intervention == "zero":
        gate_N = adv_N.abs() <= zero_eps
    elif tau <= -1.0:
        # exactly OPD, even where P_T underflows to 0 while P_S rounds to 1
        gate_N = torch.zeros_like(adv_N, dtype=torch.bool)
    else:
        # on probabilities, not log-probabilities (paper Eq. 9)
        gate_N = (teacher_token_logp_N.exp() - student_token_logp_N.exp()) <= tau
    if intervention == "accuracy":
        if correct is None:
            raise ValueError("intervention='accuracy' needs the per-sequence `correct` flags [B]")
        gate_N = gate_N & ~correct.to(mask.device)[_seq_index(mask, view.index_N)]
    guidance_N = divergence_beta(*apply_support(teacher_topk_logp_NK, view.support_logp_NK, support), beta) / top_k
    loss_N = torch.where(gate_N, guidance_N, -adv_N * view.token_logp_N)
    metrics = _diagnostics(view, teacher_token_logp_N, teacher_topk_logp_NK, zero_eps)
    metrics["intervention_ratio"] = _mean(gate_N)
    return ObjectiveOutput(_reduce(loss_N, mask, view.index_N, reduction, normalizer), metrics, adv_N,
                           student_token_logp_N, view.index_N)


def gkd_loss(student, tokens, mask, teacher: TeacherTopK, *, beta: float = 0.5, support: Support = "raw",
             reduction: Reduction = "seq-mean-token-mean", normalizer: int | None = None,
             zero_eps: float = 1e-2) -> ObjectiveOutput:
    """GKD: D_beta between teacher and student on the teacher's top-K support (no 1/K)."""
    view = _student_view(student, tokens, mask, teacher.topk_ids)
    teacher_token_logp_N, teacher_topk_logp_NK = _teacher_flat(teacher, view.index_N)
    loss_N = divergence_beta(*apply_support(teacher_topk_logp_NK, view.support_logp_NK, support), beta)
    metrics = _diagnostics(view, teacher_token_logp_N, teacher_topk_logp_NK, zero_eps)
    adv_N = teacher_token_logp_N - view.token_logp_N.detach()
    return ObjectiveOutput(_reduce(loss_N, mask, view.index_N, reduction, normalizer), metrics, adv_N,
                           view.token_logp_N.detach(), view.index_N)


def exopd_loss(student, tokens, mask, teacher: TeacherTopK, *, base_logprobs: torch.Tensor, lam: float = 1.25,
               reduction: Reduction = "seq-mean-token-mean", normalizer: int | None = None,
               zero_eps: float = 1e-2) -> ObjectiveOutput:
    """ExOPD: -A^ex * log P_S(y_t), A^ex = lam (log P_T - log P_B) - (log P_S - log P_B)."""
    view = _student_view(student, tokens, mask, teacher.topk_ids)
    teacher_token_logp_N, teacher_topk_logp_NK = _teacher_flat(teacher, view.index_N)
    base_logp_N = to_f32(flat(base_logprobs, view.index_N)).clamp_min(LOGP_FLOOR)
    adv_N = lam * (teacher_token_logp_N - base_logp_N) - (view.token_logp_N.detach() - base_logp_N)
    loss = _reduce(-adv_N * view.token_logp_N, mask, view.index_N, reduction, normalizer)
    metrics = _diagnostics(view, teacher_token_logp_N, teacher_topk_logp_NK, zero_eps)
    metrics["exadv_mean"] = _mean(adv_N)
    return ObjectiveOutput(loss, metrics, teacher_token_logp_N - view.token_logp_N.detach(), view.token_logp_N.detach(),
                           view.index_N)


def seqkd_loss(student, tokens, mask, *, reduction: Reduction = "seq-mean-token-mean",
               normalizer: int | None = None) -> ObjectiveOutput:
    """SeqKD (and SFT): -log P_S(y_t) on given responses (teacher samples, or reference traces)."""
    view = _student_view(student, tokens, mask, None)
    loss = _reduce(-view.token_logp_N, mask, view.index_N, reduction, normalizer)
    metrics = _diagnostics(view, None, None, 0.0)
    metrics["nll"] = _mean(-view.token_logp_N)
    return ObjectiveOutput(loss, metrics, token_logprobs=view.token_logp_N.detach(), counted_N=view.index_N)


# ---------------------------------------------------------------- what each objective needs
@dataclass(frozen=True)
class ObjectiveSpec:
    """What the loop must give an objective: `loss(student, tokens, mask, **inputs, **options, normalizer=)`."""

    loss: Callable[..., ObjectiveOutput]
    options: tuple[str, ...]  # config keys of the objective passed to `loss` as keyword arguments
    inputs: tuple[str, ...] = ()  # per micro-batch: "teacher" (top-K scores), "base_logprobs", "correct"
    samples_from: Literal["student", "teacher"] = "student"  # whose rollouts it trains on
    references: bool = False  # a step may use the dataset's reference responses (probability 1 - lmbda)
    grades: Callable[[Any], bool] = lambda objective: False  # needs per-sequence correctness flags?

    @property
    def teacher_scores(self) -> bool:
        return "teacher" in self.inputs

    @property
    def frozen_base(self) -> bool:
        return "base_logprobs" in self.inputs


OBJECTIVES: dict[str, ObjectiveSpec] = {
    "aopd": ObjectiveSpec(aopd_loss, ("tau", "beta", "intervention", "zero_eps", "support", "reduction"),
                          ("teacher", "correct"), grades=lambda objective: objective.intervention == "accuracy"),
    "opd": ObjectiveSpec(opd_loss, ("reduction",), ("teacher",)),
    "gkd": ObjectiveSpec(gkd_loss, ("beta", "support", "reduction"), ("teacher",), references=True),
    "seqkd": ObjectiveSpec(seqkd_loss, ("reduction",), samples_from="teacher"),
    "exopd": ObjectiveSpec(exopd_loss, ("lam", "reduction"), ("teacher", "base_logprobs")),
}


def objective_loss(objective):
    """(head, micro, normalizer) -> ObjectiveOutput for the configured objective (`objective` a config
    section; `micro` a training.update.MicroBatch on the device): the table says which of the micro-batch's
    inputs and which options it takes."""
    spec = OBJECTIVES[objective.name]
    options = {key: getattr(objective, key) for key in spec.options}

    def loss(head, micro, normalizer):
        available = {"teacher": micro.teacher, "base_logprobs": micro.base_logprobs_BT, "correct": micro.correct_B}
        inputs = {key: available[key] for key in spec.inputs}
        return spec.loss(head, micro.targets_BT, micro.mask_BT, **inputs, **options, normalizer=normalizer)
    return loss
