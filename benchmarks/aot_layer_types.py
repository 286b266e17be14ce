"""Ahead-of-time compile of the 3B local/global stack vs SmolLM3-3B for a TPU v5p-16 slice.

    python benchmarks/aot_layer_types.py                  # seq_len 4096 and 32768 (~18 min on 2 busy cores)
    python benchmarks/aot_layer_types.py --quick          # seq_len 4096 only (~1.5 min idle, ~5 min busy)
    python benchmarks/aot_layer_types.py --seq-lens 4096 --topology v5p:2x2x4 --batch 16

Runs `nopejax train --config ... --dry-run --topology ...` for configs/local_global_3b.py and
configs/smollm3_3b.py, alternating, each in a fresh process (no compile cache shared), and reads
the JSON the dry run prints last. The global batch stays at one sequence per chip (16 on v5p:2x2x4)
at every length. Compile seconds are lowering + XLA compile, as the dry run reports them.
"""

import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = {"smollm3_3b": "configs/smollm3_3b.py", "local_global_3b": "configs/local_global_3b.py"}


def dry_run(config: str, topology: str, overrides: list[str]) -> dict:
    cmd = [sys.executable, "-m", "nopejax.cli", "train", "--config", os.path.join(ROOT, config), "--dry-run"]
    cmd += ["--topology", topology, *overrides]
    # Worktree first on the path so the checkout being measured is the one imported.
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    env["ALLOW_MULTIPLE_LIBTPU_LOAD"] = "1"  # compile only: don't fail on libtpu's lockfile held by another process
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--seq-lens", default="4096,32768")
    parser.add_argument("--topology", default="v5p:2x2x4")
    parser.add_argument("--batch", type=int, default=16, help="global batch: one sequence per chip on 16 chips")
    parser.add_argument("--quick", action="store_true", help="seq_len 4096 only")
    args = parser.parse_args()
    seq_lens = [4096] if args.quick else [int(s) for s in args.seq_lens.split(",")]

    print(f"{args.topology}, global batch {args.batch}")
    print("| seq_len | config | compile (s) | memory per chip (GiB) | TFLOP per chip per step |")
    print("|---|---|---|---|---|")
    rows = {}
    for seq_len in seq_lens:
        overrides = [f"--config.train.seq_len={seq_len}", f"--config.train.global_batch_size={args.batch}"]
        for name, path in CONFIGS.items():
            r = dry_run(path, args.topology, overrides)
            rows[seq_len, name] = r
            print(f"| {seq_len} | {name} | {r['compile_seconds']:.1f} | {r['memory_per_device_gib']:.2f} "
                  f"| {r['flops_per_device'] / 1e12:.1f} |", flush=True)  # fmt: skip
    print("\nlocal_global_3b / smollm3_3b:")
    for seq_len in seq_lens:
        lg, sm = rows[seq_len, "local_global_3b"], rows[seq_len, "smollm3_3b"]
        print(f"  seq_len {seq_len}: compile {lg['compile_seconds'] / sm['compile_seconds']:.2f}x, "
              f"memory {lg['memory_per_device_gib'] / sm['memory_per_device_gib']:.2f}x, "
              f"FLOPs {lg['flops_per_device'] / sm['flops_per_device']:.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()
