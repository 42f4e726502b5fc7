"""The GPU check of the distributed issue: a Qwen3-0.6B-shaped model from its config (random weights),
bf16 compute over fp32 master weights (FSDP2, one GPU), one AOPD update on 8 sequences of 2,048 tokens
with the chunked output layer and activation checkpointing. Prints the peak memory, tokens/s, model
FLOPs utilisation against the GPU's bf16 peak, the fraction of parameters one step at lr 1e-5 changes
(it must be > 0.99: bf16 weights stepped directly leave most unchanged), and `aopd plan`'s estimate of
the same update beside the measured peak. `--small` runs a tiny shape on the CPU (to check the script).

    python benchmarks/gpu_check.py            # on a GPU machine
    python benchmarks/gpu_check.py --small    # anywhere
"""

import argparse
import json
import time

import torch

from aopd_cli.config.schema import TrainConfig
from aopd_cli.plan.estimate import GIB, Shape, student_training
from aopd_cli.training import distributed as dist
from aopd_cli.training.models import Policy
from aopd_cli.training.objectives import TeacherTopK, aopd_loss
from aopd_cli.training.update import MicroBatch, make_optimizer, update

BF16_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense bf16, SXM

parser = argparse.ArgumentParser()
parser.add_argument("--small", action="store_true")
parser.add_argument("--sequences", type=int, default=8)
parser.add_argument("--length", type=int, default=2048)
args = parser.parse_args()

shape = Shape(2, 64, 2, 1, 32, 128, 1000, True) if args.small else Shape(28, 1024, 16, 8, 128, 3072, 151936, True)
sequences, length = (2, 64) if args.small else (args.sequences, args.length)
device = dist.init()

from transformers import Qwen3Config, Qwen3ForCausalLM  # noqa: E402

config = Qwen3Config(vocab_size=shape.vocab, hidden_size=shape.hidden, num_hidden_layers=shape.layers,
                     num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads, head_dim=shape.head_dim,
                     intermediate_size=shape.intermediate, tie_word_embeddings=shape.tied, max_position_embeddings=4096)
torch.manual_seed(0)
model = Qwen3ForCausalLM(config)
compute = torch.bfloat16 if device.type == "cuda" else torch.float32
model = dist.shard(model, trainable=True, compute_dtype=compute, activation_checkpointing=True).to(device)
policy = Policy(model, None, set(), device, compute)

gen = torch.Generator().manual_seed(1)
ids_BL = torch.randint(0, shape.vocab, (sequences, length), generator=gen)
prompt = 64 if not args.small else 8
mask_BT = torch.ones(sequences, length - prompt, dtype=torch.bool)
k = 32
teacher_logp = torch.log_softmax(torch.randn(sequences, length - prompt, k + 1, generator=gen), -1)
teacher = TeacherTopK(teacher_logp[..., 0], torch.randint(0, shape.vocab, (sequences, length - prompt, k), generator=gen),
                      teacher_logp[..., 1:])
micro = [MicroBatch(ids_BL[s:s + 1], torch.ones_like(ids_BL[s:s + 1]), prompt, mask_BT[s:s + 1],
                    TeacherTopK(teacher.token_logprobs[s:s + 1], teacher.topk_ids[s:s + 1], teacher.topk_logprobs[s:s + 1]))
         for s in range(sequences)]
optimizer, scheduler = make_optimizer(model, TrainConfig(steps=1, lr=1e-5))
before = {name: p.detach().clone() for name, p in model.named_parameters()}


def loss_fn(head, m, normalizer):
    return aopd_loss(head, m.targets_BT, m.mask_BT, m.teacher, normalizer=normalizer)


if device.type == "cuda":
    torch.cuda.reset_peak_memory_stats()
    torch.cuda.synchronize()
started = time.perf_counter()
result = update(policy, optimizer, scheduler, micro, loss_fn, sequences, grad_clip=1.0)
if device.type == "cuda":
    torch.cuda.synchronize()
elapsed = time.perf_counter() - started
changed = sum(int((p.detach() != before[name]).sum()) for name, p in model.named_parameters())
total = sum(p.numel() for p in model.parameters())
tokens = sequences * length
# forward 2 flops a parameter a token, backward 4, activation checkpointing recomputes the forward: 8
flops = 8 * shape.params * tokens
peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else float("nan")
name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
peak_tflops = next((v for key, v in BF16_PEAK_TFLOPS.items() if key in name), None)
estimate = sum(student_training(shape, 1, length, True).values())
report = {
    "device": name, "parameters": total, "tokens": tokens, "loss": result.loss, "stepped": result.stepped,
    "seconds": round(elapsed, 3), "tokens_per_s": round(tokens / elapsed, 1),
    "mfu": round(flops / elapsed / (peak_tflops * 1e12), 4) if peak_tflops else None,
    "changed_fraction": round(changed / total, 5),
    "peak_gib": round(peak / GIB, 2), "planner_gib (micro-batch of one sequence)": round(estimate / GIB, 2),
}
print(json.dumps(report, indent=1))
dist.shutdown()
