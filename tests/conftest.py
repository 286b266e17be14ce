"""Test setup: 8 fake CPU devices, set before jax is imported anywhere (haliax CI style)."""

import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# the TPU ahead-of-time compile tests load libtpu in this process and in CLI subprocesses
os.environ["ALLOW_MULTIPLE_LIBTPU_LOAD"] = "1"

import jax

jax.config.update("jax_default_matmul_precision", "highest")
