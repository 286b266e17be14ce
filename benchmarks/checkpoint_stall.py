"""How long a checkpoint save blocks the train loop, async vs sync, and peak host RAM.

    python benchmarks/checkpoint_stall.py [--workdir /tmp/ckpt_bench]

1. A ~128M-parameter model (512 MB of fp32 params, 1.5 GB of train state with AdamW):
   time that `save()` blocks, async (arrays copied off the device, written in the background)
   vs synchronous, and the peak RSS growth of the process during the save.
2. The tiny config: the async stall as a share of one tiny train step. Goal: < 5%.
3. `nopejax export` of the 128M checkpoint in a fresh process: peak RSS above the same process's
   baseline (imports and backend initialised), as a multiple of the params' size. Goal: < 1.5x.
"""

import argparse
import os
import resource
import shutil
import subprocess
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from configs_loader import load

from nopejax import checkpoint, model, train


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def big_cfg(async_save: bool):
    cfg = load("tiny")
    cfg.model.update(vocab_size=32000, d_model=768, num_layers=12, num_heads=12, num_kv_heads=4, head_dim=64, d_ff=3072)
    cfg.checkpoint.async_save = async_save
    cfg.checkpoint.keep = 10
    return cfg


def stall(cfg, workdir, state, step) -> float:
    ckpt = checkpoint.Checkpointer(workdir, cfg)
    t0 = time.perf_counter()
    ckpt.save(step, state, force=True)
    blocked = time.perf_counter() - t0
    ckpt.close()
    return blocked


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", default="/tmp/nopejax_ckpt_bench")
    args = parser.parse_args()
    shutil.rmtree(args.workdir, ignore_errors=True)

    cfg = big_cfg(True)
    s = train.setup(cfg, jax.devices()[:1])
    state = train.init_state(s)
    params_mb = model.param_count(cfg.model) * 4 / 2**20
    state_mb = sum(x.nbytes for x in jax.tree.leaves(state)) / 2**20
    before = rss_mb()
    async_s = [stall(cfg, os.path.join(args.workdir, "async"), state, i) for i in range(1, 4)]
    save_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before
    sync_s = [stall(big_cfg(False), os.path.join(args.workdir, "sync"), state, i) for i in range(1, 4)]
    print(f"128M-param model: params {params_mb:.0f} MB, train state {state_mb:.0f} MB")
    print(f"  save blocks the loop: async {np.median(async_s):.3f} s | sync {np.median(sync_s):.3f} s")
    print(f"  peak RSS growth during saves: {save_peak:.0f} MB")

    tiny = load("tiny")
    st = train.setup(tiny, jax.devices()[:1])
    tstate = train.init_state(st)
    step_fn, _ = train.compile_fns(st)
    B, S = tiny.train.global_batch_size, tiny.train.seq_len
    batch = {k: np.zeros((B, S), np.float32 if k == "loss_mask" else np.int32) for k in train.BATCH_KEYS}
    tstate, out = step_fn(tstate, batch)
    jax.block_until_ready(out["loss"])
    t0 = time.perf_counter()
    for _ in range(10):
        tstate, out = step_fn(tstate, batch)
    jax.block_until_ready(out["loss"])
    step_s = (time.perf_counter() - t0) / 10
    tiny_stall = np.median([stall(tiny, os.path.join(args.workdir, "tiny"), tstate, i) for i in range(1, 6)])
    print(f"tiny config: async stall {1e3 * tiny_stall:.1f} ms = {100 * tiny_stall / step_s:.1f}% of a "
          f"{1e3 * step_s:.0f} ms step (goal < 5%)")  # fmt: skip

    code = (
        "import os, resource, sys; os.environ['JAX_PLATFORMS'] = 'cpu'; import jax; jax.devices()\n"
        "from nopejax import checkpoint, cli, data, hf, train\n"
        "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "rc = cli.main(['export', '--workdir', sys.argv[1], '--out', sys.argv[2]])\n"
        "print('PEAK', rc, base, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
    )
    src, dst = os.path.join(args.workdir, "async"), os.path.join(args.workdir, "hf")
    out = subprocess.run([sys.executable, "-c", code, src, dst], capture_output=True, text=True, check=True).stdout
    rc, base, peak = (int(x) for x in out.split("PEAK")[1].split())
    assert rc == 0, "export failed"
    grown = (peak - base) / 1024
    print(f"export: peak RSS {grown:.0f} MB above baseline = {grown / params_mb:.2f}x the "
          f"{params_mb:.0f} MB of params (goal < 1.5x)")  # fmt: skip


if __name__ == "__main__":
    main()
