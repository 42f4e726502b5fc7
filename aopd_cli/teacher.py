"""Teacher scorers: for given prompt + response sequences, the teacher's top-K ids and log-probs and the
log-prob of each sampled token on the response positions (`TeacherTopK`).

The trainer never needs the teacher's weights itself: `hf_scorer` runs an HF model in-process (one
micro-batch of full-vocabulary logits alive at a time), `vllm_scorer` asks a vLLM engine for
`prompt_logprobs` (it can run on other GPUs).

    python -m pytest tests/test_engine.py -q -k teacher
"""

from __future__ import annotations

from typing import Callable

import torch

from aopd_cli.engine import MicroBatch, target_logits
from aopd_cli.objectives import TeacherTopK

Scorer = Callable[[MicroBatch], TeacherTopK]


def hf_scorer(policy, top_k: int) -> Scorer:
    def score(micro: MicroBatch) -> TeacherTopK:
        was_training = policy.model.training
        policy.model.eval()
        logits_BTV = target_logits(policy.model, _on(micro, policy.device))
        policy.model.train(was_training)
        logp_BTV = torch.log_softmax(logits_BTV, dim=-1)
        del logits_BTV
        targets_BT = micro.targets_BT.to(policy.device)
        token_logp_BT = logp_BTV.gather(-1, targets_BT.unsqueeze(-1)).squeeze(-1)
        topk_logp_BTK, topk_ids_BTK = logp_BTV.topk(min(top_k, logp_BTV.shape[-1]), dim=-1)
        return TeacherTopK(token_logp_BT.cpu(), topk_ids_BTK.cpu(), topk_logp_BTK.cpu())

    return score


def _on(micro: MicroBatch, device) -> MicroBatch:
    return MicroBatch(micro.ids_BL.to(device), micro.attn_BL.to(device), micro.first_target, micro.mask_BT)
