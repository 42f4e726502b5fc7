"""Running the command line as a user does, for the end-to-end tests."""

import os
import subprocess
import sys


def run_aopd(*args, cwd, cache=None, timeout=900):
    env = {**os.environ, **({"AOPD_CACHE": str(cache)} if cache else {})}
    return subprocess.run([sys.executable, "-m", "aopd_cli.cli", *args], cwd=cwd, capture_output=True, text=True,
                          env=env, timeout=timeout)
