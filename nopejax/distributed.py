"""Multi-process start-up on JAX's multi-controller runtime (`jax.distributed`).

One process per TPU host, or per GPU node / GPU, all running the same program. On TPU VMs and
under SLURM JAX finds the cluster itself; elsewhere the coordinator address, process count and
process id come from flags or NOPEJAX_COORDINATOR / NOPEJAX_NUM_PROCESSES / NOPEJAX_PROCESS_ID
(JAX's own JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID work too). A single
process never initializes. A coordinator that cannot be reached is an error after a bounded
wait, not a hang.
"""

from __future__ import annotations

import os

from nopejax.config import ConfigError

INIT_TIMEOUT_S = int(os.environ.get("NOPEJAX_INIT_TIMEOUT", "120"))


def _env(*names: str) -> str | None:
    return next((os.environ[n] for n in names if os.environ.get(n)), None)


def cluster_detected() -> bool:
    """A TPU pod slice with several hosts, or a SLURM job with several tasks."""
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    slurm = int(os.environ.get("SLURM_NTASKS", "1") or 1) > 1 and "SLURM_JOB_ID" in os.environ
    return "," in hosts or slurm or "MEGASCALE_COORDINATOR_ADDRESS" in os.environ


def maybe_initialize(args=None) -> bool:
    """Initialize jax.distributed when this is one of several processes. Returns whether it did."""
    import jax

    coordinator = getattr(args, "coordinator", None) or _env("NOPEJAX_COORDINATOR", "JAX_COORDINATOR_ADDRESS")
    num = getattr(args, "num_processes", None) or _env("NOPEJAX_NUM_PROCESSES", "JAX_NUM_PROCESSES")
    pid = getattr(args, "process_id", None)
    if pid is None:
        pid = _env("NOPEJAX_PROCESS_ID", "JAX_PROCESS_ID")
    num = int(num) if num is not None else None
    if coordinator or (num and num > 1):
        if not (coordinator and num and pid is not None):
            raise ConfigError(
                "--coordinator",
                f"a multi-process run needs all of coordinator ({coordinator}), process count ({num}) and "
                f"process id ({pid})",
                "set --coordinator HOST:PORT --num-processes N --process-id I (or the NOPEJAX_* variables)",
            )
        pid = int(pid)
        if not 0 <= pid < num:
            raise ConfigError("--process-id", f"process id {pid} is outside 0..{num - 1}", "use 0 <= id < count")
        if num == 1:
            return False
        if jax.default_backend() == "cpu" or os.environ.get("JAX_PLATFORMS", "").startswith("cpu"):
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        try:
            jax.distributed.initialize(
                coordinator, num_processes=num, process_id=pid, initialization_timeout=INIT_TIMEOUT_S
            )
        except Exception as e:
            raise ConfigError(
                "--coordinator",
                f"process {pid} of {num} could not join the coordinator at {coordinator} within "
                f"{INIT_TIMEOUT_S} s ({type(e).__name__}: {str(e).splitlines()[0][:200]})",
                "start all processes with the same coordinator address and count; check the port is reachable",
            ) from None
        return True
    if cluster_detected():
        jax.distributed.initialize(initialization_timeout=INIT_TIMEOUT_S)
        return True
    return False
