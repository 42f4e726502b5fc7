"""What `aopd show` prints: a short summary (a stage's main keys as YAML; a pipeline's stages two lines
each: models, objective and its values, steps, data, engines, evaluation, where it writes), or with
`--full` every key as YAML. Before either, the local inputs are checked (config/paths.py): a missing
data file, benchmark file or checkpoint is a ConfigError (exit 2) unless an earlier stage of the same
pipeline writes it. For a single stage, the checkpoints the lab pipeline writes (the recipes' defaults,
`outputs/lab/...`) are a note, not an error: `aopd pipeline` makes them.

    aopd show pipeline experiment=paper_8b_3k
"""

from __future__ import annotations

from pathlib import Path

import yaml

from aopd_cli.config.compose import flatten, load_experiment, to_yaml
from aopd_cli.config.paths import checkpoints_made, missing_inputs, plan_missing
from aopd_cli.errors import ConfigError

# per section, the keys a summary shows (None: all of them); other sections are left to --full
MAIN_KEYS: dict[str, tuple[str, ...] | None] = {
    "student": ("path", "arch", "engine", "url"), "teacher": ("path", "arch", "engine", "url"),
    "base": ("path", "arch"), "data": ("source", "config", "split", "limit"), "tool_data": ("source", "limit"),
    "objective": None, "rollout": ("engine", "n", "temperature", "max_new_tokens"),
    "train": ("steps", "lr", "schedule", "batch_size", "micro_batch_size", "eval_every", "save_every"),
    "eval": ("benchmarks", "tool_benchmarks", "n", "k", "max_new_tokens", "limit"),
    "tracking": ("uri", "experiment"),
}
SECONDARY_OBJECTIVE_KEYS = ("reduction", "support", "zero_eps", "intervention")  # shown in a pipeline's line when not default


def _refuse(problems: list[str]) -> None:
    if problems:
        raise ConfigError("missing inputs (nothing was run):\n  " + "\n  ".join(problems))


def lab_checkpoints() -> set[Path]:
    """Where `aopd pipeline` (the lab) leaves its checkpoints: the recipes' default student and teacher."""
    return {Path("outputs/lab") / s.name / "checkpoint" for s in load_experiment("lab").stages if s.stage != "eval"}


def show_stage(config, name: str, full: bool) -> str:
    _refuse(missing_inputs(config, lab_checkpoints()))
    if full:
        return to_yaml(config)
    # what is still missing was accepted above as the lab's output: say so
    notes = [f"# {p.partition(':')[0]}: not there yet; `aopd pipeline` (the lab) writes it"
             for p in missing_inputs(config)]
    dump = config.model_dump(mode="json")
    shown = _main(dump)
    hidden = len(flatten(dump)) - len(flatten(shown))
    head = f"# {name}: the main keys; `aopd show {name} ... --full` prints all of them ({hidden} more) as YAML"
    # one line per section (YAML flow style): the summary stays a screen, and still parses as YAML
    body = [yaml.safe_dump({key: value}, default_flow_style=True, sort_keys=False, width=10_000,
                           allow_unicode=True).strip()[1:-1]
            for key, value in shown.items()]
    return "\n".join([head, *body, *notes]) + "\n"


def _main(dump: dict) -> dict:
    shown = {}
    for key, value in dump.items():
        if isinstance(value, dict):
            keys = MAIN_KEYS.get(key, ())
            part = {k: v for k, v in value.items() if (keys is None or k in keys) and v not in (None, [], {})}
            if part:
                shown[key] = part
        elif value is not None:
            shown[key] = value
    return shown


def show_pipeline(plan, full: bool) -> str:
    _refuse(plan_missing(plan.configs))
    if full:
        return "".join(f"# --- {name} ({config.stage})\n{to_yaml(config)}" for name, config in plan.configs.items())
    experiment, configs = plan.experiment, plan.configs
    first = next(iter(configs.values()))
    made = {path.expanduser().resolve(): name for name, config in configs.items() for path in checkpoints_made(config)}
    lines = [f"# {experiment.name}: {experiment.description}".rstrip(": "),
             f"# {len(configs)} stages writing under {plan.root}/, tracked in "
             f"{first.tracking.uri or 'sqlite:///mlflow.db'} (experiment {first.tracking.experiment!r})",
             "# --full prints every key as YAML", ""]
    width = max(len(f"{name} ({config.stage})") for name, config in configs.items()) + 1
    for name, config in configs.items():
        lines += _stage_lines(name, config, made, plan.root, width)
    return "\n".join(lines) + "\n"


def _model(label: str, model, made: dict) -> str:
    if model.path is None:
        arch = model.arch
        return f"{label} new lab model ({arch.num_layers} layers, hidden {arch.hidden_size})"
    source = made.get(Path(model.path).expanduser().resolve())
    return f"{label} ← {source}" if source else f"{label} {model.path}"


def _objective(objective) -> str:
    values = objective.model_dump(mode="json")
    defaults = type(objective)(name=objective.name).model_dump(mode="json")
    shown = [f"{k}={v}" for k, v in values.items()
             if k != "name" and (k not in SECONDARY_OBJECTIVE_KEYS or v != defaults[k])]
    return " ".join([f"objective={objective.name}", *shown])


def _evaluation(evaluation) -> str:
    benches = ",".join(evaluation.benchmarks + evaluation.tool_benchmarks) or "nothing"
    limit = f", limit {evaluation.limit}" if evaluation.limit else ""
    return f"{benches} (n {evaluation.n}, k {','.join(map(str, evaluation.k))}, {evaluation.max_new_tokens} tokens{limit})"


def _stage_lines(name: str, config, made: dict, root: Path, width: int) -> list[str]:
    """Two lines: what the stage reads (models, objective) and how it runs (steps, data, engines, folder)."""
    head = f"{name} ({config.stage})".ljust(width)
    out = Path(config.output_dir)
    where = f"→ {out.relative_to(root)}/" if out.is_relative_to(root) else f"→ {out}/"
    if config.stage == "eval":
        return [head + f"{_model('student', config.student, made)}; rollout {config.rollout.engine}",
                f"    {_evaluation(config.eval)} {where}"]
    train = config.train
    steps = f"{train.steps} steps x {train.batch_size}, lr {train.lr:g} {train.schedule}"
    data = f"data {config.data.source}" + (f" + {config.tool_data.source}" if getattr(config, "tool_data", None) else "")
    if config.stage == "warmup":
        cached = " (cached by config hash)" if config.reuse_cached else ""
        return [head + f"{_model('student', config.student, made)}; {data}", f"    {steps} {where}{cached}"]
    models = [_model("student", config.student, made), _model("teacher", config.teacher, made)]
    if config.base is not None:
        models.append(_model("base", config.base, made))
    engines = f"rollout {config.rollout.engine} (n {config.rollout.n}, {config.rollout.max_new_tokens} tokens)"
    teacher_engine = getattr(config.teacher, "engine", None)  # issue 10's teacher.engine, where present
    if teacher_engine:
        engines += f", teacher {teacher_engine}"
    return [head + "; ".join(models) + f"; {_objective(config.objective)}", f"    {steps}; {data}; {engines} {where}"]
