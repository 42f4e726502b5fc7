"""`python -m aopd_cli ...` is the `aopd` command (what torchrun starts on every rank).

    python -m aopd_cli --help
"""

from aopd_cli.cli import app

app(prog_name="aopd")
