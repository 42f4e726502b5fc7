"""Between a micro-batch and its teacher scores: the sequences to score (prompt + counted response, where
the response starts, how many positions), their scores from a vLLM engine, and the
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


def engine_scores(llm, sequences: list[tuple[list[int], int, int]], k: int) -> list:
    """Per sequence (ids, first scored position, count) its scores from a vLLM engine started with
    `max_logprobs` >= K: the actual token's log-prob [count], the top-K ids [count, K] and log-probs."""
    from vllm import SamplingParams

    from aopd_cli.rollout.prompt_logprobs import tensor_prompt_logprobs

    params = SamplingParams(max_tokens=1, temperature=1.0, prompt_logprobs=k)
    with tensor_prompt_logprobs():
        outputs = llm.generate([{"prompt_token_ids": ids} for ids, _, _ in sequences], params, use_tqdm=False)
    scores = []
    for output, (_, start, count) in zip(outputs, sequences):
        ids_PK, logprobs_PK = (torch.cat(part) for part in zip(*output.prompt_logprobs))
        rows = slice(start - 1, start - 1 + count)  # row t scores position t + 1: [actual, top-1 .. top-K]
        scores.append((logprobs_PK[rows, 0].float(), ids_PK[rows, 1:].long(), logprobs_PK[rows, 1:].float()))
    return scores


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
