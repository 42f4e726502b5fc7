"""The rollout interface: `Rollout(generate, sync_weights, close)` and the `RolloutBatch` it returns.

`generate(prompts_ids, n, temperature, max_new_tokens, seed, indices)` returns a `RolloutBatch`; `sync_weights()`
must be called after every optimizer step (an engine holding its own copy of the weights, like vLLM,
otherwise samples from stale weights); `close()` frees an engine at the stage's end. An engine reports
the log-prob of each token it sampled (`RolloutBatch.logprobs_BR`), so the trainer can show how far its
own values are from the engine's. `rollout/engines.py` makes one by name.

Randomness is per prompt: the samples of a prompt depend on `stream_seed(seed, its index)` alone (`indices`:
its place in the whole step or benchmark, so a rank's share samples what one process would), never on
which prompts share its batch, its rank or the world size.

    python -m pytest tests/test_engine.py -q -k rollout
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Callable

import torch


@dataclass
class RolloutBatch:
    prompt_ids_BP: torch.Tensor  # left-padded
    prompt_mask_BP: torch.Tensor
    response_ids_BR: torch.Tensor  # right-padded
    response_mask_BR: torch.Tensor  # true up to and including the first stop token
    prompt_index_B: list[int]  # which prompt each row samples
    logprobs_BR: torch.Tensor | None = None  # the engine's log-prob of each sampled token (None: not reported)


@dataclass
class Rollout:
    generate: Callable[..., RolloutBatch]
    sync_weights: Callable[[], None]
    close: Callable[[], None] = lambda: None


def stream_seed(seed: int | None, *keys: int) -> int | None:
    """A seed of its own for one prompt (or one sample of it): reproducible, and unrelated between
    neighbouring prompts, samples and steps."""
    if seed is None:
        return None
    text = "/".join(map(str, (seed, *keys)))
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=7).digest(), "little")


def left_pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, width - len(seq):] = torch.tensor(seq, dtype=torch.long)
        mask[row, width - len(seq):] = 1
    return ids, mask


def right_pad(sequences: list[list[int]], pad_id: int, width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    width = width or max(1, max(len(s) for s in sequences))
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.bool)
    for row, seq in enumerate(sequences):
        seq = seq[:width]
        ids[row, :len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[row, :len(seq)] = True
    return ids, mask


def mask_through_first_stop(response_ids_BR: torch.Tensor, stop_ids: set[int], valid_BR=None) -> torch.Tensor:
    """True up to and including the first stop token of each row (and only on generated tokens)."""
    is_stop_BR = torch.isin(response_ids_BR, torch.tensor(sorted(stop_ids), device=response_ids_BR.device))
    before_or_at_BR = (is_stop_BR.long().cumsum(-1) - is_stop_BR.long()) == 0
    return before_or_at_BR if valid_BR is None else before_or_at_BR & valid_BR
