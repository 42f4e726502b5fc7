"""`aopd distill ...` under torchrun where rank 1 alone raises at its second step (an injected fault);
the other rank must not hang.

    torchrun --nproc-per-node 2 tests/scripts/rank_fails.py distill train.steps=3 ...
"""

import os
import sys

import aopd_cli.stages.onpolicy as onpolicy
from aopd_cli.cli import app
from aopd_cli.errors import UserError

if os.environ.get("RANK") == "1":
    real = onpolicy.sample_indices
    calls = []

    def failing(rng, population, count):
        calls.append(1)
        if len(calls) == 2:
            raise UserError("injected failure on rank 1")
        return real(rng, population, count)

    onpolicy.sample_indices = failing
app(sys.argv[1:], prog_name="aopd")
