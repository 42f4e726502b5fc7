"""The GPU check of the scale issues (#11, #19), for the day a GPU is lent: a Qwen3-0.6B-shaped student
built from its config (random weights), bf16 compute over fp32 master weights (FSDP2 on one GPU, as
aopd runs it), AOPD updates on micro-batches of 2,048-token sequences through aopd's own `update`, the
chunked output layer and activation checkpointing. One warm-up step (CUDA kernels, allocator), then timed
steps. Prints, side by side:

- the peak memory measured by torch (`max_memory_allocated`, the timed steps), traced by `aopd plan`'s fake
  tensor trace (plan/trace.py) and estimated by its arithmetic (plan/estimate.py), for the same step;
- tokens/s and model FLOPs utilisation against the GPU's dense bf16 peak, counting 6 N FLOPs a token
  (forward 2 N, backward 4 N; activation checkpointing's recomputed forward is not counted, 8 N would);
- the fraction of the decoder layers' parameters the timed steps at lr 1e-5 change (> 0.99: bf16 weights
  stepped directly would leave most unchanged; embedding rows of unseen tokens get no gradient at all).

Needs torch with CUDA and aopd's Python dependencies (transformers, pydantic); no network, no vLLM.
Under 8 minutes on one H200 (the trace is about a minute of CPU). `--small`: a tiny shape, on any device.

    PYTHONPATH=. python benchmarks/gpu_check.py
    PYTHONPATH=. python benchmarks/gpu_check.py --small
"""

import argparse
import json
import time

import torch

from aopd_cli.config.schema import AopdObjective, TrainConfig
from aopd_cli.plan.estimate import update_parts
from aopd_cli.plan.shapes import GIB, PROMPT_TOKENS, QWEN3, Batch, Shape
from aopd_cli.plan.trace import traced_phase
from aopd_cli.training import distributed as dist
from aopd_cli.training.models import Policy
from aopd_cli.training.objectives import TeacherTopK, objective_loss
from aopd_cli.training.update import MicroBatch, make_optimizer, update

BF16_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0}  # dense bf16, SXM

parser = argparse.ArgumentParser()
parser.add_argument("--small", action="store_true", help="a tiny shape (checks the script anywhere)")
parser.add_argument("--rows", type=int, default=4, help="sequences per micro-batch")
parser.add_argument("--response", type=int, default=2048 - PROMPT_TOKENS, help="response tokens a sequence")
parser.add_argument("--steps", type=int, default=3, help="timed steps (after one warm-up step)")
args = parser.parse_args()

shape = Shape(2, 128, 2, 1, 64, 256, 1000, True) if args.small else Shape(*QWEN3["Qwen/Qwen3-0.6B"])
batch = Batch(2, 64) if args.small else Batch(args.rows, args.response)
train = TrainConfig(steps=args.steps + 1, lr=1e-5, activation_checkpointing=True)
objective = AopdObjective(name="aopd")

# the trace first: it runs on fake tensors over a fake process group of its own
started = time.perf_counter()
traced = traced_phase("update", shape, 1, batch.rows, batch.response, objective=objective, train=train, top_k=32)
trace_seconds = time.perf_counter() - started
estimated = sum(update_parts(shape, 1, batch, True).values())

device = dist.init()  # on a GPU: a process group of one, so FSDP2 shards as under torchrun
from transformers import Qwen3Config, Qwen3ForCausalLM  # noqa: E402

config = Qwen3Config(vocab_size=shape.vocab, hidden_size=shape.hidden, num_hidden_layers=shape.layers,
                     num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads, head_dim=shape.head_dim,
                     intermediate_size=shape.intermediate, tie_word_embeddings=shape.tied, max_position_embeddings=40960)
torch.manual_seed(0)
compute = torch.bfloat16 if device.type == "cuda" else torch.float32
model = dist.shard(Qwen3ForCausalLM(config), trainable=True, compute_dtype=compute, activation_checkpointing=True)
model = model.to(device)
policy = Policy(model, None, set(), device, compute)
optimizer, scheduler = make_optimizer(model, train)
loss_fn = objective_loss(objective)

gen = torch.Generator().manual_seed(1)
k, length = 32, batch.length
ids_BL = torch.randint(0, shape.vocab, (batch.rows, length), generator=gen)
teacher_logp = torch.log_softmax(torch.randn(batch.rows, batch.response, k + 1, generator=gen), -1)
micro = MicroBatch(ids_BL, torch.ones_like(ids_BL), PROMPT_TOKENS, torch.ones(batch.rows, batch.response, dtype=torch.bool),
                   TeacherTopK(teacher_logp[..., 0], torch.randint(0, shape.vocab, (batch.rows, batch.response, k),
                                                                   generator=gen), teacher_logp[..., 1:]),
                   correct_B=torch.zeros(batch.rows, dtype=torch.bool), rows_B=torch.arange(batch.rows))


def sync():
    if device.type == "cuda":
        torch.cuda.synchronize()


update(policy, optimizer, scheduler, [micro], loss_fn, batch.rows, train.grad_clip)  # warm-up: kernels, allocator
layers = {name: p for name, p in model.named_parameters() if ".layers." in name}  # every row gets a gradient
before = {name: p.detach().clone() for name, p in layers.items()}
if device.type == "cuda":
    torch.cuda.reset_peak_memory_stats()
sync()
started = time.perf_counter()
for _ in range(args.steps):
    result = update(policy, optimizer, scheduler, [micro], loss_fn, batch.rows, train.grad_clip)
sync()
elapsed = (time.perf_counter() - started) / args.steps
changed = sum(int((p.detach() != before[name]).sum()) for name, p in layers.items())
total = sum(p.numel() for p in model.parameters())
tokens = batch.tokens
name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
peak_tflops = next((v for key, v in BF16_PEAK_TFLOPS.items() if key in name), None)
measured = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
report = {
    "device": name, "torch": torch.__version__, "parameters": total, "tokens_per_step": tokens,
    "loss": result.loss, "stepped": result.stepped, "seconds_per_step": round(elapsed, 3),
    "tokens_per_s": round(tokens / elapsed, 1),
    "mfu (6N FLOPs a token, recompute not counted)": round(6 * shape.params * tokens / elapsed / (peak_tflops * 1e12), 4)
    if peak_tflops else None,
    "changed_fraction (decoder layers, lr 1e-5)": round(changed / sum(p.numel() for p in layers.values()), 5),
    "peak_gib": {"measured (max_memory_allocated)": round(measured / GIB, 2) if measured is not None else None,
                 "traced (aopd plan, fake tensors)": round(traced.peak["Total"] / GIB, 2),
                 "estimated (aopd plan, arithmetic)": round(estimated / GIB, 2)},
    "trace_seconds": round(trace_seconds, 1),
}
print(json.dumps(report, indent=1))
dist.shutdown()
