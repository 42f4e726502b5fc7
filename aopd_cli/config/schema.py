"""The validated configuration of every stage: frozen pydantic models that forbid unknown keys.

Hydra composes `recipes/` into a plain dict; `validate(stage, dict)` turns it into one of these models,
once, at the boundary. Past that point the code reads attributes, never `cfg.get(...)`.

    aopd show distill objective=aopd objective.tau=0.5
"""

from __future__ import annotations

import re
from typing import Annotated, Literal, Union

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

MATH_PROMPT_SUFFIX = "Please reason step by step, and put your final answer within \\boxed{}."

Reduction = Literal["seq-mean-token-mean", "token-mean"]
Support = Literal["raw", "renorm", "tail"]
StageName = Literal["warmup", "distill", "continual", "eval"]
Resume = Literal["auto", "never"]  # rerun continues from the newest step checkpoint, or starts afresh


def _folder_name(value: str) -> str:
    """A name that becomes a folder under outputs/: it may not climb out of it."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", value) or ".." in value:
        raise ValueError(f"{value!r} is used as a folder name under outputs/: letters, digits, '_', '-' and '.', "
                         "starting with a letter or digit, no '/' or '..'")
    return value


def _experiment_name(value: str) -> str:
    """An MLflow experiment's name: any text but control characters and '..' path parts."""
    if not value.strip() or any(ord(c) < 32 for c in value) or ".." in value.split("/"):
        raise ValueError(f"{value!r}: an MLflow experiment name (e.g. aopd or team/aopd), without control "
                         "characters or '..'")
    return value


def _trains(value: int) -> int:
    if value < 1:
        raise ValueError("0 steps train nothing (the stage would write its student unchanged as its result); "
                         "to evaluate a checkpoint as it is, run `aopd eval student.path=...`")
    return value


def _chat_template(value: str) -> str:
    from aopd_cli.data.prompts import CHAT_TEMPLATES

    if value not in CHAT_TEMPLATES and not value.endswith((".jinja", ".j2")) and "/" not in value:
        raise ValueError(f"{value!r} is neither a template name ({', '.join(CHAT_TEMPLATES)}) nor a Jinja file "
                         "(e.g. ./template.jinja)")
    return value


FolderName = Annotated[str, AfterValidator(_folder_name)]
ChatTemplate = Annotated[str, AfterValidator(_chat_template)]


class Strict(BaseModel):
    # non-finite floats (lr=inf, lam=nan) are refused everywhere: they only ever train NaN weights
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


class LabArch(Strict):
    """A tiny Qwen3 built from a config (the lab); the tokenizer is the lab's. The default is the lab's
    student: head_dim 32 because vLLM's CPU attention supports no smaller head (16 fails at the first
    generate), so the lab runs on both rollout engines."""

    hidden_size: int = Field(64, ge=8)
    num_layers: int = Field(2, ge=1)
    num_heads: int = Field(2, ge=1)
    num_kv_heads: int = Field(1, ge=1)
    head_dim: int = Field(32, ge=4)
    intermediate_size: int = Field(128, ge=8)


class ModelConfig(Strict):
    path: str | None = None  # a local directory or a hub id
    arch: LabArch | None = None  # instead of path: a fresh lab model
    trust_remote_code: bool = False
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # auto: bf16 on a GPU that has it, else fp32
    # prompts are formatted with the student's template: a teacher or base reads the student's tokens
    chat_template: ChatTemplate | None = None  # for a tokenizer without one: chatml, or a Jinja file (./t.jinja)

    @model_validator(mode="after")
    def _path_or_arch(self):
        if (self.path is None) == (self.arch is None):
            raise ValueError("give exactly one of `path` (a checkpoint or hub id) or `arch` (a fresh lab model)")
        return self


class TeacherConfig(ModelConfig):
    """The teacher: a model like the student's, and how it scores (`engine`)."""

    engine: Literal["hf", "vllm", "server"] = "hf"  # in-process HF, in-process vLLM, or a vLLM server
    url: str | None = None  # server: a running OpenAI-compatible vLLM server; None: aopd starts one on 127.0.0.1
    max_model_len: int | None = Field(None, ge=2)  # vllm / a server aopd starts (None: the model's own limit)
    tensor_parallel_size: int = Field(1, ge=1)  # vllm / a server aopd starts
    gpu_memory_utilization: float = Field(0.3, gt=0.0, le=1.0)  # vllm / a server aopd starts, on GPUs
    kv_cache_gib: float = Field(1.0, gt=0.0)  # vllm / a server aopd starts, on CPU
    request_sequences: int = Field(16, ge=1)  # an OpenAI server: sequences per request (the service: a micro-batch)
    max_in_flight: int = Field(4, ge=1)  # server: requests (the service: micro-batches) in flight at once
    # server: each micro-batch's forward runs while its scores are on their way (None: unless the trainer is on
    # the CPU and the teacher on this machine, where the two would share the same cores)
    overlap: bool | None = None
    timeout_s: float = Field(600.0, gt=0.0)  # server: one request (and each wait for its health)
    retries: int = Field(3, ge=0)  # server: retries of a failed request, with exponential backoff
    startup_timeout_s: float = Field(900.0, gt=0.0)  # a server aopd starts: until healthy
    server_args: list[str] = []  # a server aopd starts: extra arguments (e.g. ["--quantization", "fp8"])

    @model_validator(mode="after")
    def _engine_needs_path(self):
        if self.url is not None and self.engine != "server":
            raise ValueError(f"teacher.url is for teacher.engine=server (got engine={self.engine})")
        if self.engine != "hf" and self.path is None:
            raise ValueError(f"teacher.engine={self.engine} needs teacher.path (a checkpoint folder or hub id), "
                             "not a fresh lab model (arch)")
        return self


class DataConfig(Strict):
    source: str  # a known name (deepmath, openthoughts, toolalpaca, lab_math, ...), a hub id or a local path
    config: str | None = None
    split: str | None = None
    limit: int | None = Field(None, ge=1)
    min_difficulty: float | None = None
    on_bad_row: Literal["raise", "skip"] = "raise"
    prompt_suffix: str = MATH_PROMPT_SUFFIX  # math prompts
    prompt_style: Literal["full", "compact"] = "full"  # tool prompts: ToolAlpaca's ReAct prompt, or names only


class AopdObjective(Strict):
    name: Literal["aopd"]
    tau: float = Field(0.0, ge=-1.0, le=1.0)
    beta: float = Field(1.0, ge=0.0, le=1.0)
    top_k: int = Field(32, ge=1)
    intervention: Literal["threshold", "zero", "accuracy"] = "threshold"
    zero_eps: float = Field(1e-2, ge=0.0)
    support: Support = "raw"
    reduction: Reduction = "seq-mean-token-mean"


class OpdObjective(Strict):
    name: Literal["opd"]
    top_k: int = Field(32, ge=1)  # only for the diagnostics (teacher/student mass, fkl)
    reduction: Reduction = "seq-mean-token-mean"


class GkdObjective(Strict):
    name: Literal["gkd"]
    beta: float = Field(0.5, ge=0.0, le=1.0)
    top_k: int = Field(32, ge=1)
    support: Support = "raw"
    lmbda: float = Field(1.0, ge=0.0, le=1.0)  # probability of a student rollout (else a reference response)
    reduction: Reduction = "seq-mean-token-mean"


class SeqkdObjective(Strict):
    name: Literal["seqkd"]
    reduction: Reduction = "seq-mean-token-mean"


class ExopdObjective(Strict):
    name: Literal["exopd"]
    lam: float = Field(1.25, ge=0.0)
    top_k: int = Field(32, ge=1)
    reduction: Reduction = "seq-mean-token-mean"


Objective = Annotated[
    Union[AopdObjective, OpdObjective, GkdObjective, SeqkdObjective, ExopdObjective],
    Field(discriminator="name"),
]
OBJECTIVE_MODELS = {"aopd": AopdObjective, "opd": OpdObjective, "gkd": GkdObjective, "seqkd": SeqkdObjective,
              "exopd": ExopdObjective}


class RolloutConfig(Strict):
    engine: Literal["hf", "vllm"] = "hf"
    n: int = Field(1, ge=1)  # samples per prompt
    temperature: float = Field(1.0, gt=0.0)
    max_new_tokens: int = Field(64, ge=1)
    tensor_parallel_size: int = Field(1, ge=1)  # vllm
    gpu_memory_utilization: float = Field(0.5, gt=0.0, le=1.0)  # vllm on GPUs: the engine's share of the GPU
    max_model_len: int | None = Field(None, ge=2)  # vllm: longest prompt + response (None: the model's own limit)
    kv_cache_gib: float = Field(1.0, gt=0.0)  # vllm on CPU: KV cache memory (GPUs size it by gpu_memory_utilization)
    sleep: bool = True  # vllm on GPUs: free the engine's memory during updates (sleep mode is CUDA-only)
    enforce_eager: bool | None = None  # vllm: None = eager on CPU (starts in seconds), CUDA graphs on GPUs


class TrainConfig(Strict):
    steps: Annotated[int, AfterValidator(_trains)] = 100  # optimizer steps, at least 1
    lr: float = Field(1e-5, gt=0.0)
    schedule: Literal["constant", "cosine"] = "constant"
    warmup_steps: int = Field(0, ge=0)
    batch_size: int = Field(32, ge=1)  # prompts (or conversations) per optimizer step
    micro_batch_size: int = Field(8, ge=1)  # sequences per forward/backward
    grad_clip: float = Field(1.0, gt=0.0)
    weight_decay: float = Field(0.0, ge=0.0)
    eval_every: int = Field(0, ge=0)  # 0: only at the end
    save_every: int = Field(0, ge=0)  # 0: only at the end; a resumable step_N checkpoint every N steps
    keep_last: int = Field(2, ge=1)  # step_N checkpoints kept (older ones are removed once a newer one is whole)
    log_every: int = Field(1, ge=1)
    max_skipped: int = Field(3, ge=1)  # consecutive steps with a non-finite loss or gradient before the stage stops
    activation_checkpointing: bool = False  # recompute each decoder layer in backward (memory for time)
    max_seq_len: int | None = Field(None, ge=2)  # longest training sequence (prompt + response), in tokens
    too_long: Literal["truncate", "drop"] = "truncate"  # what happens to a longer warm-up example (counted)
    micro_batch_tokens: int | None = Field(None, ge=1)  # micro-batches by token budget (padded), else by count


class EvalConfig(Strict):
    benchmarks: list[str] = []  # math benchmarks: aime24, aime25, hmmt25, lab_math, or local files
    tool_benchmarks: list[str] = []  # toolalpaca (eval_simulated), toolalpaca_real, lab_tools
    n: int = Field(8, ge=1)  # samples per problem
    k: list[Annotated[int, Field(ge=1)]] = [1, 4]
    temperature: float = Field(1.0, gt=0.0)
    max_new_tokens: int = Field(1024, ge=1)
    limit: int | None = Field(None, ge=1)  # problems per benchmark
    batch_size: int = Field(64, ge=1)  # sequences per generate call
    prompt_suffix: str = MATH_PROMPT_SUFFIX
    tool_prompt_style: Literal["full", "compact"] = "full"
    greedy: bool = False  # also greedy decoding: `eval/<benchmark>/greedy` beside the sampled Pass@k

    @model_validator(mode="after")
    def _k_le_n(self):
        if any(k > self.n for k in self.k):
            raise ValueError(f"k={self.k}: every k of Pass@k must be at most n={self.n}, the samples per problem")
        return self


class TrackingConfig(Strict):
    uri: str | None = None  # None: MLflow's default (sqlite:///mlflow.db in the working directory)
    experiment: Annotated[str, AfterValidator(_experiment_name)] = "aopd"
    enabled: bool = True


class WarmupConfig(Strict):
    stage: Literal["warmup"]
    student: ModelConfig
    data: DataConfig
    tool_data: DataConfig | None = None  # ToolAlpaca training conversations mixed in
    train: TrainConfig
    eval: EvalConfig
    rollout: RolloutConfig = RolloutConfig()  # the engine of its evaluations (vLLM at paper lengths)
    tracking: TrackingConfig = TrackingConfig()
    seed: int = 0
    threads: int | None = Field(None, ge=1)  # torch's CPU threads (None: torch's choice, the cores it sees)
    dist_timeout_s: float = Field(7200.0, gt=0.0)  # torchrun/GPU: a collective's wait (a rank downloading)
    output_dir: str = "outputs/warmup"
    resume: Resume = "auto"
    reuse_cached: bool = False  # reuse a checkpoint trained from the same config (content hash)


class DistillConfig(Strict):
    """`distill` (math prompts) and `continual` (tool prompts, math retention measured around it)."""

    stage: Literal["distill", "continual"]
    student: ModelConfig
    teacher: TeacherConfig
    base: ModelConfig | None = None  # exopd's P_B; None: the student's starting weights
    data: DataConfig
    objective: Objective
    rollout: RolloutConfig
    train: TrainConfig
    eval: EvalConfig
    tracking: TrackingConfig = TrackingConfig()
    seed: int = 0
    threads: int | None = Field(None, ge=1)  # torch's CPU threads (None: torch's choice, the cores it sees)
    dist_timeout_s: float = Field(7200.0, gt=0.0)  # torchrun/GPU: a collective's wait (a rank downloading)
    output_dir: str = "outputs/distill"
    resume: Resume = "auto"


class EvalStageConfig(Strict):
    stage: Literal["eval"]
    student: ModelConfig
    rollout: RolloutConfig
    eval: EvalConfig
    tracking: TrackingConfig = TrackingConfig()
    seed: int = 0
    threads: int | None = Field(None, ge=1)  # torch's CPU threads (None: torch's choice, the cores it sees)
    dist_timeout_s: float = Field(7200.0, gt=0.0)  # torchrun/GPU: a collective's wait (a rank downloading)
    output_dir: str = "outputs/eval"
    resume: Resume = "auto"


STAGE_MODELS: dict[str, type[Strict]] = {
    "warmup": WarmupConfig, "distill": DistillConfig, "continual": DistillConfig, "eval": EvalStageConfig,
}


class PipelineStage(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_]+$")
    stage: StageName
    overrides: list[str] = []
    # an upstream stage that sweeps and seeds reuse (the lab's warm-ups): of the command line's overrides,
    # only `NAME.key=value` and `tracking.*` reach it
    shared: bool = False


class Launch(Strict):
    """Where an experiment is meant to run (`aopd show pipeline` and `aopd plan` say it)."""

    nodes: int = Field(1, ge=1)
    gpus_per_node: int = Field(0, ge=0)  # 0: the CPU (the lab)
    command: str = ""  # the launch, e.g. aopd pipeline experiment=paper_8b_3k --nproc-per-node 8
    teacher: str = ""  # where the teacher scores (in-process, sharded; or a vLLM server on its own GPUs)


class Experiment(Strict):
    name: FolderName
    description: str = ""
    launch: Launch = Launch()
    stages: list[PipelineStage]
    overrides: list[str] = []  # for every stage that has the key (like `key=value` on the command line)
    table1: dict[str, str] = {}  # row label -> eval stage (Pass@1 / Pass@4 per benchmark)
    table2: dict[str, tuple[str, str]] = {}  # row label -> (eval before continual, eval after continual)

    @model_validator(mode="after")
    def _names_once(self) -> "Experiment":
        names = [stage.name for stage in self.stages]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:  # a later stage of the same name would silently stand in for the earlier one
            raise ValueError(f"stage name {repeated[0]!r} is used more than once; each stage needs its own")
        return self
