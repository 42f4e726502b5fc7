"""Scorers: for given prompt + response sequences, a frozen model's top-K ids and log-probs and the
log-prob of each sampled token on the response positions (`TeacherTopK`, defined with the objectives).
They score the teacher, and the frozen base of ExOPD (its token log-probs).

`hf_scorer` runs an HF model in-process. It runs the decoder once per micro-batch, then computes logits
`chunk_size` positions at a time, so at most `chunk_size x V` float32 logits are alive (at 8k-token
responses and V = 152k, a whole micro-batch of logits would take tens of GB). A scorer is just a function
of a micro-batch, so a teacher served elsewhere plugs in the same way.

    python -m pytest tests/test_engine.py -q -k teacher
"""

from __future__ import annotations

from typing import Callable

import torch

from aopd_cli.engine import MicroBatch, target_hidden
from aopd_cli.objectives import TeacherTopK

Scorer = Callable[[MicroBatch], TeacherTopK]


def hf_scorer(policy, top_k: int, chunk_size: int = 1024) -> Scorer:
    @torch.no_grad()
    def score(micro: MicroBatch) -> TeacherTopK:
        was_training = policy.model.training
        policy.model.eval()
        micro = micro.to(policy.device)
        hidden_BTH, weight_VH = target_hidden(policy.model, micro)
        policy.model.train(was_training)
        batch, width = hidden_BTH.shape[:2]
        hidden_NH = hidden_BTH.reshape(batch * width, -1)
        targets_N = micro.targets_BT.reshape(-1)
        k = min(top_k, weight_VH.shape[0])
        token_logp_N = torch.empty(batch * width, dtype=torch.float32, device=hidden_NH.device)
        topk_logp_NK = torch.empty(batch * width, k, dtype=torch.float32, device=hidden_NH.device)
        topk_ids_NK = torch.empty(batch * width, k, dtype=torch.long, device=hidden_NH.device)
        for start in range(0, hidden_NH.shape[0], chunk_size):
            stop = start + chunk_size
            logp_CV = torch.log_softmax((hidden_NH[start:stop] @ weight_VH.T).float(), dim=-1)
            token_logp_N[start:stop] = logp_CV.gather(-1, targets_N[start:stop, None]).squeeze(-1)
            topk_logp_NK[start:stop], topk_ids_NK[start:stop] = logp_CV.topk(k, dim=-1)
            del logp_CV
        return TeacherTopK(token_logp_N.view(batch, width).cpu(), topk_ids_NK.view(batch, width, k).cpu(),
                           topk_logp_NK.view(batch, width, k).cpu())

    return score
