"""The exceptions that reach the user as one plain line, not a traceback: `ConfigError` (exit 2, a
refused configuration, nothing written) and `UserError` (exit 1, something the user can fix).

    python -c "from aopd_cli.errors import UnknownKey; print(UnknownKey('objective.tua=1: unknown key'))"
"""


class UserError(RuntimeError):
    """Something the user can fix: a missing checkpoint or dataset, a mismatched teacher, a bad row."""


class ConfigError(ValueError):
    """A refused configuration; the message is for the user."""


class UnknownKey(ConfigError):
    """An override names a key the config does not have."""


class UnknownOption(ConfigError):
    """A group override (`objective=...`) names an option that `recipes/` does not have."""
