"""The arithmetic of a stage's memory per GPU, phase by phase, from the model shapes: what `aopd plan`
prints beside the traced peak (plan/trace.py) and uses alone with `--arithmetic`. Its terms follow what
the trace finds alive at each phase's peak:

- the student's update, at its peak (the start of backward): fp32 parameters and AdamW's two moments,
  sharded (12 bytes a parameter / G; gradients are freed after every step, so only the reduced layers'
  are there); the gathered bf16 root (embeddings, output layer) and two layers (the one running, the one
  prefetched); a layer's bf16 gradient and its fp32 reduce-scatter buffer, and the output layer's bf16
  gradient; activations (with `train.activation_checkpointing` each layer's input plus one recomputed
  layer, else every layer's saved tensors); the chunked output layer (`CHUNK` positions x vocabulary in
  fp32, a few buffers) and the hidden states and gradient it works on;
- a frozen model scoring (teacher, ExOPD base): bf16 weights, sharded, two layers gathered, one layer's
  forward activations, the output layer's chunks and the scores it returns;
- what stays between phases: the student's states while the teacher scores, the teacher's shards and
  scores while the student updates;
- outside torch's allocator, not traced: the CUDA context and NCCL (`CONTEXT_GIB`), and a colocated vLLM
  engine's share (`rollout.gpu_memory_utilization` of the GPU) when it is awake.

    aopd plan experiment=paper_8b_3k --gpus 8 --gpu-memory 80 --arithmetic
"""

from __future__ import annotations

from aopd_cli.plan.shapes import Batch, Shape

CHUNK = 1024  # positions of the output layer computed at once (training.lm_head, teacher.scorers)
CONTEXT_GIB = 2.0  # the CUDA context, cuBLAS workspaces and NCCL buffers of a training process


def _head_rows(batch: Batch) -> int:
    return min(CHUNK, batch.rows * batch.response)


def layer_saved_per_token(shape: Shape) -> int:
    """Bytes a decoder layer keeps for its backward per token, in bf16 compute (HF's Qwen3: the RMSNorms
    keep fp32 copies of their inputs; q, k, v, the attention output and its log-sum-exp; SwiGLU's gate,
    up and their product)."""
    attention = 2 * (shape.heads * shape.head_dim * 3 + shape.kv_heads * shape.head_dim * 2)
    mlp = 2 * 4 * shape.intermediate
    norms = 4 * 2 * shape.hidden + 2 * 4 * shape.hidden + 4 * (shape.heads + shape.kv_heads) * shape.head_dim
    return attention + mlp + norms


def update_parts(shape: Shape, world: int, batch: Batch, checkpointing: bool) -> dict[str, float]:
    """Bytes per GPU at the peak of a student's optimizer step: the largest of three moments, the output
    layer's forward over a chunk (everything saved, the chunk's fp32 logits, log-softmax and entropy terms),
    the backward through a decoder layer (the layer recomputed, its gradient on its way to the
    reduce-scatter, the output layer's gradient kept for the root's) and AdamW's step (every gradient, and
    the temporaries of its foreach kernels)."""
    tokens, counted = batch.tokens, batch.rows * batch.response
    saved = shape.layers * tokens * shape.hidden * 2 if checkpointing else \
        shape.layers * tokens * layer_saved_per_token(shape)
    common = {
        "student params + AdamW moments (fp32, sharded)": 12 * shape.params / world,
        "gathered bf16 root": 2 * shape.root_params,
        "activations" + (" (checkpointed layer inputs)" if checkpointing else " (every layer's)"): saved,
    }
    head = {**common,
            "output layer chunk (fp32 logits, log-softmax, entropy)": 16 * _head_rows(batch) * shape.vocab,
            "hidden states at the output layer": counted * shape.hidden * 2}
    layer = {**common,
             "2 gathered bf16 layers, a layer's gradient + fp32 reduce-scatter": (4 + 2 + 4) * shape.layer_params,
             "output layer's bf16 gradient, hidden-state gradients": 2 * shape.vocab * shape.hidden
             + counted * shape.hidden * 4 + tokens * shape.hidden * 4,
             "the recomputed layer's saved tensors" if checkpointing else "its saved tensors' gradients":
                 tokens * layer_saved_per_token(shape)}
    step = {"student params + AdamW moments (fp32, sharded)": 12 * shape.params / world,
            "gradients (fp32, sharded) and AdamW's foreach temporaries": (4 + 8) * shape.params / world}
    return max(head, layer, step, key=lambda parts: sum(parts.values()))


def update_residue(shape: Shape, world: int) -> float:
    """What a student keeps between steps: fp32 parameters and AdamW's moments, sharded."""
    return 12 * shape.params / world


def scoring_parts(shape: Shape, world: int, batch: Batch, top_k: int, label: str) -> dict[str, float]:
    """Bytes per GPU at the peak of a frozen model's scoring forward: the larger of a decoder layer's
    forward (two layers gathered) and the output layer's chunk (its fp32 logits and log-softmax)."""
    tokens, counted = batch.tokens, batch.rows * batch.response
    common = {f"{label} weights (bf16, sharded) + gathered root": 2 * shape.params / world + 2 * shape.root_params,
              f"{label} hidden states and scores": tokens * shape.hidden * 2 + counted * (top_k * 12 + 4)}
    layer = {**common, f"{label} 2 gathered layers and a layer's forward":
             4 * shape.layer_params + tokens * (2 * 3 * shape.hidden + 2 * 3 * shape.intermediate)}
    head = {**common, f"{label} output layer chunk (fp32 logits, log-softmax)": 8 * _head_rows(batch) * shape.vocab}
    return max(layer, head, key=lambda parts: sum(parts.values()))


def scoring_residue(shape: Shape, world: int, batch: Batch, top_k: int) -> float:
    """What a frozen model leaves between phases: its shards, and the scores of the micro-batch."""
    return 2 * shape.params / world + batch.rows * batch.response * (top_k * 12 + 4)


def engine_note(sampler: Shape, engine_bytes: float, tensor_parallel: int, length: int) -> tuple[float, str]:
    """(bytes, note) of a vLLM engine's share: its weights and KV cache, and how many sequences fit."""
    weights = 2 * sampler.params / tensor_parallel
    room = engine_bytes - weights
    if room <= 0:
        return float("inf"), (f"the vLLM engine's share ({engine_bytes / 2**30:.0f} GiB) cannot hold the sampler's "
                               f"weights ({weights / 2**30:.0f} GiB a GPU): raise rollout.gpu_memory_utilization or "
                               "rollout.tensor_parallel_size")
    kv_per_token = 2 * sampler.layers * sampler.kv_heads * sampler.head_dim * 2 / tensor_parallel
    return engine_bytes, f"its KV cache holds about {room / kv_per_token / length:.0f} sequences of {length} tokens"
