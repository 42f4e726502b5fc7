"""Everything a stage needs, checked before it starts (before any model loads and anything is written):
its input files and checkpoints (present, and whole: a truncated safetensors is caught here), the rows of
every benchmark it will evaluate on (and, for a pipeline, of every local data file its stages read), an
output folder it can write, room on disk for one checkpoint, and a tracking store that answers (a SQLite
one with room on its disk). Once the models are loaded (still before any folder or run exists), the
prompts are checked against the model's context (`fit_prompts`, `check_benchmark_prompts`). Each problem
is one line naming the key, file or row.

    aopd distill data.source=./nowhere.jsonl
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from aopd_cli.config.paths import input_problem, local_inputs, names_a_path
from aopd_cli.errors import ConfigError, UserError
from aopd_cli.training.checkpoints import checkpoint_problem, human_size

STORE_ROOM = 2**20  # free bytes a SQLite store's disk needs for a run's records (the lab's take a few hundred KiB)


def check_inputs(config) -> None:
    """Data and benchmark paths the config names (present, else ConfigError), checkpoints (present and
    whole, else UserError: they are made by runs)."""
    for key, value, role in local_inputs(config):
        if not names_a_path(value):
            continue
        problem = input_problem(key, value, role)
        if problem:
            raise (UserError if role == "checkpoint" else ConfigError)(problem)
        if role == "checkpoint":
            broken = checkpoint_problem(Path(value).expanduser())
            if broken:
                raise UserError(f"{key}={value}: not a whole checkpoint: {broken}")


def check_benchmarks(config) -> None:
    """Every benchmark the stage evaluates on is read now, not after training: a malformed row or an empty
    file is one line naming it."""
    from aopd_cli.data.loaders import load_records

    evaluation = getattr(config, "eval", None)
    if evaluation is None:
        return
    for key, kind, sources in (("eval.benchmarks", "math_benchmark", evaluation.benchmarks),
                               ("eval.tool_benchmarks", "tool_eval", evaluation.tool_benchmarks)):
        for source in sources:
            if not load_records(kind, source):
                raise UserError(f"{key}: {source} has no rows to evaluate on")


def check_local_data(config) -> None:
    """The rows of the local data files a stage trains on (a pipeline checks every stage's up front)."""
    from aopd_cli.data.loaders import load_data

    kinds = {"warmup": "sft", "distill": "prompts", "continual": "tool_train"}
    for name, kind in (("data", kinds.get(config.stage)), ("tool_data", "tool_train")):
        data = getattr(config, name, None)
        if data is not None and kind and names_a_path(data.source):
            load_data(data, kind)


def context_of(policy, *limits: int | None) -> int:
    """The longest sequence the model takes (its `max_position_embeddings`), narrowed by the limits set
    (`train.max_seq_len`, `rollout.max_model_len`)."""
    own = getattr(policy.model.config, "max_position_embeddings", None)
    return min(limit for limit in (own, *limits) if limit)


def fit_prompts(prompts: list[list[int]], records: list[dict], *, limit: int, new_tokens: int, what: str,
                on_bad_row: str, hint: str = "data.on_bad_row=skip leaves them out"
                ) -> tuple[list[list[int]], list[dict]]:
    """Prompts that leave room for `new_tokens` within `limit`; a longer one stops the stage before any
    work (one line naming it), or is left out with `data.on_bad_row=skip` (counted)."""
    too_long = [i for i, prompt in enumerate(prompts) if len(prompt) + new_tokens > limit]
    if not too_long:
        return prompts, records
    first = too_long[0]
    if on_bad_row == "raise":
        raise UserError(f"{what}: prompt {records[first].get('id', first)!r} is {len(prompts[first]):,} tokens; with "
                        f"{new_tokens:,} new tokens that passes the model's context of {limit:,} tokens "
                        f"({len(too_long)} prompt(s) are too long; {hint})")
    print(f"aopd: {what}: left out {len(too_long)} prompt(s) too long for the model's context of {limit:,} tokens "
          f"with {new_tokens:,} new tokens", flush=True)
    kept = [i for i in range(len(prompts)) if i not in set(too_long)]
    if not kept:
        raise UserError(f"{what}: every prompt is too long for the model's context of {limit:,} tokens")
    return [prompts[i] for i in kept], [records[i] for i in kept]


def check_benchmark_prompts(policy, evaluation, *limits: int | None) -> None:
    """Each benchmark problem (a tool instruction's first turn) leaves room for `eval.max_new_tokens`."""
    from aopd_cli.data.loaders import load_records
    from aopd_cli.data.prompts import chat_ids, math_messages, tool_messages

    limit = context_of(policy, *limits)
    for key, kind, sources in (("eval.benchmarks", "math_benchmark", evaluation.benchmarks),
                               ("eval.tool_benchmarks", "tool_eval", evaluation.tool_benchmarks)):
        for source in sources:
            records = load_records(kind, source)[: evaluation.limit]
            messages = [math_messages(r["problem"], evaluation.prompt_suffix) if kind == "math_benchmark"
                        else tool_messages(r, evaluation.tool_prompt_style) for r in records]
            prompts = [chat_ids(policy.tokenizer, m, add_generation_prompt=True) for m in messages]
            fit_prompts(prompts, records, limit=limit, new_tokens=evaluation.max_new_tokens, what=f"{key} {source}",
                        on_bad_row="raise", hint="shorten them, or lower eval.max_new_tokens")


def _existing_ancestor(path: Path) -> Path:
    path = path.resolve()
    while not path.exists():
        path = path.parent
    return path


def checkpoint_bytes(config) -> int:
    """One step checkpoint of the student: fp32 weights and two AdamW moments."""
    model = config.student
    if model.arch is not None:
        arch = model.arch
        per_layer = 4 * arch.hidden_size * arch.num_heads * arch.head_dim + 3 * arch.hidden_size * arch.intermediate_size
        params = arch.num_layers * per_layer + 128 * arch.hidden_size
    else:
        path = Path(model.path).expanduser()
        if not names_a_path(model.path) or not path.is_dir():
            return 0  # a hub model: its size is known once downloaded
        params = sum(f.stat().st_size for f in path.glob("*.safetensors")) // 2  # bf16 on disk, as a floor
    return params * 4 * 3


def check_output(config, training: bool) -> None:
    out_dir = Path(config.output_dir)
    ancestor = _existing_ancestor(out_dir)
    if not ancestor.is_dir() or not os.access(ancestor, os.W_OK | os.X_OK):
        raise UserError(f"output_dir={config.output_dir}: cannot write there ({ancestor} is not a writable folder)")
    if training:
        needed, free = checkpoint_bytes(config), shutil.disk_usage(ancestor).free
        if needed > free:
            raise UserError(f"output_dir={config.output_dir}: {human_size(free)} free on its disk, one checkpoint "
                            f"needs about {human_size(needed)}")


def check_tracking(config) -> None:
    """The store answers; a SQLite store has room on its disk for a run's records."""
    if config.tracking.enabled:
        from aopd_cli.tracking.store import DEFAULT_URI, absolute, connect

        uri = absolute(config.tracking.uri or DEFAULT_URI)
        if uri.startswith("sqlite:///"):
            free = shutil.disk_usage(_existing_ancestor(Path(uri.removeprefix("sqlite:///")))).free
            if free < STORE_ROOM:
                raise UserError(f"tracking.uri={uri}: {human_size(free)} free on its disk, a run's records need about "
                                f"{human_size(STORE_ROOM)}; make room, set tracking.uri to a store elsewhere, or set "
                                "tracking.enabled=false")
        connect(config.tracking.uri)


def preflight_all(configs: dict) -> None:
    """A pipeline's stages (name -> config, in order; or every stage of a sweep's children) checked before
    its first run exists: inputs present unless an earlier stage makes them, every benchmark's rows and
    every local data file's rows read once, output folders writable, the tracking store answering."""
    from aopd_cli.config.paths import plan_missing

    problems = plan_missing(configs)
    if problems:
        raise ConfigError(problems[0] + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""))
    seen: set[tuple] = set()
    for config in configs.values():
        key = (config.data.source if getattr(config, "data", None) else None, str(getattr(config, "eval", "")))
        if key not in seen:
            seen.add(key)
            check_benchmarks(config)
            check_local_data(config)
        check_output(config, training=False)
        check_served_teacher(config)
    first = next(iter(configs.values()), None)
    if first is not None:
        check_tracking(first)


def check_served_teacher(config) -> None:
    """A teacher server aopd would start itself (`teacher.engine=server`, no `teacher.url`) inherits this
    process's GPUs: it runs on the first `teacher.tensor_parallel_size` of them, beside the trainer's ranks,
    with `teacher.gpu_memory_utilization` of each. One line, before any work, when the teacher's weights
    cannot fit there (the planner's shapes: a local config.json or a known hub id)."""
    teacher = getattr(config, "teacher", None)
    if teacher is None or teacher.engine != "server" or teacher.url:
        return
    import torch

    if not torch.cuda.is_available():
        return
    from aopd_cli.plan.shapes import GIB, shape_of

    shape = shape_of(teacher)
    if shape is None:
        return
    share = teacher.gpu_memory_utilization * torch.cuda.get_device_properties(0).total_memory
    bytes_per = 4 if teacher.dtype == "float32" else 2
    weights = bytes_per * shape.params / teacher.tensor_parallel_size
    if weights > 0.9 * share:  # vLLM needs room beside the weights for activations and some KV cache
        tp = max(2, teacher.tensor_parallel_size)
        while tp < 8 and bytes_per * shape.params / tp > 0.8 * torch.cuda.get_device_properties(0).total_memory:
            tp *= 2
        gpus = torch.cuda.device_count()
        # the machine's last tp GPUs for the server, the rest for the trainer; too few: another machine's
        where = (f"CUDA_VISIBLE_DEVICES={','.join(map(str, range(gpus - tp, gpus)))} " if gpus > tp else
                 "on another machine: ")
        host = "127.0.0.1" if gpus > tp else "HOST"
        raise UserError(
            f"teacher.engine=server with no teacher.url starts {teacher.path} on this machine's GPU 0 beside the "
            f"trainer, with teacher.gpu_memory_utilization={teacher.gpu_memory_utilization:g} of it "
            f"({share / GIB:.0f} GiB), and its weights alone take {weights / GIB:.0f} GiB a GPU: serve it on GPUs of "
            f"its own (e.g. {where}aopd teacher serve teacher.path={teacher.path} --tensor-parallel-size {tp} "
            f"--port 8100), train on the others and set teacher.url=http://{host}:8100")


def preflight(config) -> None:
    check_served_teacher(config)
    check_inputs(config)
    check_benchmarks(config)
    check_output(config, training=config.stage != "eval")
    check_tracking(config)
