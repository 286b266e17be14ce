"""Attention benchmark: nopejax Pallas flash attention (RoPE fused) vs cuDNN / XLA with a separate RoPE.

    python benchmarks/attention.py                      # GPU / TPU: S = 2k, 8k, 16k, D 128, Hq 32, Hkv 8, bf16
    python benchmarks/attention.py --seq-lens 4096 --iters 20

Rows: implementation x {RoPE, NoPE} x S; columns: forward and forward+backward
time and TFLOP/s, plus the largest output difference from the XLA path (a
correctness smoke check wherever the kernel has not been tested). FLOPs are
the attention matmuls only, 4*B*Hq*S^2*D forward, halved for causal, and
3.5x that for forward+backward (the FlashAttention convention). On a CPU-only
host it runs tiny shapes with the kernel in interpret mode, only to show the
script works; those timings mean nothing.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp

from nopejax.kernels import flash_attention


def apply_rope(x_BSHD, theta: float):
    """HF half-split RoPE on an explicit copy: the unfused baseline."""
    _, S, _, D = x_BSHD.shape
    inv_freq = 1.0 / (theta ** (jnp.arange(0, D, 2, dtype=jnp.float32) / D))
    angle = jnp.arange(S, dtype=jnp.float32)[:, None] * inv_freq
    cos, sin = jnp.cos(angle)[None, :, None], jnp.sin(angle)[None, :, None]
    x = x_BSHD.astype(jnp.float32)
    x1, x2 = jnp.split(x, 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_BSHD.dtype)


def make_impls(platform: str, theta: float):
    """name -> fn(q, k, v, rope) for every implementation this platform has."""
    interpret = platform == "cpu"

    def pallas(q, k, v, rope):
        return flash_attention(q, k, v, rope=rope, rope_theta=theta, causal=True, interpret=interpret)

    def unfused(implementation):
        def fn(q, k, v, rope):
            if rope:
                q, k = apply_rope(q, theta), apply_rope(k, theta)
            return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=implementation)

        return fn

    impls = {"nopejax pallas": pallas}
    if platform == "gpu":
        impls["cudnn + rope"] = unfused("cudnn")
    impls["xla + rope"] = unfused("xla")
    return impls


def time_fn(fn, args, iters: int) -> float:
    """Median wall time in ms over iters runs after one compile-and-warm-up run."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def bench_one(fn, q, k, v, rope: bool, iters: int):
    fwd = jax.jit(lambda q, k, v: fn(q, k, v, rope))

    def loss(q, k, v, ct):
        return jnp.sum(fn(q, k, v, rope).astype(jnp.float32) * ct)

    fwd_bwd = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
    ct = jax.random.normal(jax.random.key(3), q.shape, jnp.float32)
    out = fwd(q, k, v)
    return out, time_fn(fwd, (q, k, v), iters), time_fn(fwd_bwd, (q, k, v, ct), iters)


def main(argv=None):
    platform = jax.default_backend()
    small = platform == "cpu"
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq-lens", default="256" if small else "2048,8192,16384")
    p.add_argument("--tokens", type=int, default=256 if small else 16384, help="batch = max(1, tokens // S)")
    p.add_argument("--heads", type=int, default=4 if small else 32)
    p.add_argument("--kv-heads", type=int, default=2 if small else 8)
    p.add_argument("--head-dim", type=int, default=64 if small else 128)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--rope-theta", type=float, default=10000.0)
    p.add_argument("--iters", type=int, default=2 if small else 10)
    args = p.parse_args(argv)

    dtype = jnp.dtype(args.dtype)
    impls = make_impls(platform, args.rope_theta)
    device = jax.devices()[0].device_kind
    print(f"# {device} ({platform}){'  [interpret mode: timings meaningless]' if small else ''}")
    print(f"# Hq={args.heads} Hkv={args.kv_heads} D={args.head_dim} {dtype.name} causal")
    header = (
        f"| {'impl':<16} | pos  | {'S':>6} | {'B':>3} | fwd ms  | fwd TF/s | f+b ms   | f+b TF/s | maxdiff vs xla |"
    )
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    for S in (int(s) for s in args.seq_lens.split(",")):
        B = max(1, args.tokens // S)
        ks = jax.random.split(jax.random.key(0), 3)
        q = jax.random.normal(ks[0], (B, S, args.heads, args.head_dim), jnp.float32).astype(dtype)
        k = jax.random.normal(ks[1], (B, S, args.kv_heads, args.head_dim), jnp.float32).astype(dtype)
        v = jax.random.normal(ks[2], (B, S, args.kv_heads, args.head_dim), jnp.float32).astype(dtype)
        fwd_flops = 4 * B * args.heads * S * S * args.head_dim / 2  # causal: half the score matrix
        for rope in (True, False):
            baseline = None
            results = []
            for name, fn in impls.items():
                label = name if rope else name.replace(" + rope", "")
                try:
                    out, t_fwd, t_fb = bench_one(fn, q, k, v, rope, args.iters)
                except Exception as e:  # e.g. cuDNN rejecting a shape; report and go on
                    print(f"| {label:<16} | {'rope' if rope else 'nope'} | {S:>6} | failed: {type(e).__name__}: {e}")
                    continue
                results.append((label, out, t_fwd, t_fb))
                if name.startswith("xla"):
                    baseline = out
            for label, out, t_fwd, t_fb in results:
                diff = "" if baseline is None else f"{float(jnp.max(jnp.abs(out.astype(jnp.float32) - baseline))):.3g}"
                print(
                    f"| {label:<16} | {'rope' if rope else 'nope'} | {S:>6} | {B:>3} | {t_fwd:7.3f} "
                    f"| {fwd_flops / t_fwd / 1e9:8.2f} | {t_fb:8.3f} | {3.5 * fwd_flops / t_fb / 1e9:8.2f} "
                    f"| {diff:>14} |"
                )


if __name__ == "__main__":
    main()
