"""Faults in reading checkpoints, judged by what the error shows.

A checkpoint whose read error shows damage (corrupt metadata, a truncated or missing file:
`read_error_kind`) is renamed `<step>.damaged-<UTC time>` next to the others: orbax no longer lists
it, so it is never restored again nor counted by retention (which would otherwise delete a good step
in its place), and the retrained step is saved normally. A transient error (I/O, memory) is retried;
one that persists, a permission problem, or an error that shows nothing about the files stops the
run with one line and leaves the checkpoint where it is.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import inspect
import json
import logging
import re
import sys
import time

from etils import epath

from nopejax.config import ConfigError, RunError

log = logging.getLogger("nopejax")

DAMAGED = re.compile(r"(\d+)\.damaged-.+")  # a quarantined step dir: <step>.damaged-<UTC time>
# Read errors, by what they show. tensorstore and XLA prefix theirs with an absl status code.
DAMAGE_CODES = ("DATA_LOSS", "OUT_OF_RANGE", "NOT_FOUND", "FAILED_PRECONDITION")  # lost, truncated, missing, garbled
TRANSIENT_CODES = ("UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "ABORTED")  # storage or memory, for now
TRANSIENT_ERRNOS = {errno.EIO, errno.EAGAIN, errno.EINTR, errno.ENOMEM, errno.EBUSY, errno.ETIMEDOUT, errno.ESTALE,
                    errno.ECONNRESET, errno.ECONNABORTED, errno.ENETUNREACH, errno.EHOSTUNREACH}  # fmt: skip
STATUS_CODE = re.compile(r"([A-Z][A-Z_]+): ")
RETRY_SECONDS = (2.0, 10.0)  # the waits before the second and third read of a checkpoint after a transient error
TENSORSTORE_SPEC = re.compile(r"\s*\[(tensorstore_spec|source locations)='.*?'\]", re.DOTALL)


def _chain(e: BaseException) -> list[BaseException]:
    """e and the exceptions it was raised from or while handling, outermost first."""
    out = []
    while e is not None and e not in out:
        out.append(e)
        e = e.__cause__ or e.__context__
    return out


def read_error_kind(e: BaseException) -> tuple[str, BaseException]:
    """-> ("damaged" | "transient" | "denied" | "unknown", the exception in e's chain that shows it).
    The innermost evidence wins: orbax wraps tensorstore's precise error in a generic one."""
    for x in reversed(_chain(e)):
        if isinstance(x, json.JSONDecodeError | FileNotFoundError | NotADirectoryError | IsADirectoryError):
            return "damaged", x
        if isinstance(x, PermissionError):
            return "denied", x
        if isinstance(x, MemoryError) or (isinstance(x, OSError) and x.errno in TRANSIENT_ERRNOS):
            return "transient", x
        code = STATUS_CODE.match(str(x))
        code = code and code[1]
        if code in DAMAGE_CODES:
            return "damaged", x
        if code in TRANSIENT_CODES:
            return "transient", x
        if code == "PERMISSION_DENIED":
            return "denied", x
    return "unknown", _chain(e)[-1]


def _read_debris(unraisable) -> bool:
    """What a failed orbax read leaves behind: tensorstore callbacks aimed at its closed asyncio loop,
    and its read coroutines, finalized with the error they never returned."""
    if isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == "Event loop is closed":
        return True
    obj = unraisable.object
    return inspect.iscoroutine(obj) and "orbax" in obj.cr_code.co_filename


class _AbandonedReadTasks(logging.Filter):
    """asyncio logs each of a failed read's other tasks, finalized later with the same error, as "Task
    exception was never retrieved": the same damage again, with tracebacks, naming the checkpoint."""

    def __init__(self, where: str):
        super().__init__()
        self.where = where

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (message.startswith("Task exception was never retrieved") and self.where in message)


@contextlib.contextmanager
def _quiet_failed_read(where: str):
    """Python prints each piece of `_read_debris` as a traceback: hundreds of lines around the one line
    that matters, which the caller writes. Dropped while reading; after a failed read the filters stay
    for the rest of the process, because tensorstore's threads keep calling into the closed loop, and
    the read's other tasks are finalized, for a while after the error (seconds later under load), long
    after this block has returned."""
    previous = sys.unraisablehook

    def hook(unraisable):
        if not _read_debris(unraisable):
            previous(unraisable)

    sys.unraisablehook = hook
    failed = False
    try:
        yield
    except BaseException:
        failed = True
        logging.getLogger("asyncio").addFilter(_AbandonedReadTasks(where))
        gc.collect()  # finalizes the abandoned coroutines now, under this hook
        raise
    finally:
        if not failed:
            sys.unraisablehook = previous


def read(read_fn, step: int, where: str):
    """-> (read(), None), or (None, the error) when it shows the checkpoint is damaged. Transient
    errors are retried; a permission problem, a transient error that persists or one that shows
    nothing about the files raise RunError, and the checkpoint stays where it is."""
    attempt = 0
    while True:
        attempt += 1
        try:
            with _quiet_failed_read(str(where)):
                return read_fn(), None
        except ConfigError:  # a process count that cannot continue: not about the files
            raise
        except Exception as e:  # orbax / tensorstore / the OS raise many types; read_error_kind sorts them
            kind, shown = read_error_kind(e)
            if kind == "damaged":
                return None, e
            if kind == "transient" and attempt <= len(RETRY_SECONDS):
                wait = RETRY_SECONDS[attempt - 1]
                log.warning("reading checkpoint step %d failed (%s); trying again in %g s", step, cause(shown), wait)
                time.sleep(wait)
                continue
            what = f"checkpoint step {step} at {where}"
            if kind == "denied":
                message = f"cannot read {what} ({cause(shown)}): make it readable by this user and rerun"
            elif kind == "transient":
                message = (f"reading {what} failed {attempt} times ({cause(shown)}): rerun when the storage "
                           "(or memory) is back")  # fmt: skip
            else:
                message = (f"reading {what} failed ({cause(shown)}), and nothing in the error shows damage: if "
                           f"it is damaged, rename it to {where}.damaged-manual and rerun to resume from the step "
                           "before")  # fmt: skip
            raise RunError(f"{message}; the checkpoint was left in place") from None


def cause(e: BaseException) -> str:
    """One line for an exception from orbax / tensorstore / the OS (theirs span many lines).
    A long one keeps both ends: tensorstore puts the OS reason ("No space left") last. The spec
    of the store tensorstore quotes (~1,000 characters of JSON) says nothing a user can act on."""
    message = " ".join(TENSORSTORE_SPEC.sub("", str(e)).split())
    if len(message) > 400:
        message = f"{message[:180]} ... {message[-200:]}"
    return f"{type(e).__name__}: {message}"


def damaged_steps(checkpoints_dir) -> dict[int, str]:
    """step -> the name of its quarantined folder (the newest, if a step was set aside twice)."""
    directory = epath.Path(checkpoints_dir)
    if not directory.is_dir():
        return {}
    found = sorted(p.name for p in directory.iterdir() if DAMAGED.fullmatch(p.name))
    return {int(DAMAGED.fullmatch(name)[1]): name for name in found}


def quarantine(checkpoints_dir, step: int) -> str:
    """Rename an unreadable step aside; orbax ignores names that are not a step number."""
    directory = epath.Path(checkpoints_dir)
    name = f"{step}.damaged-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
    (directory / str(step)).rename(directory / name)
    return name
