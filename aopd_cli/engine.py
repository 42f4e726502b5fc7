"""The training engine: model loading (sharded with FSDP2 under torchrun), compatibility checks,
optimizer and schedule, and the update step with gradient accumulation and data parallelism.

A `Policy` is a model with its tokenizer and stop tokens. Students are trained through `student_head`,
which runs the model's forward once (so FSDP2 gathers and frees its shards as usual) and hands the
objective an `LMHead`: logits are computed chunk by chunk inside the loss, never as a [B, T, V] tensor.

    python -m pytest tests/test_engine.py -q
"""

from __future__ import annotations

import math
import os
import random
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch

from aopd_cli import distributed as dist
from aopd_cli.errors import UserError
from aopd_cli.lm_head import LMHead
from aopd_cli.objectives import ObjectiveOutput, TeacherTopK


@dataclass
class Policy:
    model: torch.nn.Module
    tokenizer: object
    stop_ids: set[int]
    device: torch.device
    compute_dtype: torch.dtype = torch.float32  # what forwards run in (bf16 on GPUs; fp32 master weights)


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

    @property
    def targets_BT(self) -> torch.Tensor:
        return self.ids_BL[:, self.first_target:]

    def to(self, device) -> "MicroBatch":
        """This micro-batch with every tensor on `device` (micro-batches wait on the CPU for their turn)."""
        def move(tensor):
            return tensor.to(device) if tensor is not None else None

        return MicroBatch(self.ids_BL.to(device), self.attn_BL.to(device), self.first_target, self.mask_BT.to(device),
                          self.teacher.to(device) if self.teacher is not None else None,
                          move(self.base_logprobs_BT), move(self.correct_B), self.rows_B)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:
        pass


def pick_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def compute_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "float32" or (name == "auto" and device.type == "cpu"):
        return torch.float32
    if name == "bfloat16" or torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def load_policy(cfg, *, role: str, device: torch.device | None = None, seed: int = 0, trainable: bool = False,
                activation_checkpointing: bool = False) -> Policy:
    """A model and tokenizer from `cfg.path` (local folder or hub id) or a fresh lab model (`cfg.arch`),
    sharded across ranks when a process group runs (trainable: fp32 master weights, bf16 compute on GPUs)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    device = device or pick_device()
    dtype = compute_dtype(cfg.dtype, device)
    if cfg.arch is not None:
        from aopd_cli.data.lab import ensure_lab

        tokenizer = AutoTokenizer.from_pretrained(ensure_lab() / "tokenizer")
        model = _fresh_lab_model(cfg.arch, tokenizer, seed).to(dtype)
    else:
        path = cfg.path
        from aopd_cli.config.paths import names_a_path

        if names_a_path(path) and not (Path(path).expanduser() / "config.json").is_file():
            raise UserError(f"{role}.path: no checkpoint at {path!r} (expected a folder with config.json; "
                            "run the stage that makes it, e.g. `aopd pipeline`, or give a hub id)")
        try:
            tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32 if trainable else dtype,
                                                         trust_remote_code=cfg.trust_remote_code)
        except (OSError, ValueError) as err:
            raise UserError(f"{role}.path: cannot load {path!r}: {str(err)[:300]}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not trainable:
        model.requires_grad_(False)
    model = dist.shard(model, trainable=trainable, compute_dtype=dtype,
                       activation_checkpointing=activation_checkpointing)
    return Policy(model.to(device), tokenizer, stop_token_ids(tokenizer), device, dtype)


def _fresh_lab_model(arch, tokenizer, seed: int):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=arch.hidden_size, num_hidden_layers=arch.num_layers,
        num_attention_heads=arch.num_heads, num_key_value_heads=arch.num_kv_heads, head_dim=arch.head_dim,
        intermediate_size=arch.intermediate_size, max_position_embeddings=1024, tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None,
    )
    torch.manual_seed(seed)
    return Qwen3ForCausalLM(config)


def stop_token_ids(tokenizer) -> set[int]:
    """EOS and the chat template's end-of-turn token (a Base model's EOS differs from <|im_end|>)."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if isinstance(end_of_turn, int) and end_of_turn != tokenizer.unk_token_id:
        ids.add(end_of_turn)
    return ids


def check_compatible(student: Policy, other: Policy, role: str) -> None:
    """Teacher (or base) and student must share vocabulary, special tokens and stop tokens."""
    s_vocab, o_vocab = student.model.get_output_embeddings().weight.shape[0], \
        other.model.get_output_embeddings().weight.shape[0]
    problems = []
    if s_vocab != o_vocab:
        problems.append(f"output vocabulary {o_vocab} vs the student's {s_vocab}")
    if len(student.tokenizer) != len(other.tokenizer) or student.tokenizer.get_vocab() != other.tokenizer.get_vocab():
        problems.append(f"tokenizer vocabulary ({len(other.tokenizer)} tokens vs {len(student.tokenizer)})")
    if student.tokenizer.all_special_tokens != other.tokenizer.all_special_tokens:
        problems.append(f"special tokens {other.tokenizer.all_special_tokens} vs {student.tokenizer.all_special_tokens}")
    if student.stop_ids != other.stop_ids:
        problems.append(f"stop tokens {sorted(other.stop_ids)} vs {sorted(student.stop_ids)}")
    if problems:
        raise UserError(f"the {role} cannot score the student's tokens: " + "; ".join(problems)
                        + ". Teacher and student must share the tokenizer and vocabulary.")


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


def make_optimizer(model, train):
    optimizer = torch.optim.AdamW(model.parameters(), lr=train.lr, weight_decay=train.weight_decay,
                                  betas=(0.9, 0.95))

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
    total_loss, total_tokens, metric_sums = 0.0, 0, {}
    # FSDP2 averages gradients over ranks, but each rank's loss is already a share of the global loss
    # (divided by the global normaliser): scaling by the world size makes the average the sum
    scale = dist.world_size() if dist.is_sharded(model) else 1
    for micro in micro_batches:
        micro = micro.to(policy.device)
        output = loss_fn(student_head(model, micro), micro, normalizer)
        (output.loss * scale).backward()
        total_loss += float(output.loss.detach())
        tokens = int(micro.mask_BT.sum())
        total_tokens += tokens
        for key, value in output.metrics.items():
            metric_sums[key] = metric_sums.get(key, 0.0) + value * tokens
    keys = sorted(metric_sums)
    reduced = dist.all_reduce([total_loss, total_tokens] + [metric_sums[k] for k in keys])
    total_loss, total_tokens = reduced[0], reduced[1]
    metrics = {key: value / max(total_tokens, 1) for key, value in zip(keys, reduced[2:])}
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
    if not (math.isfinite(total_loss) and math.isfinite(grad_norm)):
        optimizer.zero_grad(set_to_none=True)
        return StepResult(total_loss, grad_norm, metrics, stepped=False)
    optimizer.step()
    scheduler.step()
    return StepResult(total_loss, grad_norm, metrics, stepped=True)


def _empty(micro: MicroBatch) -> MicroBatch:
    return replace(micro, mask_BT=torch.zeros_like(micro.mask_BT))
