"""Models for training and scoring: loading a checkpoint, a hub id or a fresh lab model (sharded with
FSDP2 under torchrun), the compute dtype, stop tokens, and the check that a teacher (or base) can score the
student's tokens. A `Policy` is a model with its tokenizer and stop tokens.

    python -m pytest tests/test_engine.py -q
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from aopd_cli.errors import UserError
from aopd_cli.training import distributed as dist


@dataclass
class Policy:
    model: torch.nn.Module
    tokenizer: object
    stop_ids: set[int]
    device: torch.device
    compute_dtype: torch.dtype = torch.float32  # what forwards run in (bf16 on GPUs; fp32 master weights)



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
    sharded across ranks when a process group runs (trainable: fp32 master weights, bf16 compute on GPUs);
    a checkpoint is then read into the shards directly (training/sharded_load.py)."""
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
        load_dtype = torch.float32 if trainable else dtype
        try:
            if dist.running():  # each rank reads its shard only: host memory falls with the world size
                from aopd_cli.training.sharded_load import load_sharded, local_folder

                folder = local_folder(path, cfg.trust_remote_code)
                tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=cfg.trust_remote_code)
                model = load_sharded(path, load_dtype=load_dtype, trainable=trainable, compute_dtype=dtype,
                                     activation_checkpointing=activation_checkpointing, device=device,
                                     trust_remote_code=cfg.trust_remote_code)
                return _policy(model, tokenizer, device, dtype)
            tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
            model = AutoModelForCausalLM.from_pretrained(path, dtype=load_dtype, trust_remote_code=cfg.trust_remote_code)
        except (OSError, ValueError) as err:
            raise UserError(f"{role}.path: cannot load {path!r}: {str(err)[:300]}") from None
    if not trainable:
        model.requires_grad_(False)
    model = dist.shard(model, trainable=trainable, compute_dtype=dtype,
                       activation_checkpointing=activation_checkpointing)
    return _policy(model.to(device), tokenizer, device, dtype)


def _policy(model, tokenizer, device: torch.device, dtype: torch.dtype) -> Policy:
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return Policy(model, tokenizer, stop_token_ids(tokenizer), device, dtype)


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
