"""Test setup: 8 fake CPU devices, set before jax is imported anywhere (haliax CI style)."""

import os
from importlib.metadata import version

# LLVM at -O0 and, in jaxlib 0.10 (CI's; 0.12 has no such flag and XLA aborts on unknown ones),
# XLA:CPU's older fusion code generator (LLVM IR emitted directly, where the default builds and
# optimizes an MLIR module per fusion): XLA's CPU compile time (most of this suite's time: tiny
# programs, each compiled once) drops to about a third (-O0 a half, the emitter another 39% of a
# hybrid model's train step); the HLO passes, sharding and collectives are unchanged, and every
# comparison in the suite runs both sides under the same flags. CLI subprocesses get these flags
# too (without the 8 devices) through NOPEJAX_TEST_XLA_FLAGS. XLA:CPU aborts the process when a
# collective's device threads do not all reach its rendezvous within 40 s; 8 fake devices on 2
# loaded cores can be that slow without anything being wrong, so the limit is 600 s (a real
# deadlock still ends: CLI subprocess tests have their own timeouts).
os.environ.setdefault(
    "NOPEJAX_TEST_XLA_FLAGS",
    "--xla_backend_optimization_level=0 --xla_cpu_collective_call_terminate_timeout_seconds=600"
    " --xla_cpu_collective_timeout_seconds=600"
    + (" --xla_cpu_use_fusion_emitters=false" if version("jaxlib").startswith("0.10.") else ""),
)
os.environ["XLA_FLAGS"] = " ".join(
    [os.environ.get("XLA_FLAGS", ""), os.environ["NOPEJAX_TEST_XLA_FLAGS"], "--xla_force_host_platform_device_count=8"]
)
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# the TPU ahead-of-time compile tests load libtpu in this process and in CLI subprocesses
os.environ["ALLOW_MULTIPLE_LIBTPU_LOAD"] = "1"

import jax

jax.config.update("jax_default_matmul_precision", "highest")
