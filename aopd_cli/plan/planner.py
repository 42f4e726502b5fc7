"""`aopd plan`: the peak memory per GPU of each stage of an experiment, by phase, traced on aopd's code
(plan/trace.py) and estimated by arithmetic (plan/estimate.py), whether it fits, and what to change.

A training stage's step has phases that never overlap, each beside what the others leave alive: the
teacher (and ExOPD's base) scoring, the student's update, and with `rollout=vllm` the engine sampling
(asleep during the update, woken after `torch.cuda.empty_cache()`, so torch then holds only its live
tensors). SeqKD samples from a teacher engine and evaluates on a student engine, one at a time: each
evaluation closes the teacher's engine and starts the student's, and the next step the other way round. Engines and the CUDA context sit outside torch's allocator: arithmetic only.

    aopd plan experiment=paper_8b_1k --gpus 8 --gpu-memory 80
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from aopd_cli.plan.estimate import (
    CONTEXT_GIB,
    engine_note,
    scoring_parts,
    scoring_residue,
    update_parts,
    update_residue,
)
from aopd_cli.plan.shapes import GIB, Shape, micro_batch, shape_of

CONTEXT = CONTEXT_GIB * GIB


@dataclass
class StagePlan:
    name: str
    stage: str
    estimated: dict[str, float]  # phase -> bytes per GPU, by arithmetic
    traced: dict[str, float] = field(default_factory=dict)  # training phase -> bytes per GPU, traced
    parts: dict[str, float] = field(default_factory=dict)  # the arithmetic's terms of its largest phase
    notes: list[str] = field(default_factory=list)

    @property
    def peak(self) -> float:
        """The traced peak where a phase was traced, else the arithmetic's."""
        return max({**self.estimated, **self.traced}.values(), default=0.0)

    def training(self, traced: bool) -> float | None:
        values = [v for k, v in (self.traced if traced else self.estimated).items()
                  if not k.startswith(("vLLM", "HF evaluation"))]
        return max(values) if values else None

    @property
    def engines(self) -> float | None:
        values = [v for k, v in self.estimated.items() if k.startswith(("vLLM", "HF evaluation"))]
        return max(values) if values else None


def _spec(config):
    from aopd_cli.training.objectives import OBJECTIVES

    objective = getattr(config, "objective", None)
    return OBJECTIVES[objective.name] if objective is not None else None


def _frozen(config, made) -> dict[str, tuple[Shape, bool]]:
    """The frozen models a training stage holds: name -> (shape, scores in the step?)."""
    spec, found = _spec(config), {}
    if spec is None:
        return found
    teacher_cfg = config.teacher
    teacher = shape_of(teacher_cfg, made)
    if teacher is not None and (spec.samples_from == "teacher" or (spec.teacher_scores and teacher_cfg.engine == "hf")):
        found["teacher"] = (teacher, spec.teacher_scores and teacher_cfg.engine == "hf")
    if spec.frozen_base:
        found["base"] = (shape_of(config.base, made) if config.base is not None else shape_of(config.student, made),
                         True)
    return found


def plan_training(name: str, config, gpus: int, gpu_bytes: float, made: dict, trace: bool, cache: dict) -> StagePlan:
    student = shape_of(config.student, made)
    if student is None:
        return StagePlan(name, config.stage, {}, notes=[f"unknown model shape for student.path={config.student.path}"])
    batch, train, spec = micro_batch(config), config.train, _spec(config)
    top_k = getattr(getattr(config, "objective", None), "top_k", 32)
    frozen = _frozen(config, made)
    residue = {n: scoring_residue(s, gpus, batch, top_k) for n, (s, _) in frozen.items()}
    always = CONTEXT
    if spec is not None and spec.teacher_scores and config.teacher.engine == "vllm":
        always += config.teacher.gpu_memory_utilization * gpu_bytes  # an in-process teacher engine, awake
    elif spec is not None and spec.teacher_scores and config.teacher.engine == "server" and not config.teacher.url:
        always += config.teacher.gpu_memory_utilization * gpu_bytes  # the server aopd starts sits on GPU 0 (and on)
    parts = update_parts(student, gpus, batch, train.activation_checkpointing)
    plan = StagePlan(name, config.stage, {"update": sum(parts.values()) + sum(residue.values()) + always}, parts=parts)
    for model, (shape, scores) in frozen.items():
        if scores:
            others = sum(v for n, v in residue.items() if n != model)
            plan.estimated[f"{model} scoring"] = (sum(scoring_parts(shape, gpus, batch, top_k, model).values())
                                                  + update_residue(student, gpus) + others + always)
    if trace:
        from aopd_cli.plan.trace import traced_phase

        update = traced_phase("update", student, gpus, batch.rows, batch.response, objective=getattr(
            config, "objective", None), train=train, top_k=top_k, cache=cache)
        scored = {model: traced_phase("scoring", shape, gpus, batch.rows, batch.response, top_k=top_k, cache=cache)
                  for model, (shape, scores) in frozen.items() if scores}
        kept = {model: scored[model].residue if model in scored else residue[model] for model in frozen}
        plan.traced["update"] = update.peak.get("Total", 0.0) + sum(kept.values()) + always
        for model, phase in scored.items():
            others = sum(v for n, v in kept.items() if n != model)
            plan.traced[f"{model} scoring"] = phase.peak.get("Total", 0.0) + update.residue + others + always
    if spec is not None and spec.teacher_scores and config.teacher.engine == "server" and not config.teacher.url:
        plan.notes.append(f"teacher.engine=server with no teacher.url: aopd starts the teacher on GPU 0 (to "
                          f"{config.teacher.tensor_parallel_size - 1}) with {config.teacher.gpu_memory_utilization:g} "
                          "of it, counted in every phase (the GPUs it shares); a teacher.url on GPUs of its own frees it")
    _engines(plan, config, student, frozen, gpus, gpu_bytes, residue, always, made)
    plan.notes.append(f"a step checkpoint (fp32 params and AdamW moments) is {12 * student.params / 1e9:.0f} GB on "
                      f"disk; the final checkpoint, in the student.dtype ({config.student.dtype}: bf16 on GPUs at auto), about "
                      f"{2 * student.params / 1e9:.0f} GB")
    return plan


def _engines(plan: StagePlan, config, student: Shape, frozen: dict, gpus: int, gpu_bytes: float, residue: dict,
             always: float, made: dict) -> None:
    """The vLLM phases of a training stage: its rollout engine sampling, SeqKD's student engine evaluating,
    a warm-up's closing evaluation."""
    rollout, spec = getattr(config, "rollout", None), _spec(config)
    trainer = update_residue(student, gpus) + sum(residue.values()) + always  # torch's live tensors at wake-up
    if rollout is None or rollout.engine != "vllm":
        if config.eval.benchmarks or config.eval.tool_benchmarks:  # HF generate on the gathered student
            generate, note = hf_generate(student, config.eval)
            plan.estimated["HF evaluation"] = generate + trainer
            plan.notes.append(note)
        return
    share = rollout.gpu_memory_utilization * gpu_bytes
    length = micro_batch(config).length
    if config.stage == "warmup":
        engine, note = engine_note(student, share, rollout.tensor_parallel_size, config.eval.max_new_tokens + 512)
        plan.estimated["vLLM closing evaluation"] = engine + 4 * student.params / gpus + always
        plan.notes.append(f"closing evaluation on a vLLM engine started after training: {note}")
        return
    sampler = frozen["teacher"][0] if spec.samples_from == "teacher" and "teacher" in frozen else student
    engine, note = engine_note(sampler, share, rollout.tensor_parallel_size, length)
    awake = 0.0 if rollout.sleep else engine  # an engine that never sleeps is there in every phase
    for phase in list(plan.estimated):
        plan.estimated[phase] += awake
    for phase in list(plan.traced):
        plan.traced[phase] += awake
    plan.estimated["vLLM sampling"] = engine + trainer
    plan.notes.append(f"vLLM sampling: {note}; torch's cache is emptied before the engine wakes")
    if sampler is not student:  # SeqKD: the student's evaluations on an engine of their own, never beside the teacher's
        evaluation, _ = engine_note(student, share, 1, config.eval.max_new_tokens + 512)
        plan.estimated["vLLM evaluation"] = evaluation + trainer
        plan.notes.append("SeqKD: one vLLM engine at a time: each evaluation closes the teacher's engine and starts "
                          "the student's, the next step starts the teacher's again (two engine starts an evaluation)")


def plan_eval(name: str, config, gpus: int, gpu_bytes: float, made: dict) -> StagePlan:
    shape = shape_of(config.student, made)
    if shape is None:
        return StagePlan(name, "eval", {}, notes=[f"unknown model shape for student.path={config.student.path}"])
    length = config.eval.max_new_tokens + 512
    weights = 2 * shape.params / gpus
    if config.rollout.engine == "vllm":
        engine, note = engine_note(shape, config.rollout.gpu_memory_utilization * gpu_bytes,
                                   config.rollout.tensor_parallel_size, length)
        return StagePlan(name, "eval", {"vLLM evaluation": engine + weights + CONTEXT}, notes=[note])
    generate, note = hf_generate(shape, config.eval)
    return StagePlan(name, "eval", {"HF evaluation": generate + CONTEXT}, notes=[note])


def hf_generate(shape: Shape, evaluation) -> tuple[float, str]:
    """(bytes, note) of HF generate on a gathered bf16 model: its weights and the KV cache of a batch."""
    length = evaluation.max_new_tokens + 512
    kv = 2 * shape.layers * shape.kv_heads * shape.head_dim * 2 * length * evaluation.batch_size
    return 2 * shape.params + kv, (f"HF generate holds the whole model and a KV cache of {evaluation.batch_size} "
                                   f"sequences of {length} tokens ({kv / GIB:.1f} GiB); rollout=vllm for long answers")


def advice(config, plan: StagePlan) -> str:
    phases = {**plan.estimated, **plan.traced}
    largest = max(phases, key=phases.get) if phases else ""
    if largest == "HF evaluation":
        return "does not fit: HF generate's KV cache at these lengths; evaluate with rollout=vllm (or lower eval.batch_size)"
    found = []
    train = getattr(config, "train", None)
    if train is not None and not train.activation_checkpointing:
        found.append("train.activation_checkpointing=true")
    if train is not None:
        found.append("a smaller train.micro_batch_size (or train.micro_batch_tokens)")
    if "teacher scoring" in plan.estimated:
        found.append("teacher.engine=server on GPUs of its own")
    if any(k.startswith("vLLM") for k in plan.estimated):
        found.append("a smaller rollout.gpu_memory_utilization")
    found.append("more GPUs (--nproc-per-node, more nodes)")
    return "does not fit: try " + ", ".join(found)


def plan_experiment(plan, gpus: int, gpu_memory_gib: float, trace: bool = True) -> list[StagePlan]:
    made: dict[str, Shape] = {}  # checkpoint path an earlier stage writes -> its shape
    cache: dict = {}  # traced phases shared by stages of the same shapes and objective
    stages, gpu_bytes = [], gpu_memory_gib * GIB
    for name, config in plan.configs.items():
        if config.stage == "eval":
            stage = plan_eval(name, config, gpus, gpu_bytes, made)
        else:
            stage = plan_training(name, config, gpus, gpu_bytes, made, trace, cache)
        if stage.peak > gpu_bytes:
            stage.notes.append(advice(config, stage))
        stages.append(stage)
        shape = shape_of(config.student, made)
        if shape is not None:
            made[str(Path(config.output_dir) / "checkpoint")] = shape
    return stages


def _gib(value: float | None) -> str:
    return "-" if value is None else "too large" if value == float("inf") else f"{value / GIB:.1f}"


def render(stages: list[StagePlan], gpus: int, gpu_memory_gib: float, assumed: bool = False,
           detail: bool = False) -> str:
    gpu = f"{gpu_memory_gib:g} GiB" + (" (assumed; --gpu-memory to change)" if assumed else "")
    traced = any(s.traced for s in stages)
    lines = [f"Peak memory per GPU, GiB, on {gpus} GPUs of {gpu} (FSDP2 over {gpus})",
             "training: the step's largest phase" + (", traced on aopd's code with fake tensors and by arithmetic"
                                                     if traced else ", by arithmetic (--arithmetic)")
             + "; generation: a vLLM engine's phase (or HF generate's), by arithmetic", "",
             f"{'stage':<16} {'training traced':>15} {'estimated':>10} {'generation':>11}  verdict"]
    limit = gpu_memory_gib * GIB
    for stage in stages:
        verdict = "fits" if stage.peak <= limit else "DOES NOT FIT"
        lines.append(f"{stage.name:<16} {_gib(stage.training(True)):>15} {_gib(stage.training(False)):>10} "
                     f"{_gib(stage.engines):>11}  {verdict}")
        if detail:
            lines += [f"    {phase}: {_gib(value)} estimated" + (f", {_gib(stage.traced[phase])} traced"
                                                                 if phase in stage.traced else "")
                      for phase, value in stage.estimated.items()]
            lines += [f"      {size / GIB:8.2f}  {part}" for part, size in stage.parts.items()]
        lines += [f"    note: {note}" for note in stage.notes if detail or "does not fit" in note]
    failing = [s for s in stages if s.peak > limit]
    tightest = max(stages, key=lambda s: s.peak) if stages else None
    if failing:
        lines.append(f"\n{len(failing)} of {len(stages)} stages do not fit: " + ", ".join(
            f"{s.name} {_gib(s.peak)} GiB" for s in failing) + f" of {gpu_memory_gib:g}")
    elif tightest is not None:
        lines.append(f"\n{len(stages)} stages fit; tightest: {tightest.name} {_gib(tightest.peak)} of "
                     f"{gpu_memory_gib:g} GiB" + ("" if detail else " (--detail for every phase and term)"))
    return "\n".join(lines) + "\n"
