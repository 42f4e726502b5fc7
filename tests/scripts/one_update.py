"""One AOPD update of a tiny lab model on a fixed global batch, at whatever world size torchrun gives;
writes the updated weights and the step's loss and gradient norm (rank 0) to the path in argv[1].

    torchrun --nproc-per-node 2 tests/scripts/one_update.py /tmp/w2.pt
"""

import sys

import torch

from aopd_cli.config.schema import LabArch, ModelConfig, TrainConfig
from aopd_cli.training import distributed as dist
from aopd_cli.training.checkpoints import full_state_dict
from aopd_cli.training.models import load_policy
from aopd_cli.training.objectives import TeacherTopK, aopd_loss, global_normalizer
from aopd_cli.training.update import MicroBatch, make_optimizer, update

device = dist.init()
arch = LabArch(hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=32, intermediate_size=128)
policy = load_policy(ModelConfig(arch=arch), role="student", device=device, seed=0, trainable=True)
gen = torch.Generator().manual_seed(1)
rows, length, vocab, k = 12, 10, 102, 4
ids_BL = torch.randint(6, vocab, (rows, length), generator=gen)
attn_BL = torch.ones_like(ids_BL)
mask_BT = torch.rand(rows, length - 3, generator=gen) > 0.25
logits = torch.randn(rows, length - 3, vocab, generator=gen)
logp = torch.log_softmax(logits, -1)
topk = logp.topk(k, -1)
teacher = TeacherTopK(logp.gather(-1, ids_BL[:, 3:, None])[..., 0], topk.indices, topk.values)
mine = dist.shard_of(list(range(rows)))
micro = [MicroBatch(ids_BL[mine][s:s + 2], attn_BL[mine][s:s + 2], 3, mask_BT[mine][s:s + 2],
                    TeacherTopK(*(t[mine][s:s + 2] for t in (teacher.token_logprobs, teacher.topk_ids,
                                                             teacher.topk_logprobs))))
         for s in range(0, len(mine), 2)]
before = {name: tensor.clone() for name, tensor in full_state_dict(policy.model).items()}
optimizer, scheduler = make_optimizer(policy.model, TrainConfig(steps=1, lr=1e-3))
normalizer = global_normalizer(mask_BT, "seq-mean-token-mean")  # of the whole global batch
result = update(policy, optimizer, scheduler, micro,
                lambda head, m, norm: aopd_loss(head, m.targets_BT, m.mask_BT, m.teacher, normalizer=norm),
                normalizer, grad_clip=1.0)
weights = full_state_dict(policy.model)
if dist.is_main():
    torch.save({"weights": weights, "before": before, "loss": result.loss, "grad_norm": result.grad_norm,
                "metrics": result.metrics}, sys.argv[1])
dist.barrier()  # rank 0 saves while rank 1 would tear the group down: once, gloo aborted rank 1 so under load
dist.shutdown()
