"""Compose `recipes/` with Hydra's compose API and validate the result once (the only Hydra import).

Errors become a `ConfigError` (`UnknownKey`, `UnknownOption` where that is the cause) whose message names the dotted key, the bad value and what is allowed;
the CLI prints it and exits 2 before anything is written.

    aopd show warmup train.steps=10
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from aopd_cli.config.schema import OBJECTIVE_MODELS, STAGE_MODELS, Experiment
from aopd_cli.config.suggest import did_you_mean
from aopd_cli.errors import ConfigError, UnknownKey, UnknownOption

REPO_ROOT = Path(__file__).resolve().parents[2]
__all__ = ["ConfigError", "UnknownKey", "UnknownOption", "load_stage_config", "load_experiment"]


def recipes_dir() -> Path:
    return Path(os.environ.get("AOPD_RECIPES", REPO_ROOT / "recipes")).resolve()


def experiments_dir() -> Path:
    return Path(os.environ.get("AOPD_EXPERIMENTS", REPO_ROOT / "experiments")).resolve()


def groups_of() -> list[str]:
    """The recipe groups (`objective`, `data`, ...): a group is a key too (`objective=gkd`)."""
    return sorted(p.name for p in recipes_dir().iterdir() if p.is_dir())


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (recipes_dir() / group).glob("*.yaml"))


def compose_dict(stage: str, overrides: list[str]) -> dict[str, Any]:
    """Hydra composition of `recipes/<stage>.yaml` with overrides, as a plain dict."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException
    from omegaconf import OmegaConf

    if stage not in STAGE_MODELS:
        raise ConfigError(f"unknown stage {stage!r}{did_you_mean(stage, STAGE_MODELS)}; allowed: {', '.join(STAGE_MODELS)}")
    overrides = list(overrides)
    try:
        while True:
            try:
                with initialize_config_dir(config_dir=str(recipes_dir()), version_base=None):
                    cfg = compose(config_name=stage, overrides=overrides)
                return OmegaConf.to_container(cfg, resolve=True)
            except ConfigCompositionException as err:
                # a key the schema has but this recipe's YAML does not spell out (`data.on_bad_row=skip` on a
                # data recipe without it) is still a key: add it, as Hydra's `+key=value` would
                bad = _override_named(err, overrides)
                if bad is None or bad.startswith(("+", "~")) or not schema_has(stage, bad.partition("=")[0]):
                    raise
                overrides[overrides.index(bad)] = f"+{bad}"
    except yaml.YAMLError as err:  # a recipe file that is not YAML, or asks for a Python object
        raise ConfigError(yaml_problem(err, "a recipe file")) from None
    except MissingConfigException as err:
        raise _missing_option_error(err, overrides) from None
    except OverrideParseException as err:
        raise ConfigError(f"cannot parse override: {err}") from None
    except ConfigCompositionException as err:
        raise _composition_error(stage, err, overrides) from None


def yaml_problem(err: yaml.YAMLError, what: str) -> str:
    """One line: the file, line and column, and what YAML found there."""
    mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
    where = f"{mark.name}: line {mark.line + 1}, column {mark.column + 1}" if mark is not None else what
    problem = " ".join(str(getattr(err, "problem", None) or err).split())
    if "python/" in problem or "constructor" in problem:
        problem += " (Python objects are not allowed in YAML here)"
    return f"{where}: not valid YAML: {problem}"


def _missing_option_error(err, overrides: list[str]) -> ConfigError:
    for override in overrides:
        key, _, value = override.lstrip("+~").partition("=")
        if (recipes_dir() / key).is_dir() and value not in group_options(key):
            options = group_options(key)
            return UnknownOption(f"{key}={value}: no such option{did_you_mean(value, options)}; allowed: "
                                 f"{', '.join(options)}")
    return ConfigError(str(err).strip())


def _override_named(err, overrides: list[str]) -> str | None:
    text = str(err)
    return next((o for o in overrides if f"'{o.lstrip('+~').split('=')[0]}'" in text), None)


def schema_has(stage: str, key: str) -> bool:
    """Whether the stage's schema has this dotted key (a field of the model or of a model it holds)."""
    import typing

    models: list = [STAGE_MODELS[stage]] if stage in STAGE_MODELS else []
    for part in key.split("."):
        fields = [model.model_fields[part] for model in models if part in model.model_fields]
        if not fields:
            return False
        if part == "objective" and models[0] in STAGE_MODELS.values():
            models = list(OBJECTIVE_MODELS.values())
            continue
        models = [arg for field in fields for arg in (typing.get_args(field.annotation) or (field.annotation,))
                  if isinstance(arg, type) and issubclass(arg, BaseModel)]
    return True


def _composition_error(stage: str, err, overrides: list[str]) -> ConfigError:
    text = str(err)
    bad = _override_named(err, overrides)
    if bad is None:
        return ConfigError(text.strip())
    key, _, value = bad.partition("=")
    known = flat_keys(compose_dict(stage, [o for o in overrides if o != bad]))
    parent = key.rpartition(".")[0]
    siblings = sorted(k.rpartition(".")[2] for k in known if k.rpartition(".")[0] == parent)
    allowed = f" Keys under {parent!r}: {', '.join(siblings)}." if siblings and parent else ""
    return UnknownKey(f"{key}={value}: unknown key{did_you_mean(key, known)}.{allowed}")


def sweep_values(key: str, values: str) -> list[str]:
    """Hydra's sweep grammar: `-1,0,1`, `range(0,1,0.25)`, `choice(a,b)`, or one value."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        override = OverridesParser.create().parse_override(f"{key}={values}")
    except HydraException as err:  # OverrideParseException and the grammar's own errors
        raise ConfigError(f"--param {key}={values}: not Hydra's sweep grammar ({str(err).splitlines()[0]}); "
                          "e.g. -1,0,1 or range(0,1,0.25) or choice(a,b)") from None
    return list(override.sweep_string_iterator()) if override.is_sweep_override() else [str(override.value())]


def flat_keys(tree: dict, prefix: str = "") -> list[str]:
    keys = []
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            keys += flat_keys(value, dotted + ".")
        else:
            keys.append(dotted)
    return keys


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """Dotted keys -> leaf values, for MLflow params and sweep tags."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat


def validate(stage: str, raw: dict[str, Any]) -> BaseModel:
    model = STAGE_MODELS[stage]
    try:
        return model.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_validation_message(err, raw)) from None


def _validation_message(err: ValidationError, raw: dict) -> str:
    lines = []
    for issue in err.errors():
        loc = [str(part) for part in issue["loc"]]
        if len(loc) >= 2 and loc[0] == "objective" and loc[1] in OBJECTIVE_MODELS:
            loc.pop(1)  # the union's tag: the user wrote objective.tau, not objective.aopd.tau
        key = ".".join(loc) or "<root>"
        if issue["type"] == "extra_forbidden":
            lines.append(f"{key}: unknown key{_extra_hint(loc, raw)}")
        elif issue["type"] == "union_tag_invalid":
            lines.append(f"{key}: objective name must be one of {', '.join(OBJECTIVE_MODELS)}, got {issue['input']!r}"
                         + did_you_mean(str(issue["input"]), OBJECTIVE_MODELS))
        elif issue["type"] == "literal_error":
            allowed = re.findall(r"'([^']*)'", issue.get("ctx", {}).get("expected", ""))
            lines.append(f"{key}={_show(issue.get('input'))}: {issue['msg']}"
                         + did_you_mean(str(issue["input"]), allowed))
        elif isinstance(issue.get("input"), dict):  # a check across a section's keys: its message names them
            lines.append(f"{key}: {issue['msg'].removeprefix('Value error, ')}")
        else:
            lines.append(f"{key}={_show(issue.get('input'))}: {issue['msg'].removeprefix('Value error, ')}")
    if len(lines) == 1:
        return f"invalid configuration: {lines[0]}"
    return "invalid configuration:\n  " + "\n  ".join(lines)


def _extra_hint(loc: list[str], raw: dict) -> str:
    parent_path, name = loc[:-1], loc[-1]
    if parent_path == ["objective"]:
        objective_name = raw.get("objective", {}).get("name")
        model = OBJECTIVE_MODELS.get(objective_name)
        if model is not None:
            allowed = [f for f in model.model_fields if f != "name"]
            hint = did_you_mean(f"objective.{name}", [f"objective.{f}" for f in allowed])
            return f" for objective {objective_name!r}{hint}; allowed: {', '.join(allowed)}"
    return ""


def _show(value) -> str:
    return repr(value) if isinstance(value, str) else str(value)


def load_stage_config(stage: str, overrides: list[str]):
    """Compose and validate: the one entry point stages and commands use."""
    return validate(stage, compose_dict(stage, overrides))


def experiment_path(name_or_path: str) -> Path:
    """`experiments/NAME.yaml` for a name, the file itself for a path."""
    path = Path(name_or_path)
    return path if path.suffix else experiments_dir() / f"{name_or_path}.yaml"


def load_experiment(name_or_path: str) -> Experiment:
    path = experiment_path(name_or_path)
    if not path.is_file():
        options = sorted(p.stem for p in experiments_dir().glob("*.yaml"))
        raise ConfigError(f"experiment={name_or_path}: no such experiment{did_you_mean(name_or_path, options)}; "
                          f"allowed: {', '.join(options)}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(yaml_problem(err, f"experiment file {path}").replace("<unicode string>", str(path))) from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"experiment file {path}: cannot read it ({err})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"experiment file {path}: expected a mapping (name, stages, ...), got {type(raw).__name__}")
    try:
        return Experiment.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(f"experiment file {path}: {_validation_message(err, {})}") from None


def to_yaml(config: BaseModel) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False, allow_unicode=True)
