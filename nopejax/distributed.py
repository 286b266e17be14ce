"""Multi-process start-up on JAX's multi-controller runtime (`jax.distributed`).

One process per TPU host, or per GPU node / GPU, all running the same program. On TPU VMs and
under SLURM JAX finds the cluster itself; elsewhere the coordinator address, process count and
process id come from flags or NOPEJAX_COORDINATOR / NOPEJAX_NUM_PROCESSES / NOPEJAX_PROCESS_ID
(JAX's own JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID work too). A single
process never initializes. NOPEJAX_CLUSTER=auto makes JAX detect the cluster even where this
module sees no sign of one (GCE TPU VMs keep their worker list in the metadata server).

Failures end in bounded time instead of hanging (all three in seconds, overridable by env):
  NOPEJAX_INIT_TIMEOUT (120)      every process must reach the coordinator within this; a wrong
                                  count or an unreachable address is an error after it.
  NOPEJAX_HEARTBEAT_TIMEOUT (30)  a process that stops heartbeating (killed, host lost) is
                                  declared dead after this, and the coordination service stops
                                  every other process with an error naming the missing task.
                                  JAX's default is 100 s; 30 s still tolerates network blips
                                  (heartbeats come from a C++ thread, so long compiles, GIL-bound
                                  Python and checkpoint writes do not delay them), and a lost
                                  host on a pod is noticed in half a minute rather than two.
  NOPEJAX_SHUTDOWN_TIMEOUT (60)   how long the exit barrier waits for peers; JAX's 300 s default
                                  only delays the error when a peer has already died.
"""

from __future__ import annotations

import logging
import os

from nopejax.config import ConfigError

log = logging.getLogger("nopejax")


def _seconds(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    try:
        return int(value) if value else default
    except ValueError:
        raise ConfigError(name, f"must be a whole number of seconds, got {value!r}", f"e.g. {name}={default}") from None


INIT_TIMEOUT_S = _seconds("NOPEJAX_INIT_TIMEOUT", 120)
HEARTBEAT_TIMEOUT_S = _seconds("NOPEJAX_HEARTBEAT_TIMEOUT", 30)
SHUTDOWN_TIMEOUT_S = _seconds("NOPEJAX_SHUTDOWN_TIMEOUT", 60)


def _env(*names: str) -> str | None:
    return next((os.environ[n] for n in names if os.environ.get(n)), None)


def _int(value, flag: str) -> int | None:
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise ConfigError(flag, f"must be an integer, got {value!r}", f"set {flag} to a whole number") from None


def cluster_detected() -> bool:
    """A TPU pod slice with several hosts, or a SLURM job step with several tasks.

    GCE TPU VMs publish their workers in the metadata server, not the environment, so
    launch/tpu_pod.sh sets NOPEJAX_CLUSTER=auto to hand detection to JAX.
    """
    if os.environ.get("NOPEJAX_CLUSTER") == "auto":
        return True
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    slurm = int(os.environ.get("SLURM_NTASKS", "1") or 1) > 1 and "SLURM_JOB_ID" in os.environ
    return "," in hosts or slurm or "MEGASCALE_COORDINATOR_ADDRESS" in os.environ


def _slurm_one_task_per_node_devices() -> None:
    """JAX's SLURM detection assumes one process per GPU (it makes only GPU $SLURM_LOCALID
    visible). With one task per node, make all the node's GPUs this process's devices."""
    per_node = os.environ.get("SLURM_NTASKS_PER_NODE") or os.environ.get("SLURM_STEP_TASKS_PER_NODE", "")
    gpus = os.environ.get("SLURM_GPUS_ON_NODE", "")
    if per_node.split("(")[0] == "1" and gpus.isdigit() and "JAX_LOCAL_DEVICE_IDS" not in os.environ:
        os.environ["JAX_LOCAL_DEVICE_IDS"] = ",".join(str(i) for i in range(int(gpus)))


def _initialize(**kwargs) -> None:
    import sys

    import jax

    # When the coordinator cannot be reached in time, XLA's client aborts the process from C++
    # (DEADLINE_EXCEEDED at RegisterTask, "another task died") before Python can raise; this
    # line, printed first, says what was being attempted and what to check.
    # The same holds later: when process 0 (which hosts the coordinator) dies, XLA aborts the others
    # within seconds with "Failed to send RPC to coordination service"; this line names that address.
    where = kwargs.get("coordinator_address") or "the address JAX detects for this cluster"
    print(f"nopejax: joining {kwargs.get('num_processes') or 'the cluster'} processes at coordinator {where} "
          f"(hosted by process 0) as process {kwargs.get('process_id', '(detected)')}; a DEADLINE_EXCEEDED abort "
          f"after {INIT_TIMEOUT_S} s means not all processes started with this coordinator and count",
          file=sys.stderr, flush=True)  # fmt: skip

    # CPU collectives across processes need gloo (the default does none); this changes nothing
    # for GPU/TPU arrays. Set before the backend exists, hence no jax.default_backend() here.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        initialization_timeout=INIT_TIMEOUT_S,
        heartbeat_timeout_seconds=HEARTBEAT_TIMEOUT_S,
        shutdown_timeout_seconds=SHUTDOWN_TIMEOUT_S,
        **kwargs,
    )


def _join_error(e: Exception, where: str) -> ConfigError:
    message = " ".join(str(e).split())[:300]
    if "before any JAX calls" in message:  # our bug, not the user's: say so plainly
        return ConfigError("--coordinator", f"jax.distributed.initialize ran too late ({message})", "report a bug")
    return ConfigError(
        "--coordinator",
        f"{where} did not come together within {INIT_TIMEOUT_S} s ({type(e).__name__}: {message})",
        "start every process with the same coordinator HOST:PORT (reachable from all hosts, port open) and the same "
        "--num-processes, each with its own --process-id; raise NOPEJAX_INIT_TIMEOUT if hosts start slowly",
    )


def maybe_initialize(args=None) -> bool:
    """Initialize jax.distributed when this is one of several processes. Returns whether it did.

    Must run before anything touches a JAX backend (jax.devices(), an array, a jit).
    """
    coordinator = getattr(args, "coordinator", None) or _env("NOPEJAX_COORDINATOR", "JAX_COORDINATOR_ADDRESS")
    num = getattr(args, "num_processes", None)
    num = _int(num if num is not None else _env("NOPEJAX_NUM_PROCESSES", "JAX_NUM_PROCESSES"), "--num-processes")
    pid = getattr(args, "process_id", None)
    pid = _int(pid if pid is not None else _env("NOPEJAX_PROCESS_ID", "JAX_PROCESS_ID"), "--process-id")
    if coordinator or (num is not None and num > 1):
        if not (coordinator and num and pid is not None):
            raise ConfigError(
                "--coordinator",
                f"a multi-process run needs all of coordinator ({coordinator}), process count ({num}) and "
                f"process id ({pid})",
                "set --coordinator HOST:PORT --num-processes N --process-id I (or the NOPEJAX_* variables)",
            )
        if num < 1:
            raise ConfigError("--num-processes", f"must be >= 1, got {num}", "use the number of processes you start")
        if not 0 <= pid < num:
            raise ConfigError("--process-id", f"process id {pid} is outside 0..{num - 1}", "use 0 <= id < count")
        if num == 1:
            return False
        if ":" not in coordinator:
            raise ConfigError("--coordinator", f"{coordinator!r} has no port", "use HOST:PORT, e.g. 10.0.0.2:8476")
        try:
            _initialize(coordinator_address=coordinator, num_processes=num, process_id=pid)
        except Exception as e:  # grpc / XLA raise several types for the same thing
            raise _join_error(e, f"the {num} processes at coordinator {coordinator} (this is process {pid})") from None
        log.info("process %d of %d joined coordinator %s", pid, num, coordinator)
        return True
    if cluster_detected():
        _slurm_one_task_per_node_devices()
        try:
            _initialize()
        except Exception as e:
            raise _join_error(e, "the processes of this TPU pod / SLURM job") from None
        return True
    return False
