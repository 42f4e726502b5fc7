"""Micro-batching: a step's rows cut into micro-batches, by count or by a token budget (rows of similar
length together), each trimmed to its own longest row, so one long sequence does not set the padding of
the whole batch.

    python -m pytest tests/test_engine.py -q -k "micro_batch or accumulation"
"""

from __future__ import annotations

import torch

from aopd_cli.training.update import MicroBatch


def micro_batches(ids_BL, attn_BL, first_target: int, mask_BT, size: int, token_budget: int | None = None
                  ) -> list[MicroBatch]:
    """Rows cut into micro-batches: `size` sequences each, or (with a token budget) rows of similar length
    packed while rows x longest length stays within the budget; each is trimmed to its own longest row,
    so one long sequence does not set the padding of the whole batch."""
    lengths = attn_BL.sum(-1).tolist()
    order = sorted(range(len(lengths)), key=lambda r: lengths[r]) if token_budget else list(range(len(lengths)))
    groups, current = [], []
    for row in order:
        longest = max([lengths[r] for r in current + [row]])
        if current and (len(current) >= size if not token_budget else (len(current) + 1) * longest > token_budget):
            groups.append(current)
            current = []
        current.append(row)
    if current:
        groups.append(current)
    return [_trimmed(ids_BL[rows], attn_BL[rows], first_target, mask_BT[rows], rows)
            for rows in map(torch.tensor, groups)]


def _trimmed(ids_BL, attn_BL, first_target: int, mask_BT, rows_B) -> MicroBatch:
    """Drop columns that are padding in every row: left of the prompts, right of the last counted target."""
    real_L = attn_BL.bool().any(0)
    left = int(real_L[:first_target].nonzero()[0]) if real_L[:first_target].any() else first_target - 1
    left = min(left, first_target - 1)  # the position that predicts the first target stays
    counted_T = mask_BT.any(0)
    right = first_target + (int(counted_T.nonzero()[-1]) + 1 if counted_T.any() else 1)
    return MicroBatch(ids_BL[:, left:right], attn_BL[:, left:right], first_target - left,
                      mask_BT[:, :right - first_target], rows_B=rows_B)
