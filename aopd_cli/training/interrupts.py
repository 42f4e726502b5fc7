"""SIGTERM (what clusters send before pre-emption) and SIGINT (Ctrl-C), handled so that a run can resume.

Inside a training step the signal only asks the loop to stop: the step finishes, a resumable checkpoint
is written, the run is marked KILLED and the process exits 143 (SIGTERM) or 130 (SIGINT). A second
Ctrl-C, or a signal outside the training loop (loading, the final evaluation), stops at once with the same
exit codes; the last whole checkpoint stays. Every rank gets the signal from torchrun (and from the
scheduler: a repeated SIGTERM is ignored); the loop agrees on stopping collectively, after each step.

    python -m pytest tests/test_resume.py -q -k signal
"""

from __future__ import annotations

import signal
import sys
from contextlib import contextmanager
from dataclasses import dataclass

from aopd_cli.errors import SIGNAL_NAMES as NAMES
from aopd_cli.errors import Interrupted


@dataclass
class StopFlag:
    requested: int | None = None  # the signal that asked to stop at the end of the step
    in_step: bool = False

    @contextmanager
    def steps(self):
        """The training loop's steps: a signal here waits for the end of the step it lands in."""
        self.in_step = True
        try:
            yield
        finally:
            self.in_step = False


@contextmanager
def handled_signals():
    """Install the handlers for the block (main thread only); yields the StopFlag the loop polls."""
    flag = StopFlag()

    def handler(signum, frame):
        if flag.in_step and flag.requested is None:
            flag.requested = signum
            again = " (Ctrl-C again to stop now, without it)" if signum == signal.SIGINT else ""
            print(f"\naopd: {NAMES[signum]}: finishing this step, then writing a checkpoint to resume from{again}",
                  file=sys.stderr, flush=True)
            return
        if flag.in_step and signum == signal.SIGTERM:
            # a stop is under way, and a second SIGTERM is the launcher's echo, not a person's hurry: Ray's job stop
            # and Slurm signal every process, and torchrun forwards its own to each rank; SIGKILL ends a grace period
            return
        raise Interrupted(signum)

    import threading

    if threading.current_thread() is not threading.main_thread():
        yield flag
        return
    previous = {sig: signal.signal(sig, handler) for sig in NAMES}
    try:
        yield flag
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
