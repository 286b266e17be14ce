"""No involuntary rematerialization: on every supported mesh, XLA's SPMD partitioner reshards each
tensor with collectives and never falls back to a full copy on every device.

When the partitioner cannot go from one sharding to another efficiently it replicates the whole
tensor, then re-partitions it, and says so on stderr (from C++, so only a subprocess can read
it): "Involuntary full rematerialization". At 3B x 32k tokens that is gigabytes per chip and a
collective nobody asked for. The train step of a 2-layer model is compiled on each mesh (data,
fsdp, tensor, context, expert and their pairs), in one subprocess, and the log must hold none.
"""

import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
MESSAGE = "Involuntary full rematerialization"
MARK = "=== mesh "

# (config, mesh sizes); the rest of the 8 devices is nothing: every product is 8
MESHES = [
    ("tiny", {"data": 8}),
    ("tiny", {"fsdp": 8}),
    ("tiny", {"fsdp": 4, "tensor": 2}),
    ("tiny", {"fsdp": 2, "context": 4}),
    ("tiny", {"fsdp": 2, "context": 2, "tensor": 2}),
    ("tiny", {"data": 2, "fsdp": 2, "tensor": 2}),
    ("tiny_moe", {"fsdp": 2, "expert": 4}),
    ("tiny_moe", {"data": 2, "context": 2, "expert": 2}),
    ("tiny_moe", {"fsdp": 2, "expert": 2, "tensor": 2}),
]

# Each mesh's name goes to stderr before its compile, so every message is read under its mesh.
# Batch 8 fills every batch split; 64 tokens make 8 zig-zag chunks of 8 at context 4.
SCRIPT = f"""
import sys
from nopejax import train
from nopejax.config import load_config

for name, mesh in {MESHES!r}:
    cfg = load_config(f"configs/{{name}}.py")
    cfg.model.num_layers = 2
    cfg.mesh.data = 1
    for axis, size in mesh.items():
        cfg.mesh[axis] = size
    cfg.train.global_batch_size = 8
    cfg.train.seq_len = 64
    print({MARK!r} + name + " " + repr(mesh), file=sys.stderr, flush=True)
    train.dry_run(cfg)
print("all compiled", flush=True)
"""


def test_no_involuntary_rematerialization_on_any_mesh():
    env = {
        **os.environ,
        "XLA_FLAGS": os.environ["NOPEJAX_TEST_XLA_FLAGS"] + " --xla_force_host_platform_device_count=8",
        "JAX_PLATFORMS": "cpu",
    }
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0 and "all compiled" in proc.stdout, proc.stderr[-3000:]
    found, mesh = [], None
    for line in proc.stderr.splitlines():
        if line.startswith(MARK):
            mesh = line[len(MARK) :]
        elif MESSAGE in line:
            found.append(f"{mesh}: {line[line.index(MESSAGE) :][:600]}")
    if found:
        pytest.fail(f"{len(found)} involuntary rematerializations:\n" + "\n".join(found))
