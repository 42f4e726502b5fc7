"""Running the command line as a user does, for the end-to-end tests."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path


def run_aopd(*args, cwd, cache=None, timeout=900):
    env = {**os.environ, **({"AOPD_CACHE": str(cache)} if cache else {})}
    return subprocess.run([sys.executable, "-m", "aopd_cli.cli", *args], cwd=cwd, capture_output=True, text=True,
                          env=env, timeout=timeout)


def start_aopd(*args, cwd, cache=None, log: Path):
    """`aopd ...` in the background (its own process group), stdout and stderr to `log`."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **({"AOPD_CACHE": str(cache)} if cache else {})}
    handle = open(log, "w")
    return subprocess.Popen([sys.executable, "-m", "aopd_cli.cli", *args], cwd=cwd, stdout=handle,
                            stderr=subprocess.STDOUT, env=env, start_new_session=True)


def wait_for(condition, timeout: float = 300, what: str = "condition") -> None:
    deadline = time.time() + timeout
    while not condition():
        if time.time() > deadline:
            raise TimeoutError(f"waited {timeout} s for {what}")
        time.sleep(0.05)  # a tiny run takes ~0.1 s a step: a kill "at step N" should land close to it


def distill_args(checkpoint, out, *extra):
    """A few cheap distillation steps of the tiny lab student against itself."""
    return ["distill", f"student.path={checkpoint}", f"teacher.path={checkpoint}", "train.batch_size=8",
            "train.micro_batch_size=4", "objective.top_k=4", "eval.limit=4", "eval.n=2", "eval.k=[1]",
            "train.eval_every=0", "rollout.max_new_tokens=24", "eval.max_new_tokens=24", f"output_dir={out}", *extra]


def whole_and_killed(work: Path, checkpoint, cache, step: int, *args) -> None:
    """Distils to the end into `work/whole`, then starts the same run into `work/killed` and SIGKILLs it once
    its step `step` checkpoint is written: the two runs a resume test compares."""
    whole = run_aopd(*distill_args(checkpoint, "whole", *args), cwd=work, cache=cache)
    assert whole.returncode == 0, whole.stderr[-2000:]
    process = start_aopd(*distill_args(checkpoint, "killed", *args), cwd=work, cache=cache, log=work / "killed.log")
    wait_for(lambda: (work / f"killed/step_{step}/meta.json").is_file() or process.poll() is not None,
             what=f"the step {step} checkpoint")
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def marked_processes(marker: str) -> list:
    """The processes that carry `AOPD_TEST_MARKER=marker` in their environment: a process started with it
    passes it to every process it starts, so orphans are found whatever they renamed themselves to."""
    import psutil

    found = []
    for process in psutil.process_iter():
        try:
            if process.pid != os.getpid() and process.environ().get("AOPD_TEST_MARKER") == marker:
                found.append(process)
        except (psutil.Error, OSError):
            pass
    return found
