"""Models for training and scoring: loading a checkpoint, a hub id or a fresh lab model (sharded with
FSDP2 under torchrun), the compute dtype, stop tokens, and the check that a teacher (or base) can score the
student's tokens. A `Policy` is a model with its tokenizer and stop tokens.

A model folder that cannot serve is one line before any weight is read: a student tokenizer without a chat
template (and no `student.chat_template`), a config.json whose sizes disagree with the weights' shapes;
and a pickle that weights-only loading refuses is one line, not a traceback.

    python -m pytest tests/test_engine.py tests/test_model_folders.py -q
"""

from __future__ import annotations

import os
import pickle
import random
import re
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
        use_template(tokenizer, cfg, role, "the lab's tokenizer")
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
                use_template(tokenizer, cfg, role, path)
                check_weights(folder, f"{role}.path={path}", cfg.trust_remote_code)
                model = load_sharded(path, load_dtype=load_dtype, trainable=trainable, compute_dtype=dtype,
                                     activation_checkpointing=activation_checkpointing, device=device,
                                     trust_remote_code=cfg.trust_remote_code)
                return _policy(model, tokenizer, device, dtype)
            tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
            use_template(tokenizer, cfg, role, path)
            if Path(path).expanduser().is_dir():
                check_weights(Path(path).expanduser(), f"{role}.path={path}", cfg.trust_remote_code)
            model = AutoModelForCausalLM.from_pretrained(path, dtype=load_dtype, trust_remote_code=cfg.trust_remote_code)
        except UserError:
            raise
        except (OSError, ValueError) as err:
            raise UserError(f"{role}.path: cannot load {path!r}: {str(err)[:300]}") from None
        except pickle.UnpicklingError as err:  # transformers reads a .bin with weights_only=True: nothing ran
            raise UserError(_pickle_refused(f"{role}.path={path}", Path(path).expanduser(), str(err))) from None
        except RuntimeError as err:  # a hub model (not checked beforehand) whose config disagrees with its weights
            if "mismatched" not in str(err):
                raise
            raise UserError(f"{role}.path={path}: config.json disagrees with the weights' shapes "
                            f"({str(err).splitlines()[0][:200]})") from None
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


def _token_id(tokenizer, token: str) -> int | None:
    found = tokenizer.convert_tokens_to_ids(token)
    return found if isinstance(found, int) and found != tokenizer.unk_token_id else None


def stop_token_ids(tokenizer) -> set[int]:
    """EOS and the chat template's end-of-turn token (a Base model's EOS differs from <|im_end|>)."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    if _token_id(tokenizer, "<|im_end|>") is not None:
        ids.add(_token_id(tokenizer, "<|im_end|>"))
    return ids


def use_template(tokenizer, cfg, role: str, where: str) -> None:
    """The chat template prompts are formatted with: `cfg.chat_template`, else the tokenizer's own. A student
    without one is refused (a teacher or base reads the student's formatted tokens and needs none); a
    template that cannot format a conversation is refused too, before anything is written."""
    from aopd_cli.data.prompts import CHAT_TEMPLATES, chat_ids, template_text

    key = f"{role}.chat_template"
    if cfg.chat_template:
        tokenizer.chat_template = template_text(cfg.chat_template)
        missing = [t for t in ("<|im_start|>", "<|im_end|>") if _token_id(tokenizer, t) is None]
        if cfg.chat_template in CHAT_TEMPLATES and missing:
            raise UserError(f"{key}={cfg.chat_template}: the tokenizer of {where} has no {' or '.join(missing)} "
                            f"token, which {cfg.chat_template}'s turns need; give a Jinja template written for its "
                            f"tokens ({key}=./template.jinja)")
    elif role != "student":
        return  # its own template (if any) formats nothing
    elif not tokenizer.chat_template:
        raise UserError(f"student.path={where}: its tokenizer has no chat template (no chat_template in "
                        "tokenizer_config.json, no chat_template.jinja), and every prompt is formatted with one: "
                        "name one with student.chat_template=chatml, or a Jinja file "
                        "(student.chat_template=./template.jinja)")
    try:
        chat_ids(tokenizer, [{"role": "user", "content": "1+1?"}], add_generation_prompt=True)
    except Exception as err:  # noqa: BLE001 - Jinja's errors, or a template that expects other fields
        what = f"{key}={cfg.chat_template}" if cfg.chat_template else f"{role}.path={where}"
        raise UserError(f"{what}: the chat template cannot format a conversation ({type(err).__name__}: "
                        f"{str(err)[:200]})") from None


def check_weights(folder: Path, what: str, trust_remote_code: bool = False) -> None:
    """config.json against the shapes in the safetensors headers (nothing is read but the headers, and the
    model is built on the meta device): a disagreement is one line naming the file and both sizes."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from aopd_cli.training.checkpoints import safetensors_header

    stored = {}
    for shard in sorted(folder.glob("*.safetensors")):
        stored |= {name: (entry["shape"], shard.name) for name, entry in safetensors_header(shard).items()
                   if name != "__metadata__"}
    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    if not stored or getattr(config, "quantization_config", None):  # packed weights have shapes of their own
        return
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    for name, tensor in model.state_dict().items():
        shape, file = stored.get(name, (list(tensor.shape), ""))
        if list(tensor.shape) == shape:
            continue
        differing = [size for size, held in zip(tensor.shape, shape) if size != held] if len(shape) == tensor.dim() \
            else []  # the config keys of that size (vocab_size, hidden_size, ...) are what to correct
        keys = [f"{key} {value}" for key, value in config.to_dict().items()
                if type(value) is int and differing and value == differing[0] and value not in shape]
        says = f"{', '.join(keys[:2])} in config.json" if keys else f"config.json makes it {list(tensor.shape)}"
        raise UserError(f"{what}: config.json disagrees with the weights: {says}, but {name} in {file} is "
                        f"{shape}; correct config.json, or save the model again with save_pretrained")


def _pickle_refused(what: str, folder: Path, error: str) -> str:
    found = re.search(r"GLOBAL ([\w.]+)", error)
    files = sorted(p.name for p in folder.glob("*.bin")) if folder.is_dir() else []
    return (f"{what}: {files[0] if files else 'its weights'} is a pickle that weights-only loading refuses (it "
            f"holds {found[1] if found else 'Python objects'}, not only tensors); aopd loads safetensors or "
            "weights-only pickles and runs no checkpoint's code: convert it to model.safetensors where you trust "
            "its source (docs/data.md, Model folders)")


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
