"""SIGINT/SIGTERM for the whole life of a run, phase by phase.

    setup   (load, held-out loss before step 1)  the run stops at once: `RunInterrupted`, exit 130; nothing
                                                  was written but the run record (every write is atomic)
    train   (the steps, evaluations during)       the step finishes, a checkpoint is saved, exit 0
    save    (final checkpoint, adapter, summary)  the saving goes on to the end, exit 0
    eval    (held-out loss after training)        the evaluation stops (`EvalInterrupted`); summary and
                                                  plot are still written, exit 0

A second signal in any phase aborts at once (KeyboardInterrupt): what was saved is complete, since every
save is atomic.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager


class RunInterrupted(KeyboardInterrupt):
    """A stop signal before the first step: nothing to save (the CLI exits with 130)."""


class EvalInterrupted(Exception):
    """A stop signal during the final evaluation: skip it, keep saving."""


class RunSignals:
    """The stop request of a run (truthy once a signal came) and the phase it is in."""

    def __init__(self) -> None:
        self.requested: str | None = None
        self.phase = "setup"

    def __bool__(self) -> bool:
        return self.requested is not None

    def handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.requested:
            raise KeyboardInterrupt  # second signal: stop now
        self.requested = name
        if self.phase == "setup":
            raise RunInterrupted(f"{name} before the first step: nothing was trained or saved")
        if self.phase == "eval":
            raise EvalInterrupted(name)
        what = {
            "train": "finishing this step and saving a checkpoint",
            "save": "finishing the save in progress",
        }[self.phase]
        print(f"\n{name} received: {what} (send it again to abort)", file=sys.stderr, flush=True)


@contextmanager
def run_signals() -> Iterator[RunSignals]:
    """Install the run's SIGINT/SIGTERM handler for the block (not in a thread other than the main one)."""
    flag = RunSignals()
    previous = {}
    try:
        for s in (signal.SIGINT, signal.SIGTERM):
            previous[s] = signal.signal(s, flag.handle)
    except ValueError:  # not the main thread: no signal handling
        previous = {}
    try:
        yield flag
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
