"""Stopping a run cleanly: SIGTERM and Ctrl-C ask the loop to stop after its step and save; a stop
that does not complete within the grace period ends the process naming the newest checkpoint.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

import jax
from jax.experimental import multihost_utils

from nopejax import checkpoint


def _ignore_here(signum, frame):
    """The Python-level handler: it only has to exist, so Python catches the signal; the watcher
    thread of `Preemption` acts on it."""


class Preemption:
    """SIGTERM (what GCE/TPU and SLURM send before preemption) and a first Ctrl-C ask the loop to
    stop cleanly: finish the step, save, exit. A second Ctrl-C stops at once, without saving. A stop
    that does not complete within `train.stop_grace_seconds` (a step that never finishes: a hung
    collective, a stuck device) ends the process with one line naming the newest complete checkpoint.

    The signals reach a watcher thread through `signal.set_wakeup_fd`, because Python runs signal
    handlers only between bytecodes of the main thread, which a stuck step never returns to.

    Multi-process runs must agree on the step to stop at: JAX's preemption sync point gives
    every process the same answer. Its coordination service watches SIGTERM itself, so there the
    signals are left to it: Ctrl-C and the grace period are for single-process runs.
    """

    def __init__(self, checkpoints_dir: str, grace_seconds: float):
        self.requested = False
        self.signal_name: str | None = None  # the signal that asked to stop
        self.stopping_at: int | None = None  # the step the loop stops after, once it has seen the request
        self.multi = jax.process_count() > 1
        self._dir, self._grace = checkpoints_dir, grace_seconds
        self._handlers, self._timer = {}, None
        self._lock, self._closed = threading.Lock(), False  # no timer outlives the run it watches

    def __enter__(self) -> Preemption:
        if self.multi:
            return self
        self._read_fd, self._write_fd = os.pipe()
        os.set_blocking(self._write_fd, False)  # written from a signal handler: never block there
        self._old_wakeup_fd = signal.set_wakeup_fd(self._write_fd, warn_on_full_buffer=False)
        for signum in (signal.SIGTERM, signal.SIGINT):
            self._handlers[signum] = signal.signal(signum, _ignore_here)
        threading.Thread(target=self._watch, name="nopejax-signals", daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        if self.multi:
            return
        with self._lock:
            self._closed = True
            if self._timer is not None:
                self._timer.cancel()
        for signum, handler in self._handlers.items():
            if handler is not None:  # None: a handler not set from Python, which cannot be put back
                signal.signal(signum, handler)
        signal.set_wakeup_fd(self._old_wakeup_fd)
        os.close(self._write_fd)  # the watcher reads end-of-file and returns

    def _watch(self) -> None:
        while data := os.read(self._read_fd, 64):  # one byte per signal: its number
            for signum in data:
                if signum in (signal.SIGTERM, signal.SIGINT):
                    self._on_signal(signal.Signals(signum))
        os.close(self._read_fd)

    def _on_signal(self, signum: signal.Signals) -> None:
        with self._lock:
            if self._closed:
                return
            if self.requested:  # a scheduler may repeat SIGTERM; a second Ctrl-C means "now"
                if signum == signal.SIGINT:
                    self._exit(130, f"interrupted again: stopped at once, without saving; {self._newest()}")
                return
            self.requested, self.signal_name = True, signum.name
            if signum == signal.SIGINT:
                print("nopejax train: interrupted: stopping after this step with a checkpoint; Ctrl-C again stops "
                      "at once, without one", file=sys.stderr, flush=True)  # fmt: skip
            self._timer = threading.Timer(self._grace, self._expired)
            self._timer.daemon = True
            self._timer.start()

    def _expired(self) -> None:
        with self._lock:
            if self._closed:
                return
            what = ("the step in progress did not finish" if self.stopping_at is None
                    else f"the checkpoint of step {self.stopping_at} was not complete")  # fmt: skip
            self._exit(1, f"error: {what} within {self._grace} s of {self.signal_name}; stopped without saving, "
                          f"{self._newest()}. If it only needs longer, raise train.stop_grace_seconds")  # fmt: skip

    def _newest(self) -> str:
        steps = checkpoint.complete_steps(self._dir)
        if not steps:
            return "there is no complete checkpoint yet"
        return f"the newest complete checkpoint is step {steps[-1]} ({os.path.join(self._dir, str(steps[-1]))})"

    @staticmethod
    def _exit(code: int, message: str) -> None:
        """End the process from the watcher: the main thread may be stuck where no exception reaches."""
        sys.stdout.flush()
        print(f"nopejax train: {message}", file=sys.stderr, flush=True)
        os._exit(code)

    def should_stop(self, step: int) -> bool:
        if self.multi:
            stop = multihost_utils.reached_preemption_sync_point(step)
            self.signal_name = self.signal_name or ("SIGTERM" if stop else None)
        else:
            stop = self.requested
        if stop and self.stopping_at is None:
            self.stopping_at = step
        return stop
