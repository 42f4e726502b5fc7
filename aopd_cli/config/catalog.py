"""`aopd ls [GROUP]`: what there is to choose from. With no argument, the experiments (with their
descriptions), the recipe groups with their options and the stages; with a group (`objective`, `data`,
...), each option's keys with its values, types and ranges (values from `recipes/GROUP/*.yaml`, types
and ranges from the pydantic models of config/schema.py); with a stage, its default options and keys.

    aopd ls objective
"""

from __future__ import annotations

import inspect
import re
import textwrap
import typing
from pathlib import Path

import yaml

from aopd_cli.config.compose import experiments_dir, flatten, group_options, recipes_dir
from aopd_cli.config.schema import OBJECTIVE_MODELS, STAGE_MODELS, DataConfig, EvalConfig, ModelConfig, RolloutConfig
from aopd_cli.config.suggest import did_you_mean
from aopd_cli.errors import ConfigError

WIDTH = 100
# the model that validates each group's options (objective: the option's own model, by name)
GROUP_MODELS = {"student": ModelConfig, "teacher": ModelConfig, "data": DataConfig, "rollout": RolloutConfig,
                "eval": EvalConfig}
GROUP_MEANING = {
    "student": "the model trained (a checkpoint folder, a hub id, or a fresh lab model)",
    "teacher": "the model distilled from",
    "data": "the training data (a known dataset, a hub id or a local file)",
    "objective": "the loss (method.md)",
    "rollout": "the engine that samples the student's responses",
    "eval": "benchmarks and sampling of the evaluations",
}


def _yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text()) or {}


def _comment(path: Path) -> str:
    """The option file's first comment line: what the option is."""
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
    return ""


def _wrap(head: str, text: str, indent: int) -> str:
    return textwrap.fill(text, WIDTH, initial_indent=head.ljust(indent), subsequent_indent=" " * indent) \
        if text else head


def groups() -> list[str]:
    return sorted(p.name for p in recipes_dir().iterdir() if p.is_dir())


def stage_groups(stage: str) -> dict[str, str]:
    """Group -> default option, from the `defaults` list of `recipes/STAGE.yaml`."""
    defaults = _yaml(recipes_dir() / f"{stage}.yaml").get("defaults", [])
    return {k: v for entry in defaults if isinstance(entry, dict) for k, v in entry.items()}


def _experiments() -> list[str]:
    lines = ["Experiments (aopd pipeline experiment=NAME; aopd show pipeline experiment=NAME for its stages):"]
    for path in sorted(experiments_dir().glob("*.yaml")):
        lines.append(_wrap(f"  {path.stem}", str(_yaml(path).get("description", "")), 26))
    return lines


def list_all() -> str:
    lines = _experiments() + ["", "Recipe groups (GROUP=OPTION on the command line; aopd ls GROUP for keys and defaults):"]
    users = {g: [s for s in STAGE_MODELS if g in stage_groups(s)] for g in groups()}
    for group in groups():
        lines.append(_wrap(f"  {group}", f"{', '.join(group_options(group))}   "
                                         f"(stages: {', '.join(users[group]) or 'none'})", 14))
    lines += ["", "Stages (aopd STAGE key=value ...; aopd ls STAGE for its keys, aopd show STAGE for the config):",
              "  " + ", ".join(STAGE_MODELS)]
    return "\n".join(lines) + "\n"


def list_group(name: str) -> str:
    if name in ("experiments", "experiment"):
        return "\n".join(_experiments()) + "\n"
    if name in STAGE_MODELS:
        return list_stage(name)
    if name not in groups():
        allowed = list(dict.fromkeys(groups() + list(STAGE_MODELS) + ["experiments"]))  # eval is both
        raise ConfigError(f"ls {name}: no such group or stage{did_you_mean(name, allowed)}; allowed: {', '.join(allowed)}")
    lines = [f"{name}: {GROUP_MEANING.get(name, 'a recipe group')}. Choose with {name}=OPTION, "
             f"change one key with {name}.KEY=VALUE.", ""]
    for option in group_options(name):
        path = recipes_dir() / name / f"{option}.yaml"
        values = flatten(_yaml(path))
        model = OBJECTIVE_MODELS.get(values.get("name")) if name == "objective" else GROUP_MODELS.get(name)
        lines.append(_wrap(f"{name}={option}", _comment(path), 24))
        lines += [_key_line(key, value, model) for key, value in values.items()
                  if not (name == "objective" and key == "name")]
        lines.append("")
    return "\n".join(lines)


def list_stage(stage: str) -> str:
    from aopd_cli.config.compose import compose_dict

    chosen = stage_groups(stage)
    lines = [_comment(recipes_dir() / f"{stage}.yaml"), "",
             "Groups (default option; aopd ls GROUP for the others):"]
    lines += [f"  {group}={option}" for group, option in chosen.items()]
    lines += ["", "Keys (default value; type and range):"]
    model = STAGE_MODELS[stage]
    for key, value in flatten(compose_dict(stage, [])).items():
        head, _, rest = key.partition(".")
        if head in chosen or key == "stage":
            continue  # a group's keys: aopd ls GROUP
        lines.append(_key_line(key, value, model))
    return "\n".join(lines) + "\n"


def _key_line(key: str, value, model) -> str:
    field = _field(model, key) if model is not None else None
    return _wrap(f"  {key:<30} {_show(value):<21}", _describe(*field) if field else "", 54)


def _show(value) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
    text = text.removesuffix("\n...").removesuffix("...").strip()
    return text if len(text) <= 20 else text[:19] + "…"


def _field(model, dotted: str):
    """(name, FieldInfo, comment) of a dotted key in a pydantic model, or None."""
    head, _, rest = dotted.partition(".")
    field = model.model_fields.get(head)
    if field is None:
        return None
    if rest:
        inner = _nested_model(field.annotation)
        return _field(inner, rest) if inner is not None else None
    return head, field, _comments(model).get(head, "")


def _nested_model(annotation):
    for candidate in (annotation, *typing.get_args(annotation)):
        if isinstance(candidate, type) and hasattr(candidate, "model_fields"):
            return candidate
    return None


def _comments(model) -> dict[str, str]:
    """Field -> the comment on its line in config/schema.py (the field's meaning, kept next to it)."""
    found = {}
    for line in inspect.getsource(model).splitlines():
        match = re.match(r"\s+(\w+):[^#]*#\s*(.+)$", line)
        if match:
            found[match[1]] = match[2]
    return found


def _describe(name: str, field, comment: str) -> str:
    annotation = field.annotation
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is typing.Literal:
        kind = " | ".join(map(str, args))
    elif _nested_model(annotation) is not None:
        kind = "{" + ", ".join(_nested_model(annotation).model_fields) + "}"
    else:
        plain = [typing.get_args(a)[0] if typing.get_origin(a) is typing.Annotated else a for a in args or (annotation,)]
        names = [getattr(a, "__name__", str(a)) for a in plain if a is not type(None)]
        kind = " or ".join(names) + (" or null" if type(None) in args else "")
    bounds = []
    for item in field.metadata:
        for attr, sign in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
            if getattr(item, attr, None) is not None:
                bounds.append(f"{sign} {getattr(item, attr)}")
    text = kind + (f" ({', '.join(bounds)})" if bounds else "")
    return f"{text}; {comment}" if comment else text
