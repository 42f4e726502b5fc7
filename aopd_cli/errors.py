"""The exceptions that reach the user as one plain line, not a traceback: `ConfigError` (exit 2, a
refused configuration, nothing written), `UserError` (exit 1, something the user can fix) and
`Interrupted` (a stop asked by a signal: exit 128 + its number).

    python -c "from aopd_cli.errors import UnknownKey; print(UnknownKey('objective.tua=1: unknown key'))"
"""

import signal

SIGNAL_NAMES = {signal.SIGINT: "SIGINT (Ctrl-C)", signal.SIGTERM: "SIGTERM"}


class UserError(RuntimeError):
    """Something the user can fix: a missing checkpoint or dataset, a mismatched teacher, a bad row."""


class ConfigError(ValueError):
    """A refused configuration; the message is for the user."""


class UnknownKey(ConfigError):
    """An override names a key the config does not have."""


class UnknownOption(ConfigError):
    """A group override (`objective=...`) names an option that `recipes/` does not have."""


class Interrupted(BaseException):
    """A stop asked by a signal; the CLI exits 128 + the signal number."""

    def __init__(self, signum: int, message: str = ""):
        super().__init__(message or f"stopped by {SIGNAL_NAMES.get(signum, signum)}")
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + int(self.signum)
