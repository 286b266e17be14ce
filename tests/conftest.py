"""Test setup: 8 fake CPU devices, set before jax is imported anywhere (haliax CI style)."""

import atexit
import os
import shutil
import tempfile

# LLVM at -O0: XLA's CPU compile time (most of this suite's time: tiny programs, each compiled
# once) halves; the HLO passes, sharding and collectives are unchanged, and every comparison in
# the suite runs both sides under the same flags. CLI subprocesses get these flags too (without
# the 8 devices) through NOPEJAX_TEST_XLA_FLAGS.
os.environ.setdefault("NOPEJAX_TEST_XLA_FLAGS", "--xla_backend_optimization_level=0")
os.environ["XLA_FLAGS"] = " ".join(
    [os.environ.get("XLA_FLAGS", ""), os.environ["NOPEJAX_TEST_XLA_FLAGS"], "--xla_force_host_platform_device_count=8"]
)
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# the TPU ahead-of-time compile tests load libtpu in this process and in CLI subprocesses
os.environ["ALLOW_MULTIPLE_LIBTPU_LOAD"] = "1"

# One persistent compilation cache per session, shared by the xdist workers (they inherit the
# environment of the process that imported this file first) and by every CLI subprocess: many
# tests compile the same tiny programs (model init, the train step of a resumed run, each process
# of a multihost run). The key is the program, flags and jax version, so a hit runs what a fresh
# compile would. The size limit turns on jax's file lock, so workers never read a half-written entry.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="nopejax-tests-jax-cache-")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(4 << 30))

import jax

jax.config.update("jax_default_matmul_precision", "highest")
