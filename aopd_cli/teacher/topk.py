"""Between a micro-batch and its teacher scores: the sequences to score (prompt + counted response, where
the response starts, how many positions), the scores of vLLM's flat prompt log-probs, and the
`TeacherTopK` tensors assembled from each row's scores. Every scorer but HF's goes through these.

    python -m pytest tests/test_vllm.py -q -k teacher
"""

from __future__ import annotations

import torch

from aopd_cli.errors import UserError
from aopd_cli.training.objectives import TeacherTopK
from aopd_cli.training.update import MicroBatch


def sequences_of(micro: MicroBatch) -> list[tuple[list[int], int, int]]:
    """Per row: the real tokens (prompt + counted response), where the response starts, its length."""
    rows = []
    for ids_L, attn_L in zip(micro.ids_BL.tolist(), micro.attn_BL.tolist()):
        prompt = [t for t, a in zip(ids_L[:micro.first_target], attn_L[:micro.first_target]) if a]
        count = sum(attn_L[micro.first_target:])  # the counted response is a prefix of the response columns
        rows.append((prompt + ids_L[micro.first_target:micro.first_target + count], len(prompt), count))
    return rows


def scores_from_flat(entries, start: int, count: int, k: int):
    """vLLM's flat prompt log-probs: position t >= 1 holds [the actual token, top-1 .. top-K]."""
    logprobs = torch.tensor(entries.logprobs, dtype=torch.float32).view(-1, k + 1)[start - 1:start - 1 + count]
    ids = torch.tensor(entries.token_ids, dtype=torch.long).view(-1, k + 1)[start - 1:start - 1 + count]
    return logprobs[:, 0], ids[:, 1:], logprobs[:, 1:]


def assemble(results, micro: MicroBatch, k: int, vocabulary: int) -> TeacherTopK:
    """[B, T] / [B, T, K] tensors from each row's response scores (positions past a row's end stay 0)."""
    batch, width = micro.ids_BL.shape[0], micro.ids_BL.shape[1] - micro.first_target
    token_BT = torch.zeros(batch, width)
    ids_BTK = torch.zeros(batch, width, k, dtype=torch.long)
    logprobs_BTK = torch.zeros(batch, width, k)
    for row, result in enumerate(results):
        if result is not None:
            token, ids, logprobs = result
            token_BT[row, :len(token)], ids_BTK[row, :len(token)], logprobs_BTK[row, :len(token)] = token, ids, logprobs
    if ids_BTK.numel() and int(ids_BTK.max()) >= vocabulary:
        raise UserError(f"the teacher ranks token id {int(ids_BTK.max())}, past the student's vocabulary of "
                        f"{vocabulary}: teacher and student must share the vocabulary")
    return TeacherTopK(token_BT, ids_BTK, logprobs_BTK)
