"""The one exception type that reaches the user as a plain message (exit 1), not a traceback.

    python -c "from aopd_cli.errors import UserError; print(UserError('x'))"
"""


class UserError(RuntimeError):
    """Something the user can fix: a missing checkpoint or dataset, a mismatched teacher, a bad row."""
