"""`aopd plan`: the estimated peak memory per GPU of each stage of an experiment, whether it fits, and
what to change when it does not. Peers leave their users to meet OOMs blind; this is arithmetic on the
model shapes (a local config.json, the Qwen3 shapes below for hub ids, or the lab's architecture):

- the student under FSDP2 over G GPUs: fp32 parameters, gradients and two AdamW moments, sharded
  (16 bytes a parameter / G); the working bf16 copies of the gathered root (embeddings, output layer)
  and of two decoder layers (the one running and the one prefetched);
- activations of one micro-batch (`micro_batch_size` sequences of the longest length, or the
  `micro_batch_tokens` budget): every saved tensor of a decoder layer, for all layers, or with
  `train.activation_checkpointing` only each layer's input plus one layer's worth; plus the chunked
  output layer (1,024 positions x vocabulary in fp32, three buffers);
- a frozen teacher (and ExOPD base) sharded in bf16 (2 bytes a parameter / G) with its root gathered,
  or nothing when it is served (`teacher.engine=server`);
- a colocated vLLM rollout engine: `rollout.gpu_memory_utilization` of the GPU (its whole weights and
  KV cache), asleep during the update, so the peak is the larger of the two phases.

    aopd plan experiment=paper_8b_3k --gpus 8 --gpu-memory 80
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

GIB = 2**30
# hub id -> (layers, hidden, heads, kv heads, head dim, intermediate, vocabulary, tied embeddings)
QWEN3 = {
    "Qwen/Qwen3-0.6B": (28, 1024, 16, 8, 128, 3072, 151936, True),
    "Qwen/Qwen3-4B": (36, 2560, 32, 8, 128, 9728, 151936, True),
    "Qwen/Qwen3-8B": (36, 4096, 32, 8, 128, 12288, 151936, False),
    "Qwen/Qwen3-32B": (64, 5120, 64, 8, 128, 25600, 151936, False),
}
LM_HEAD_CHUNK = 1024


@dataclass(frozen=True)
class Shape:
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool

    @property
    def layer_params(self) -> int:
        attention = self.hidden * self.head_dim * (2 * self.heads + 2 * self.kv_heads)
        return attention + 3 * self.hidden * self.intermediate + 2 * self.hidden + 2 * self.head_dim

    @property
    def root_params(self) -> int:
        return self.vocab * self.hidden * (1 if self.tied else 2) + self.hidden

    @property
    def params(self) -> int:
        return self.layers * self.layer_params + self.root_params

    @property
    def saved_per_token_layer(self) -> int:
        """Elements a decoder layer keeps for backward per token (norms, q/k/v, attention, SwiGLU)."""
        return 6 * self.hidden + 4 * self.heads * self.head_dim + 4 * self.kv_heads * self.head_dim + \
            4 * self.intermediate


def shape_of(model_cfg, made: dict[str, Shape] | None = None) -> Shape | None:
    """The shape of a model config (a lab arch, a checkpoint an earlier stage makes, a local checkpoint, or
    a known hub id); None if unknown."""
    if made and model_cfg.path in made:
        return made[model_cfg.path]
    if model_cfg.arch is not None:
        arch = model_cfg.arch
        return Shape(arch.num_layers, arch.hidden_size, arch.num_heads, arch.num_kv_heads, arch.head_dim,
                     arch.intermediate_size, 128, True)
    config_file = Path(model_cfg.path).expanduser() / "config.json"
    if config_file.is_file():
        c = json.loads(config_file.read_text())
        return Shape(c["num_hidden_layers"], c["hidden_size"], c["num_attention_heads"],
                     c.get("num_key_value_heads", c["num_attention_heads"]),
                     c.get("head_dim", c["hidden_size"] // c["num_attention_heads"]), c["intermediate_size"],
                     c["vocab_size"], c.get("tie_word_embeddings", False))
    known = QWEN3.get(model_cfg.path.removesuffix("-Base"))
    return Shape(*known) if known else None


@dataclass
class StagePlan:
    name: str
    parts: dict[str, float]  # bytes per GPU, by component
    peak: float
    notes: list[str]


def student_training(shape: Shape, gpus: int, tokens: int, checkpointing: bool) -> dict[str, float]:
    """Bytes per GPU for training a student on micro-batches of `tokens` tokens (padded)."""
    saved = shape.saved_per_token_layer * tokens * 2  # bf16 activations of one layer
    activations = (shape.layers * shape.hidden * tokens * 2 + saved) if checkpointing else shape.layers * saved
    return {
        "student states (fp32 params, grads, AdamW; sharded)": 16 * shape.params / gpus,
        "student working copies (gathered root + 2 layers, bf16)": 2 * (shape.root_params + 2 * shape.layer_params),
        "activations" + (" (checkpointed)" if checkpointing else ""): activations,
        "chunked output layer (fp32 chunks)": 3 * LM_HEAD_CHUNK * shape.vocab * 4 + 2 * tokens * shape.hidden * 4,
    }


def frozen(shape: Shape, gpus: int, label: str, tokens: int) -> dict[str, float]:
    return {f"{label} (bf16, sharded, root gathered)": 2 * shape.params / gpus + 2 * shape.root_params
            + 2 * 2 * shape.layer_params + LM_HEAD_CHUNK * shape.vocab * 4 * 2 + tokens * shape.hidden * 2}


def plan_stage(name: str, config, gpus: int, gpu_bytes: float, made: dict[str, Shape]) -> StagePlan:
    notes: list[str] = []
    student = shape_of(config.student, made)
    if student is None:
        return StagePlan(name, {}, 0.0, [f"unknown model shape for student.path={config.student.path}"])
    train = getattr(config, "train", None)
    rollout = getattr(config, "rollout", None)
    if config.stage == "eval":
        length = config.eval.max_new_tokens + 512
        parts = frozen(student, gpus, "model", min(length, 4096))
        if config.rollout.engine == "vllm":
            parts["vLLM engine (weights + KV cache)"] = config.rollout.gpu_memory_utilization * gpu_bytes
        return StagePlan(name, parts, sum(parts.values()), advice(config, parts) if sum(parts.values()) > gpu_bytes
                         else [])
    else:
        length = train.max_seq_len or ((rollout.max_new_tokens + 512) if rollout is not None else 4096)
        tokens = train.micro_batch_tokens or train.micro_batch_size * length
        parts = student_training(student, gpus, tokens, train.activation_checkpointing)
        spec = _spec(config)
        teacher = shape_of(config.teacher, made) if getattr(config, "teacher", None) is not None else None
        served = getattr(getattr(config, "teacher", None), "engine", "hf") == "server"
        if teacher is not None and not served and (spec is None or spec.teacher_scores or spec.samples_from == "teacher"):
            parts |= frozen(teacher, gpus, "teacher", tokens)
        if spec is not None and spec.frozen_base:
            base = shape_of(config.base, made) if config.base is not None else student
            parts |= frozen(base, gpus, "frozen base", tokens)
        update_peak, rollout_peak = sum(parts.values()), 0.0
        # what stays allocated while the engine samples: the sharded states and the frozen models
        resident = sum(size for part, size in parts.items() if part.startswith(("student states", "teacher", "frozen")))
        if rollout is not None and rollout.engine == "vllm":
            engine = rollout.gpu_memory_utilization * gpu_bytes
            parts["vLLM engine (weights + KV cache, asleep in updates)"] = engine
            rollout_peak = engine + resident
            sampler = teacher if spec is not None and spec.samples_from == "teacher" and teacher else student
            kv_per_token = 2 * sampler.layers * sampler.kv_heads * sampler.head_dim * 2
            room = engine - 2 * sampler.params / rollout.tensor_parallel_size
            if room <= 0:
                rollout_peak = float("inf")
                notes.append(f"the vLLM engine's share ({engine / GIB:.0f} GiB) cannot hold the sampler's weights "
                             f"({2 * sampler.params / rollout.tensor_parallel_size / GIB:.0f} GiB a GPU): raise "
                             "rollout.gpu_memory_utilization or rollout.tensor_parallel_size")
            else:
                notes.append(f"the vLLM KV cache holds about {room / kv_per_token / length:.0f} sequences of {length} "
                             "tokens at once")
    peak = max(update_peak, rollout_peak)
    if update_peak < rollout_peak < float("inf"):
        notes.append(f"the peak is while the vLLM engine samples (updates: {update_peak / GIB:.1f} GiB)")
    if peak > gpu_bytes:
        notes += advice(config, parts)
    return StagePlan(name, parts, peak, notes)


def _spec(config):
    from aopd_cli.training.objectives import OBJECTIVES

    objective = getattr(config, "objective", None)
    return OBJECTIVES[objective.name] if objective is not None else None


def advice(config, parts: dict[str, float]) -> list[str]:
    found = []
    train = getattr(config, "train", None)
    if train is not None and not train.activation_checkpointing:
        found.append("train.activation_checkpointing=true")
    if train is not None:
        found.append("a smaller train.micro_batch_size (or train.micro_batch_tokens)")
    if any(k.startswith("teacher") for k in parts):
        found.append("teacher.engine=server on GPUs of its own")
    found.append("more GPUs (--nproc-per-node, more nodes)")
    return ["does not fit: try " + ", ".join(found)]


def plan_experiment(plan, gpus: int, gpu_memory_gib: float) -> list[StagePlan]:
    made: dict[str, Shape] = {}  # checkpoint path an earlier stage writes -> its shape
    stages = []
    for name, config in plan.configs.items():
        stages.append(plan_stage(name, config, gpus, gpu_memory_gib * GIB, made))
        shape = shape_of(config.student, made)
        if shape is not None:
            made[str(Path(config.output_dir) / "checkpoint")] = shape
    return stages


def render(stages: list[StagePlan], gpus: int, gpu_memory_gib: float) -> str:
    lines = [f"Estimated peak memory per GPU on {gpus} x {gpu_memory_gib:g} GiB (FSDP2 over {gpus} GPUs)", ""]
    for stage in stages:
        fits = "fits" if stage.peak <= gpu_memory_gib * GIB else "DOES NOT FIT"
        shown = f"{stage.peak / GIB:.1f} GiB" if stage.peak < float("inf") else "more than a GPU"
        lines.append(f"{stage.name}: {shown} — {fits}")
        for part, size in stage.parts.items():
            lines.append(f"    {size / GIB:8.2f} GiB  {part}")
        lines += [f"    note: {note}" for note in stage.notes]
    return "\n".join(lines) + "\n"
