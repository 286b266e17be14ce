"""One trainer per workdir: process 0 holds an exclusive lock on `DIR/train.lock` while it trains,
and the OS releases it when the process ends, however it ends."""

from __future__ import annotations

import fcntl
import os
import socket
import time

import jax
import numpy as np
from jax.experimental import multihost_utils

from nopejax.config import RunError

LOCK_FILE = "train.lock"


class WorkdirLock:
    """One trainer per workdir: an exclusive `flock` on DIR/train.lock, taken by process 0 (the
    one that writes metrics and config.json) and released by the OS when the process ends, however
    it ends. Another trainer on the same workdir, on any host sharing the filesystem, is refused
    with one line naming the holder. All processes agree, so none trains without the lock."""

    def __init__(self, workdir: str, take: bool = True):
        self.path = os.path.join(os.path.abspath(workdir), LOCK_FILE)
        self.take = take
        self._fd = None

    def __enter__(self) -> WorkdirLock:
        holder = None
        if self.take:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 400).decode(errors="replace").strip() or "a process that has not said which"
                os.close(fd)
            else:
                self._fd = fd
                os.ftruncate(fd, 0)
                started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
                os.write(fd, f"pid {os.getpid()} on host {socket.gethostname()}, since {started}\n".encode())
        taken = holder is None
        if jax.process_count() > 1:
            taken = bool(np.min(multihost_utils.process_allgather(np.int32(taken))))
        if not taken:
            who = holder or "another trainer (process 0 names it)"
            raise RunError(f"the workdir {os.path.dirname(self.path)} is in use: {self.path} is locked by {who}; "
                           "wait for that run to end (or stop it), or train in another --workdir")  # fmt: skip
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            os.close(self._fd)  # releases the lock; the file stays (deleting it would race a new taker)
            self._fd = None
