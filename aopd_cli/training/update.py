"""The update step: a micro-batch's forward through the model (so FSDP2 gathers and frees its shards as
usual) handing the objective an `LMHead` (logits are computed chunk by chunk inside the loss, never as a
[B, T, V] tensor), the optimizer and its schedule, and one optimizer step with gradient accumulation and
data parallelism.

    python -m pytest tests/test_engine.py -q
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable

import torch

from aopd_cli.training import distributed as dist
from aopd_cli.training.lm_head import LMHead
from aopd_cli.training.models import Policy
from aopd_cli.training.objectives import ObjectiveOutput, TeacherTopK


@dataclass
class MicroBatch:
    ids_BL: torch.Tensor  # prompt (left-padded) + response (right-padded)
    attn_BL: torch.Tensor
    first_target: int  # position of the first predicted token: targets are ids_BL[:, first_target:]
    mask_BT: torch.Tensor  # counted targets
    teacher: TeacherTopK | None = None
    base_logprobs_BT: torch.Tensor | None = None
    correct_B: torch.Tensor | None = None
    rows_B: torch.Tensor | None = None  # which rows of the step's batch these are (micro-batches may reorder)
    ready: Callable[[], TeacherTopK] | None = None  # a served teacher's scores still on their way: awaits them

    @property
    def targets_BT(self) -> torch.Tensor:
        return self.ids_BL[:, self.first_target:]

    def to(self, device) -> "MicroBatch":
        """This micro-batch with every tensor on `device` (micro-batches wait on the CPU for their turn)."""
        def move(tensor):  # without blocking: the host never waits for the device's queue to copy a batch in
            return tensor.to(device, non_blocking=True) if tensor is not None else None

        return MicroBatch(move(self.ids_BL), move(self.attn_BL), self.first_target, move(self.mask_BT),
                          self.teacher.to(device) if self.teacher is not None else None,
                          move(self.base_logprobs_BT), move(self.correct_B), self.rows_B)


def forward_hidden(model, ids_BL, attn_BL) -> tuple[torch.Tensor, torch.Tensor]:
    """(last hidden states [B, L, H], output-layer weight [V, H]) from one forward of the whole model.

    The model's own forward is what FSDP2 hooks (gather the shards, free them, reduce the gradients), so
    it runs, asking for no logits; hooks catch the decoder's output and the output layer's weight as the
    forward sees it (gathered, in the compute dtype)."""
    # left padding: positions count real tokens only, as in generation
    position_ids_BL = (attn_BL.long().cumsum(-1) - 1).clamp_min(0)
    caught = {}
    decoder = getattr(model, model.base_model_prefix)
    hooks = [decoder.register_forward_hook(lambda module, args, out: caught.update(hidden=out.last_hidden_state)),
             model.get_output_embeddings().register_forward_hook(
                 lambda module, args, out: caught.update(weight=module.weight))]
    try:
        model(input_ids=ids_BL, attention_mask=attn_BL, position_ids=position_ids_BL, use_cache=False,
              logits_to_keep=torch.zeros(0, dtype=torch.long, device=ids_BL.device))
    finally:
        for hook in hooks:
            hook.remove()
    return caught["hidden"], caught["weight"]


def student_head(model, micro: MicroBatch, chunk_size: int = 1024) -> LMHead:
    """The forward on a micro-batch (already on the model's device) and its output layer, for the loss."""
    hidden_BLH, weight_VH = forward_hidden(model, micro.ids_BL, micro.attn_BL)
    return LMHead(hidden_BLH[:, micro.first_target - 1:-1], weight_VH, chunk_size)


@torch.no_grad()
def target_hidden(model, micro: MicroBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Hidden states [B, T, H] at the positions that predict the targets, and the output weight (scorers)."""
    hidden_BLH, weight_VH = forward_hidden(model, micro.ids_BL, micro.attn_BL)
    return hidden_BLH[:, micro.first_target - 1:-1], weight_VH


def make_optimizer(model, train, foreach: bool | None = None):
    """AdamW over fp32 (master) parameters and its schedule. `foreach`: PyTorch's choice (on for CUDA
    tensors) unless given; the memory trace, on the CPU, asks for the GPU's."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=train.lr, weight_decay=train.weight_decay,
                                  betas=(0.9, 0.95), foreach=foreach)

    def factor(step: int) -> float:
        if train.warmup_steps and step < train.warmup_steps:
            return (step + 1) / train.warmup_steps
        if train.schedule == "cosine":
            progress = (step - train.warmup_steps) / max(1, train.steps - train.warmup_steps)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return 1.0

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@dataclass
class StepResult:
    loss: float  # the whole (global) batch's loss
    grad_norm: float  # before clipping
    metrics: dict[str, float]  # token-weighted over the global batch
    stepped: bool  # False: a non-finite loss or gradient norm, the optimizer step was skipped


def update(policy: Policy, optimizer, scheduler, micro_batches: list[MicroBatch],
           loss_fn: Callable[[object, MicroBatch, int], ObjectiveOutput], normalizer: int,
           grad_clip: float) -> StepResult:
    """One optimizer step over this rank's micro-batches. Each micro-batch loss is divided by the global
    batch's `normalizer`, so losses and gradients add up (over micro-batches and ranks) to those of the
    whole batch: the step is the same at any micro-batch size and world size. A non-finite loss or
    gradient norm skips the step and leaves the weights as they were."""
    model = policy.model
    model.train()
    optimizer.zero_grad(set_to_none=True)
    # FSDP2 needs the same number of forwards and backwards on every rank: pad with empty micro-batches
    count = int(dist.all_reduce([len(micro_batches)], "max")[0])
    micro_batches = list(micro_batches) + [_empty(micro_batches[0])] * (count - len(micro_batches))
    # the step's sums stay on the device and are read back once, at its end: a float() a micro-batch
    # would make the host wait for the device's queue every time
    loss_sum, token_sum, metric_sums = 0.0, 0.0, {}
    # FSDP2 averages gradients over ranks, but each rank's loss is already a share of the global loss
    # (divided by the global normaliser): scaling by the world size makes the average the sum
    scale = dist.world_size() if dist.is_sharded(model) else 1
    for micro in micro_batches:
        on_device = micro.to(policy.device)
        # the forward needs no teacher: a served teacher's scores for this micro-batch (and the next ones)
        # are still on their way while it runs, and are awaited only for the loss
        head = student_head(model, on_device)
        if micro.ready is not None:  # (an empty micro-batch padding the count awaits the one it copies)
            on_device.teacher = micro.ready().to(policy.device)
        micro = on_device
        output = loss_fn(head, micro, normalizer)
        (output.loss * scale).backward()
        tokens = micro.mask_BT.sum().double()
        loss_sum, token_sum = loss_sum + output.loss.detach().double(), token_sum + tokens
        for key, value in output.metrics.items():
            weighted = torch.as_tensor(value, device=tokens.device).double() * tokens
            metric_sums[key] = metric_sums.get(key, 0.0) + weighted
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
    keys = sorted(metric_sums)
    sums = [torch.as_tensor(v, dtype=torch.float64, device=grad_norm.device) for v in [loss_sum, token_sum]
            + [metric_sums[k] for k in keys]]
    *values, grad_norm = torch.stack(sums + [grad_norm.double()]).tolist()  # the step's one read-back
    total_loss, total_tokens, *reduced = dist.all_reduce(values)
    metrics = {key: value / max(total_tokens, 1) for key, value in zip(keys, reduced)}
    if not (math.isfinite(total_loss) and math.isfinite(grad_norm)):
        optimizer.zero_grad(set_to_none=True)
        return StepResult(total_loss, grad_norm, metrics, stepped=False)
    optimizer.step()
    scheduler.step()
    # the gradients are spent: freed now, not at the next step's start, so rollouts, scoring and a vLLM
    # engine waking up between steps have their memory (4 bytes a parameter, sharded)
    optimizer.zero_grad(set_to_none=True)
    return StepResult(total_loss, grad_norm, metrics, stepped=True)


def _empty(micro: MicroBatch) -> MicroBatch:
    return replace(micro, mask_BT=torch.zeros_like(micro.mask_BT))
