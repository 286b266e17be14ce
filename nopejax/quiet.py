"""Quiet, honest command-line output: what matters, not the runtimes' chatter.

Two kinds of noise on an ordinary machine, each silenced at its cause and nowhere else:

- With the `tpu` extra installed, JAX tries the TPU backend on every start even where there is
  no TPU, and libtpu logs errors about the TPU it cannot find (`libtpu_init_utils.cc`). When
  the machine has no TPU chip on its PCI bus and no GPU, only the CPU backend can come up, so
  JAX is told so before it starts one. A user's own `JAX_PLATFORMS` always wins.
- orbax warns through absl each time a checkpoint is opened read-only (export, eval-length,
  generate). Exactly those two messages are dropped; every other record passes.
"""

from __future__ import annotations

import glob
import logging
import os

import jax

_GOOGLE_PCI_VENDOR = "0x1ae0"
_GVNIC_DEVICE = "0x0042"  # Google's virtual NIC: on every GCE VM, TPU or not
_GPU_DEVICE_FILES = ("/dev/nvidia0", "/dev/nvidiactl", "/dev/dxg", "/dev/kfd")  # CUDA, WSL2, ROCm
# orbax's read-only CheckpointManager: expected whenever a checkpoint is only read
_BENIGN_ABSL = (
    "CheckpointManagerOptions.read_only=True, setting save_interval_steps=0",
    "Given directory is read only",
)


def accelerator_present() -> bool:
    """A GPU device file, or a Google PCI device other than the virtual NIC (any TPU generation)."""
    if any(os.path.exists(p) for p in _GPU_DEVICE_FILES):
        return True
    for vendor_file in glob.glob("/sys/bus/pci/devices/*/vendor"):
        device_file = os.path.join(os.path.dirname(vendor_file), "device")
        try:
            with open(vendor_file) as v, open(device_file) as d:
                if v.read().strip() == _GOOGLE_PCI_VENDOR and d.read().strip() != _GVNIC_DEVICE:
                    return True
        except OSError:
            continue
    return False


class _DropBenignAbsl(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(text in message for text in _BENIGN_ABSL)


def setup() -> None:
    """Call once at command start, before JAX starts a backend."""
    if not os.environ.get("JAX_PLATFORMS") and not jax.config.jax_platforms and not accelerator_present():
        jax.config.update("jax_platforms", "cpu")
    absl = logging.getLogger("absl")
    if not any(isinstance(f, _DropBenignAbsl) for f in absl.filters):
        absl.addFilter(_DropBenignAbsl())
