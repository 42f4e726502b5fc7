"""What the planner reasons about: a model's shape (a local config.json, the Qwen3 shapes below for hub
ids, or the lab's architecture) and the micro-batch a stage trains on.

    python -m pytest tests/test_plan.py -q -k shapes
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

GIB = 2**30
PROMPT_TOKENS = 512  # the prompt length assumed before a response (DeepMath's are shorter; AIME's about this)
# hub id -> (layers, hidden, heads, kv heads, head dim, intermediate, vocabulary, tied embeddings)
QWEN3 = {
    "Qwen/Qwen3-0.6B": (28, 1024, 16, 8, 128, 3072, 151936, True),
    "Qwen/Qwen3-4B": (36, 2560, 32, 8, 128, 9728, 151936, True),
    "Qwen/Qwen3-8B": (36, 4096, 32, 8, 128, 12288, 151936, False),
    "Qwen/Qwen3-32B": (64, 5120, 64, 8, 128, 25600, 151936, False),
}


@dataclass(frozen=True)
class Shape:
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool

    @property
    def layer_params(self) -> int:
        attention = self.hidden * self.head_dim * (2 * self.heads + 2 * self.kv_heads)
        return attention + 3 * self.hidden * self.intermediate + 2 * self.hidden + 2 * self.head_dim

    @property
    def root_params(self) -> int:
        return self.vocab * self.hidden * (1 if self.tied else 2) + self.hidden

    @property
    def params(self) -> int:
        return self.layers * self.layer_params + self.root_params


@dataclass(frozen=True)
class Batch:
    """A micro-batch: `rows` sequences of `PROMPT_TOKENS` + `response` tokens, every response token counted."""

    rows: int
    response: int

    @property
    def length(self) -> int:
        return PROMPT_TOKENS + self.response

    @property
    def tokens(self) -> int:
        return self.rows * self.length


def shape_of(model_cfg, made: dict[str, Shape] | None = None) -> Shape | None:
    """The shape of a model config (a lab arch, a checkpoint an earlier stage makes, a local checkpoint, or
    a known hub id); None if unknown."""
    if made and model_cfg.path in made:
        return made[model_cfg.path]
    if model_cfg.arch is not None:
        arch = model_cfg.arch
        return Shape(arch.num_layers, arch.hidden_size, arch.num_heads, arch.num_kv_heads, arch.head_dim,
                     arch.intermediate_size, 128, True)
    config_file = Path(model_cfg.path).expanduser() / "config.json"
    if config_file.is_file():
        c = json.loads(config_file.read_text())
        return Shape(c["num_hidden_layers"], c["hidden_size"], c["num_attention_heads"],
                     c.get("num_key_value_heads", c["num_attention_heads"]),
                     c.get("head_dim", c["hidden_size"] // c["num_attention_heads"]), c["intermediate_size"],
                     c["vocab_size"], c.get("tie_word_embeddings", False))
    known = QWEN3.get(model_cfg.path.removesuffix("-Base"))
    return Shape(*known) if known else None


def micro_batch(config) -> Batch:
    """The micro-batch a training stage steps on: its rollouts' (or conversations') length, capped by
    `train.max_seq_len`, `train.micro_batch_size` of them or as many as `train.micro_batch_tokens` holds."""
    train, rollout = config.train, getattr(config, "rollout", None)
    length = PROMPT_TOKENS + rollout.max_new_tokens if config.stage != "warmup" and rollout is not None else 4096
    if train.max_seq_len:
        length = min(length, train.max_seq_len)
    rows = max(1, train.micro_batch_tokens // length) if train.micro_batch_tokens else train.micro_batch_size
    return Batch(rows, max(1, length - PROMPT_TOKENS))
