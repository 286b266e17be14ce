"""Compile time of one value-and-grad step vs depth, scanned vs unrolled.

    python benchmarks/compile_depth.py [--depths 8,16,32,64] [--repeats 3]

Fixed small width (d_model 128, NoPE every 4th layer). Each figure is the median over fresh
compiles (a new model config each time, so nothing is served from a cache).
"""

import argparse
import os
import statistics
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import jax.numpy as jnp

from nopejax import config, model


def compile_seconds(num_layers: int, scan: bool, salt: int) -> float:
    cfg = config.base_config()
    shape = dict(vocab_size=256, d_model=128, num_heads=4, num_kv_heads=2, head_dim=32, d_ff=256)
    cfg.model.update(
        num_layers=num_layers, scan_layers=scan, dtype="float32", rms_norm_eps=1e-6 + salt * 1e-12, **shape
    )
    m = config.validate(cfg).model
    graphdef, params = model.split(nnx_eval_shape(m))
    tokens = jax.ShapeDtypeStruct((2, 64), jnp.int32)

    def loss(params, tokens):
        return jnp.mean(model.apply(graphdef, params, tokens) ** 2)

    t0 = time.perf_counter()
    jax.jit(jax.value_and_grad(loss)).lower(params, tokens).compile()
    return time.perf_counter() - t0


def nnx_eval_shape(m):
    from flax import nnx

    return nnx.eval_shape(lambda: model.create(m))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--depths", default="8,16,32,64")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    depths = [int(d) for d in args.depths.split(",")]
    compile_seconds(4, True, -1)  # warm up the compiler itself
    rows = {}
    for scan in (True, False):
        for d in depths:
            rows[scan, d] = statistics.median(compile_seconds(d, scan, r) for r in range(args.repeats))
    print(f"{'layers':>6} | {'scanned s':>9} | {'x vs 8':>6} | {'unrolled s':>10} | {'x vs 8':>6}")
    for d in depths:
        s, u = rows[True, d], rows[False, d]
        print(
            f"{d:>6} | {s:>9.2f} | {s / rows[True, depths[0]]:>6.2f} | {u:>10.2f} | {u / rows[False, depths[0]]:>6.2f}"
        )


if __name__ == "__main__":
    main()
