"""The training engine: model loading, compatibility checks, optimizer and schedule, the update step with
gradient accumulation, and atomic checkpoints.

A `Policy` is a model with its tokenizer and stop tokens. Students are trained through `student_head`,
which runs the decoder once and hands the objective an `LMHead` (logits are computed chunk by chunk
inside the loss, never as a whole [B, T, V] tensor).

    python -m pytest tests/test_engine.py -q
"""

from __future__ import annotations

import math
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from aopd_cli.errors import UserError
from aopd_cli.lm_head import LMHead
from aopd_cli.objectives import ObjectiveOutput, TeacherTopK

STATE_FILE = "training_state.pt"
CONFIG_FILE = "aopd_config.yaml"  # the resolved config, in a checkpoint and in a stage's output folder


@dataclass
class Policy:
    model: torch.nn.Module
    tokenizer: object
    stop_ids: set[int]
    device: torch.device


@dataclass
class MicroBatch:
    ids_BL: torch.Tensor  # prompt (left-padded) + response (right-padded)
    attn_BL: torch.Tensor
    first_target: int  # position of the first predicted token: targets are ids_BL[:, first_target:]
    mask_BT: torch.Tensor  # counted targets
    teacher: TeacherTopK | None = None
    base_logprobs_BT: torch.Tensor | None = None
    correct_B: torch.Tensor | None = None

    @property
    def targets_BT(self) -> torch.Tensor:
        return self.ids_BL[:, self.first_target:]

    def to(self, device) -> "MicroBatch":
        """This micro-batch with every tensor on `device` (micro-batches wait on the CPU for their turn)."""
        def move(tensor):
            return tensor.to(device) if tensor is not None else None

        return MicroBatch(self.ids_BL.to(device), self.attn_BL.to(device), self.first_target, self.mask_BT.to(device),
                          self.teacher.to(device) if self.teacher is not None else None,
                          move(self.base_logprobs_BT), move(self.correct_B))


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


def _dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "float32" or (name == "auto" and device.type == "cpu"):
        return torch.float32
    if name == "bfloat16" or torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def _is_local(path: str) -> bool:
    """A path that exists, or that cannot be a hub id ("org/name")."""
    return Path(path).expanduser().exists() or path.startswith((".", "/", "~")) or \
        not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", path)


def load_policy(cfg, *, role: str, device: torch.device | None = None, seed: int = 0) -> Policy:
    """A model and tokenizer from `cfg.path` (local folder or hub id) or a fresh lab model (`cfg.arch`)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    device = device or pick_device()
    dtype = _dtype(cfg.dtype, device)
    if cfg.arch is not None:
        from aopd_cli.data.lab import ensure_lab

        tokenizer = AutoTokenizer.from_pretrained(ensure_lab() / "tokenizer")
        model = _fresh_lab_model(cfg.arch, tokenizer, seed).to(dtype)
    else:
        path = cfg.path
        if _is_local(path) and not (Path(path).expanduser() / "config.json").is_file():
            raise UserError(f"{role}.path: no checkpoint at {path!r} (expected a folder with config.json; "
                            "run the stage that makes it, e.g. `aopd pipeline`, or give a hub id)")
        try:
            tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=cfg.trust_remote_code)
        except (OSError, ValueError) as err:
            raise UserError(f"{role}.path: cannot load {path!r}: {str(err)[:300]}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return Policy(model.to(device), tokenizer, stop_token_ids(tokenizer), device)


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


def _decoder_hidden(model, ids_BL, attn_BL) -> torch.Tensor:
    # left padding: positions count real tokens only, as in generation
    position_ids_BL = (attn_BL.long().cumsum(-1) - 1).clamp_min(0)
    decoder = getattr(model, model.base_model_prefix)
    return decoder(input_ids=ids_BL, attention_mask=attn_BL, position_ids=position_ids_BL).last_hidden_state


def student_head(model, micro: MicroBatch, chunk_size: int = 1024) -> LMHead:
    """The decoder run once on a micro-batch (already on the model's device) and its output layer."""
    hidden_BLH = _decoder_hidden(model, micro.ids_BL, micro.attn_BL)
    return LMHead(hidden_BLH[:, micro.first_target - 1:-1], model.get_output_embeddings().weight, chunk_size)


@torch.no_grad()
def target_hidden(model, micro: MicroBatch) -> torch.Tensor:
    """Last hidden states [B, T, H] at the positions that predict the targets (scorers only)."""
    hidden_BLH = _decoder_hidden(model, micro.ids_BL, micro.attn_BL)
    return hidden_BLH[:, micro.first_target - 1:-1]


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


def update(policy: Policy, optimizer, scheduler, micro_batches: list[MicroBatch],
           loss_fn: Callable[[object, MicroBatch, int], ObjectiveOutput], normalizer: int,
           grad_clip: float) -> tuple[float, float, dict[str, float]]:
    """One optimizer step over micro-batches; their losses add up to the loss of the whole batch because
    each is normalised by the whole batch's `normalizer`. Returns (loss, grad norm, token-weighted metrics)."""
    policy.model.train()
    optimizer.zero_grad(set_to_none=True)
    total_loss, metric_sums, total_tokens = 0.0, {}, 0
    for micro in micro_batches:
        micro = micro.to(policy.device)
        output = loss_fn(student_head(policy.model, micro), micro, normalizer)
        output.loss.backward()
        total_loss += float(output.loss.detach())
        tokens = int(micro.mask_BT.sum())
        total_tokens += tokens
        for key, value in output.metrics.items():
            metric_sums[key] = metric_sums.get(key, 0.0) + value * tokens
    grad_norm = float(torch.nn.utils.clip_grad_norm_(policy.model.parameters(), grad_clip))
    optimizer.step()
    scheduler.step()
    metrics = {key: value / max(total_tokens, 1) for key, value in metric_sums.items()}
    return total_loss, grad_norm, metrics


def save_checkpoint(policy: Policy, directory: Path, *, config_yaml: str, optimizer=None, scheduler=None,
                    step: int = 0) -> Path:
    """Weights (safetensors), tokenizer, resolved config and training state, written to a temporary folder
    and renamed into place: a crash never leaves a half checkpoint at `directory`."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = directory.with_name(f".{directory.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    policy.model.save_pretrained(staging, safe_serialization=True)
    policy.tokenizer.save_pretrained(staging)
    (staging / CONFIG_FILE).write_text(config_yaml)
    state = {"step": step, "torch_rng": torch.get_rng_state(), "python_rng": random.getstate()}
    if optimizer is not None:
        state["optimizer"] = optimizer.state_dict()
    if scheduler is not None:
        state["scheduler"] = scheduler.state_dict()
    torch.save(state, staging / STATE_FILE)
    old = directory.with_name(f".{directory.name}.old-{os.getpid()}")
    if directory.exists():
        directory.rename(old)
    staging.rename(directory)
    shutil.rmtree(old, ignore_errors=True)
    return directory


def load_training_state(directory: Path) -> dict:
    return torch.load(Path(directory) / STATE_FILE, weights_only=True)
