"""The GPU check, for the day a GPU is lent: it runs as it is on a machine with torch (CUDA), transformers
and nothing else of aopd's dependencies (no pydantic, hydra, MLflow or vLLM: the settings below are plain
namespaces), and exits non-zero, naming each, when:

- a step's loss is not finite, or the step was skipped;
- the fp32 master weights did not change in a step at lr 1e-5 (bf16 weights stepped directly would stay
  put: most of an update is below half a bf16 ulp);
- the peak memory torch measured is more than 15% above what `aopd plan`'s fake-tensor trace says;
- the chunked output layer's log-probs of a bf16 model (V = 151,936, logits up to ~40) are more than 1e-3
  nats from a float64 reference, for the student's head and the HF teacher's scorer alike;
- an AOPD step in bf16 takes more than 1.5x the same step (same forward, backward and optimizer step)
  with a loss on the hidden states in place of the objective.

It prints tokens/s and model FLOPs utilisation (6 N FLOPs a token; activation checkpointing's recomputed
forward is not counted, 8 N would), and how often the host waits on the device in a step at one and at four
micro-batches (`torch.cuda.set_sync_debug_mode`): aopd reads back once a step, and selects the counted tokens
once a micro-batch; transformers reads each forward's padding mask once (SDPA's causal fast path).

The student is Qwen3-0.6B-shaped, built from its config (random weights), bf16 compute over fp32 masters
(FSDP2 on one GPU, as aopd runs it), micro-batches of 2,048-token sequences through aopd's own `update`, the
chunked output layer and activation checkpointing. A few minutes on one H100 (the trace is about a minute
of CPU). `--small`: a tiny shape on any device, the thresholds that need a GPU skipped.

    PYTHONPATH=. python benchmarks/gpu_check.py
    PYTHONPATH=. python benchmarks/gpu_check.py --small
"""

import argparse
import json
import math
import sys
import time
import warnings
from types import SimpleNamespace

import torch

from aopd_cli.plan.estimate import update_parts
from aopd_cli.plan.shapes import GIB, PROMPT_TOKENS, QWEN3, Batch, Shape
from aopd_cli.plan.trace import traced_phase
from aopd_cli.teacher.scorers import hf_scorer
from aopd_cli.training import distributed as dist
from aopd_cli.training.lm_head import LMHead, chunked_gather
from aopd_cli.training.models import Policy
from aopd_cli.training.objectives import ObjectiveOutput, TeacherTopK, objective_loss
from aopd_cli.training.update import MicroBatch, make_optimizer, target_hidden, update

BF16_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0}  # dense bf16, SXM
LIMITS = {"memory_over_trace": 1.15, "logprob_error_nats": 1e-3, "step_over_plain": 1.5}

parser = argparse.ArgumentParser()
parser.add_argument("--small", action="store_true", help="a tiny shape (checks the script anywhere)")
parser.add_argument("--rows", type=int, default=4, help="sequences per micro-batch")
parser.add_argument("--response", type=int, default=2048 - PROMPT_TOKENS, help="response tokens a sequence")
parser.add_argument("--steps", type=int, default=3, help="timed steps (after one warm-up step)")
args = parser.parse_args()

shape = Shape(2, 128, 2, 1, 64, 256, 1000, True) if args.small else Shape(*QWEN3["Qwen/Qwen3-0.6B"])
batch = Batch(2, 64) if args.small else Batch(args.rows, args.response)
# what aopd's pydantic config would hold (the keys `make_optimizer`, `update` and `objective_loss` read)
train = SimpleNamespace(steps=args.steps + 1, lr=1e-5, weight_decay=0.0, warmup_steps=0, schedule="constant",
                        grad_clip=1.0, activation_checkpointing=True)
objective = SimpleNamespace(name="aopd", tau=0.0, beta=1.0, intervention="threshold", zero_eps=1e-2, support="raw",
                            reduction="seq-mean-token-mean", top_k=32)
failures: list[str] = []


def check(ok: bool, what: str) -> None:
    print(("ok    " if ok else "FAILED ") + what, flush=True)
    if not ok:
        failures.append(what)


# the trace first: it runs on fake tensors over a fake process group of its own
started = time.perf_counter()
traced = traced_phase("update", shape, 1, batch.rows, batch.response, objective=objective, train=train, top_k=32)
trace_seconds = time.perf_counter() - started
estimated = sum(update_parts(shape, 1, batch, True).values())

device = dist.init()  # on a GPU: a process group of one, so FSDP2 shards as under torchrun
on_gpu = device.type == "cuda"
from transformers import Qwen3Config, Qwen3ForCausalLM  # noqa: E402

config = Qwen3Config(vocab_size=shape.vocab, hidden_size=shape.hidden, num_hidden_layers=shape.layers,
                     num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads, head_dim=shape.head_dim,
                     intermediate_size=shape.intermediate, tie_word_embeddings=shape.tied,
                     max_position_embeddings=40960)
torch.manual_seed(0)
compute = torch.bfloat16 if on_gpu else torch.float32
model = dist.shard(Qwen3ForCausalLM(config), trainable=True, compute_dtype=compute, activation_checkpointing=True)
model = model.to(device)
policy = Policy(model, None, set(), device, compute)
optimizer, scheduler = make_optimizer(model, train)
aopd_loss = objective_loss(objective)
gen = torch.Generator().manual_seed(1)


def micro_batch() -> MicroBatch:
    k, length = objective.top_k, batch.length
    ids_BL = torch.randint(0, shape.vocab, (batch.rows, length), generator=gen)
    teacher_logp = torch.log_softmax(torch.randn(batch.rows, batch.response, k + 1, generator=gen), -1)
    topk_ids = torch.randint(0, shape.vocab, (batch.rows, batch.response, k), generator=gen)
    return MicroBatch(ids_BL, torch.ones_like(ids_BL), PROMPT_TOKENS,
                      torch.ones(batch.rows, batch.response, dtype=torch.bool),
                      TeacherTopK(teacher_logp[..., 0], topk_ids, teacher_logp[..., 1:]),
                      correct_B=torch.zeros(batch.rows, dtype=torch.bool), rows_B=torch.arange(batch.rows))


def plain_loss(head: LMHead, micro, normalizer) -> ObjectiveOutput:
    """The same forward and backward through the decoder, no output layer and no objective."""
    return ObjectiveOutput(head.hidden.float().square().mean(), {})


def sync() -> None:
    if on_gpu:
        torch.cuda.synchronize()


def timed_steps(loss_fn, micro_batches, steps: int) -> tuple[float, list]:
    sync()
    started, results = time.perf_counter(), []
    for _ in range(steps):
        results.append(update(policy, optimizer, scheduler, micro_batches, loss_fn, batch.rows * len(micro_batches),
                              train.grad_clip))
    sync()
    return (time.perf_counter() - started) / steps, results


# 1. the AOPD step: finite, stepping the fp32 masters, within the trace's memory
micro = micro_batch()
update(policy, optimizer, scheduler, [micro], aopd_loss, batch.rows, train.grad_clip)  # warm-up: kernels, allocator
layers = {name: p for name, p in model.named_parameters() if ".layers." in name}  # every row gets a gradient
before = {name: p.detach().clone() for name, p in layers.items()}
if on_gpu:
    torch.cuda.reset_peak_memory_stats()
elapsed, results = timed_steps(aopd_loss, [micro], args.steps)
measured = torch.cuda.max_memory_allocated() if on_gpu else None
changed = sum(int((p.detach() != before[name]).sum()) for name, p in layers.items()) / sum(
    p.numel() for p in layers.values())
check(all(math.isfinite(r.loss) and r.stepped for r in results),
      f"every step's loss is finite and stepped: {[round(r.loss, 4) for r in results]}")
check(all(p.dtype == torch.float32 for p in model.parameters()) and changed > 0.9,
      f"the fp32 masters moved at lr 1e-5: {changed:.4f} of the decoder layers' weights changed")
if measured is not None:
    check(measured <= LIMITS["memory_over_trace"] * traced.peak["Total"],
          f"measured peak {measured / GIB:.2f} GiB within 15% of the traced {traced.peak['Total'] / GIB:.2f} GiB")

# 2. the same step with a plain loss: what the objective and the chunked head cost on top
update(policy, optimizer, scheduler, [micro], plain_loss, batch.rows, train.grad_clip)
plain, _ = timed_steps(plain_loss, [micro], args.steps)
if on_gpu:
    check(elapsed <= LIMITS["step_over_plain"] * plain,
          f"an AOPD step takes {elapsed / plain:.2f}x the same step with a plain loss "
          f"({elapsed:.3f} s / {plain:.3f} s)")

# 3. the output layer's log-probs of a bf16 model against float64, at Qwen3's vocabulary
rows, vocab = 256, 1000 if args.small else 151936
hidden_NH = torch.randn(rows, shape.hidden, generator=gen).to(device, torch.bfloat16)
weight_VH = (torch.randn(vocab, shape.hidden, generator=gen) * (9 / shape.hidden ** 0.5)).to(device, compute)
reference_NV = torch.log_softmax(hidden_NH.double() @ weight_VH.double().T, dim=-1)
ids_NJ = torch.cat([torch.randint(0, vocab, (rows, 1), generator=gen).to(device),
                    reference_NV.topk(32, dim=-1).indices], dim=-1)
student_NJ, _ = chunked_gather(LMHead(hidden_NH[None], weight_VH, chunk_size=64), hidden_NH, ids_NJ)
student_error = float((student_NJ.double() - reference_NV.gather(-1, ids_NJ)).abs().max())

# the HF teacher's scorer on a one-layer bf16 Qwen3 with that output layer
teacher_model = Qwen3ForCausalLM(Qwen3Config(
    vocab_size=vocab, hidden_size=shape.hidden, num_hidden_layers=1, num_attention_heads=shape.heads,
    num_key_value_heads=shape.kv_heads, head_dim=shape.head_dim, intermediate_size=shape.intermediate,
    tie_word_embeddings=False)).to(device, compute).eval()
with torch.no_grad():
    teacher_model.lm_head.weight.copy_(weight_VH)
teacher = Policy(teacher_model, None, set(), device, compute)
ids_BL = torch.randint(0, vocab, (2, 128), generator=gen)
scored = MicroBatch(ids_BL, torch.ones_like(ids_BL), 64, torch.ones(2, 64, dtype=torch.bool))
scores = hf_scorer(teacher, 32, chunk_size=32)(scored)
hidden_BTH, _ = target_hidden(teacher_model, scored.to(device))
teacher_reference_BTV = torch.log_softmax(hidden_BTH.double() @ weight_VH.double().T, dim=-1).cpu()
topk_error = (scores.topk_logprobs.double() - teacher_reference_BTV.gather(-1, scores.topk_ids)).abs().max()
token_BT = teacher_reference_BTV.gather(-1, scored.targets_BT[..., None])[..., 0]
teacher_error = float(max(topk_error, (scores.token_logprobs.double() - token_BT).abs().max()))
del teacher_model, teacher, teacher_reference_BTV
largest_logit = float((hidden_NH.float() @ weight_VH.float().T).abs().max())
check(max(student_error, teacher_error) <= LIMITS["logprob_error_nats"],
      f"bf16 log-probs from float64: student head {student_error:.2e}, teacher scorer {teacher_error:.2e} nats "
      f"(V = {vocab:,}, logits up to {largest_logit:.0f})")

# 4. how often the host waits on the device in a step
syncs = {}
if on_gpu:
    for count in (1, 4):
        micro_batches = [micro_batch() for _ in range(count)]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            update(policy, optimizer, scheduler, micro_batches, aopd_loss, batch.rows * count, train.grad_clip)
            torch.cuda.set_sync_debug_mode("default")
        syncs[f"{count} micro-batch(es)"] = sum("synchroniz" in str(w.message) for w in caught)

name = torch.cuda.get_device_name() if on_gpu else "cpu"
peak_tflops = next((v for key, v in BF16_PEAK_TFLOPS.items() if key in name), None)
tokens = batch.tokens
report = {
    "device": name, "torch": torch.__version__, "parameters": shape.params, "tokens_per_step": tokens,
    "seconds_per_step": round(elapsed, 3), "seconds_per_plain_step": round(plain, 3),
    "tokens_per_s": round(tokens / elapsed, 1),
    "mfu (6N FLOPs a token, recompute not counted)": round(6 * shape.params * tokens / elapsed
                                                          / (peak_tflops * 1e12), 4) if peak_tflops else None,
    "changed_fraction (decoder layers, lr 1e-5)": round(changed, 5),
    "peak_gib": {"measured (max_memory_allocated)": round(measured / GIB, 2) if measured is not None else None,
                 "traced (aopd plan, fake tensors)": round(traced.peak["Total"] / GIB, 2),
                 "estimated (aopd plan, arithmetic)": round(estimated / GIB, 2)},
    "logprob_error_nats": {"student head": student_error, "teacher scorer": teacher_error},
    "host_waits_per_step": syncs,
    "trace_seconds": round(trace_seconds, 1),
    "failures": failures,
}
print(json.dumps(report, indent=1))
dist.shutdown()
sys.exit(1 if failures else 0)
