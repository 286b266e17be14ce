"""Attention benchmark: nopejax Pallas flash attention (RoPE fused) vs cuDNN / XLA with a separate RoPE,
for global (full causal) and local (sliding-window) layers.

    python benchmarks/attention.py                  # plan table; on a GPU / TPU also timings at S = 8k, 32k
    python benchmarks/attention.py --check          # kernel vs the fp32 reference for every layer option, then exit
    python benchmarks/attention.py --seq-lens 4096 --window 1024 --iters 20

1. Plan (runs anywhere, no accelerator needed): grid steps and pl.CostEstimate FLOPs of the kernel's
   forward, dK/dV and dQ pallas_calls for a global and a local (W = --window) layer at S = 8k, 32k,
   128k, for the TPU and the GPU form (GPU "steps" are inner-loop iterations over all programs).
2. Timings (GPU / TPU only): rows implementation x layer {global, local} x {RoPE, NoPE} x S;
   columns forward and forward+backward time and TFLOP/s, the fwd+bwd share of the chip's dense bf16
   peak (BF16_PEAK_TFLOPS), the largest output difference from
   the XLA path. FLOPs count the visible score entries only: 4*B*Hq*D per (query, visible key)
   forward, 3.5x that for forward+backward (the FlashAttention convention). Local layers go to
   cuDNN / XLA as jax.nn.dot_product_attention(local_window_size=(W - 1, 0)).
3. --check: forward and gradients against nopejax.kernels.reference_attention (fp32, dense masks) on
   small shapes for global, local, chunked, partial and interleaved RoPE, NoPE temperature, GQA,
   packed documents and a length that is not a multiple of the block, in fp32 and bf16; exits
   non-zero on a mismatch. On a CPU host it runs a tiny subset in interpret mode.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import jax
import jax.numpy as jnp

from nopejax.kernels import describe, flash_attention, reference_attention


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
    """name -> fn(q, k, v, rope, window) for every implementation this platform has."""
    interpret = platform == "cpu"

    def pallas(q, k, v, rope, window):
        return flash_attention(
            q, k, v, rope=rope, rope_theta=theta, causal=True, interpret=interpret, sliding_window=window
        )

    def unfused(implementation):
        def fn(q, k, v, rope, window):
            if rope:
                q, k = apply_rope(q, theta), apply_rope(k, theta)
            local = None if window is None else (window - 1, 0)
            return jax.nn.dot_product_attention(
                q, k, v, is_causal=True, local_window_size=local, implementation=implementation
            )

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


def bench_one(fn, q, k, v, rope: bool, window, iters: int):
    fwd = jax.jit(lambda q, k, v: fn(q, k, v, rope, window))

    def loss(q, k, v, ct):
        return jnp.sum(fn(q, k, v, rope, window).astype(jnp.float32) * ct)

    fwd_bwd = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
    ct = jax.random.normal(jax.random.key(3), q.shape, jnp.float32)
    out = fwd(q, k, v)
    return out, time_fn(fwd, (q, k, v), iters), time_fn(fwd_bwd, (q, k, v, ct), iters)


def visible_pairs(S: int, window: int | None) -> int:
    """(query, key) pairs a causal layer computes: S(S+1)/2 globally, sum of min(i + 1, W) locally."""
    if window is None or window >= S:
        return S * (S + 1) // 2
    return window * S - window * (window - 1) // 2


# ----------------------------------------------------------------------------- plan


def print_plan(args) -> None:
    shape = dict(num_heads=args.heads, num_kv_heads=args.kv_heads, head_dim=args.head_dim)
    print(f"\n## Kernel plan: grid steps and CostEstimate FLOPs (B=1, Hq={args.heads}, Hkv={args.kv_heads}, "
          f"D={args.head_dim}, default blocks)")  # fmt: skip
    header = "| form | layer        |      S | fwd steps | dkv steps |  dq steps | fwd GFLOP | bwd GFLOP |"
    print(header)
    print("|" + "|".join("-" * len(c) for c in header.split("|")[1:-1]) + "|")
    for backend in ("tpu", "gpu"):
        for S in (8192, 32768, 131072):
            for window in (None, args.window):
                plan = describe(S, sliding_window=window, backend=backend, **shape)
                layer = "global" if window is None else f"local W={window}"
                bwd = plan["dkv"]["flops"] + plan["dq"]["flops"]
                print(
                    f"| {backend:<4} | {layer:<12} | {S:>6} | {plan['forward']['steps']:>9} "
                    f"| {plan['dkv']['steps']:>9} | {plan['dq']['steps']:>9} "
                    f"| {plan['forward']['flops'] / 1e9:>9.1f} | {bwd / 1e9:>9.1f} |"
                )


# ----------------------------------------------------------------------------- timings


# dense bf16 peak TFLOP/s per chip by device_kind substring (vendor data sheets: NVIDIA H100/H200 SXM
# 989.4, H100 PCIe 756, A100 312; cloud.google.com/tpu/docs: v5p 459, v5e 197, v4 275, v6e 918)
BF16_PEAK_TFLOPS = {"H200": 989.4, "H100 PCIe": 756.0, "H100": 989.4, "A100": 312.0,
                    "v5p": 459.0, "v5 lite": 197.0, "v5e": 197.0, "v4": 275.0, "v6": 918.0}  # fmt: skip


def bf16_peak_tflops(device_kind: str) -> float | None:
    return next((peak for name, peak in BF16_PEAK_TFLOPS.items() if name in device_kind), None)


def print_timings(args, platform: str) -> None:
    dtype = jnp.dtype(args.dtype)
    impls = make_impls(platform, args.rope_theta)
    kind = jax.devices()[0].device_kind
    peak = bf16_peak_tflops(kind)
    print(f"\n## Timings: {kind} ({platform}), Hq={args.heads} Hkv={args.kv_heads} "
          f"D={args.head_dim} {dtype.name} causal; bf16 peak {peak or 'unknown'} TFLOP/s")  # fmt: skip
    header = (
        f"| {'impl':<16} | {'layer':<12} | pos  | {'S':>6} | {'B':>3} | fwd ms  | fwd TF/s | f+b ms   | f+b TF/s "
        "| f+b % of peak | maxdiff vs xla |"
    )
    print(header)
    print("|" + "|".join("-" * len(c) for c in header.split("|")[1:-1]) + "|")
    for S in (int(s) for s in args.seq_lens.split(",")):
        B = max(1, args.tokens // S)
        ks = jax.random.split(jax.random.key(0), 3)
        q = jax.random.normal(ks[0], (B, S, args.heads, args.head_dim), jnp.float32).astype(dtype)
        k = jax.random.normal(ks[1], (B, S, args.kv_heads, args.head_dim), jnp.float32).astype(dtype)
        v = jax.random.normal(ks[2], (B, S, args.kv_heads, args.head_dim), jnp.float32).astype(dtype)
        for window in (None, args.window):
            layer = "global" if window is None else f"local W={window}"
            fwd_flops = 4 * B * args.heads * args.head_dim * visible_pairs(S, window)
            fb_ms = {}  # (impl without " + rope", rope) -> fwd+bwd ms, for the RoPE / NoPE ratio
            for rope in (True, False):
                baseline, results = None, []
                for name, fn in impls.items():
                    label = name if rope else name.replace(" + rope", "")
                    try:
                        out, t_fwd, t_fb = bench_one(fn, q, k, v, rope, window, args.iters)
                    except Exception as e:  # e.g. cuDNN rejecting a shape, XLA out of memory: report, go on
                        msg = f"{type(e).__name__}: {e}".splitlines()[0][:100]
                        print(f"| {label:<16} | {layer:<12} | {'rope' if rope else 'nope'} | {S:>6} | failed: {msg}")
                        continue
                    results.append((label, out, t_fwd, t_fb))
                    if name.startswith("xla"):
                        baseline = out
                for label, out, t_fwd, t_fb in results:
                    diff = (
                        "" if baseline is None else f"{float(jnp.max(jnp.abs(out.astype(jnp.float32) - baseline))):.3g}"
                    )
                    fb_tflops = 3.5 * fwd_flops / t_fb / 1e9
                    share = f"{100 * fb_tflops / peak:.1f}" if peak else ""
                    fb_ms[label.replace(" + rope", ""), rope] = t_fb
                    print(
                        f"| {label:<16} | {layer:<12} | {'rope' if rope else 'nope'} | {S:>6} | {B:>3} "
                        f"| {t_fwd:7.3f} | {fwd_flops / t_fwd / 1e9:8.2f} | {t_fb:8.3f} "
                        f"| {fb_tflops:8.2f} | {share:>13} | {diff:>14} |"
                    )
            for impl in sorted({name for name, _ in fb_ms}):
                if (impl, True) in fb_ms and (impl, False) in fb_ms:
                    ratio = fb_ms[impl, True] / fb_ms[impl, False]
                    print(f"|   {impl} {layer} S={S}: fwd+bwd RoPE / NoPE = {ratio:.2f}x |")


# ----------------------------------------------------------------------------- correctness check

# name -> (Hq, Hkv, D, packed, options); S is not a multiple of any block.
CHECKS = {
    "global rope": (8, 2, 128, True, {}),
    "local W=100 rope": (8, 2, 128, True, dict(sliding_window=100)),
    "local W=700 nope": (4, 4, 64, False, dict(sliding_window=700, rope=False)),
    "chunked C=256": (8, 2, 128, True, dict(chunk_size=256)),
    "partial 0.25 interleaved": (8, 1, 128, True, dict(partial_rotary_factor=0.25, rope_layout="interleaved")),
    "partial 0.5 local W=300": (6, 3, 64, True, dict(partial_rotary_factor=0.5, sliding_window=300)),
    "nope temperature": (8, 2, 128, True, dict(rope=False, nope_temperature=(64.0, 0.1))),
    "global D=256": (4, 1, 256, True, dict()),
}
CPU_CHECKS = ("local W=100 rope", "partial 0.25 interleaved")


def packed_inputs(B, S, Hq, Hkv, D, dtype, packed: bool):
    ks = jax.random.split(jax.random.key(S + D), 4)
    q, k, v = (jax.random.normal(kk, (B, S, h, D), jnp.float32).astype(dtype) for kk, h in zip(ks[:3], (Hq, Hkv, Hkv)))
    if not packed:
        return q, k, v, None, None
    seg = jnp.sort(jax.random.randint(ks[3], (B, S), 0, 3), axis=1).astype(jnp.int32)  # 3 documents per row
    starts = jnp.concatenate([jnp.ones((B, 1), bool), seg[:, 1:] != seg[:, :-1]], axis=1)
    idx = jnp.broadcast_to(jnp.arange(S), (B, S))
    pos = idx - jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)  # positions restart per document
    return q, k, v, seg, pos.astype(jnp.int32)


def rel_err(x, ref) -> float:
    x, ref = x.astype(jnp.float32), ref.astype(jnp.float32)
    return float(jnp.max(jnp.abs(x - ref)) / jnp.maximum(1.0, jnp.max(jnp.abs(ref))))


def run_checks(platform: str) -> bool:
    interpret = platform == "cpu"
    names = CPU_CHECKS if interpret else tuple(CHECKS)
    B, S = (1, 200) if interpret else (2, 1000)
    dtypes = (jnp.float32,) if interpret else (jnp.float32, jnp.bfloat16)
    print(f"\n## Check vs fp32 reference ({platform}{', interpret mode' if interpret else ''}), B={B} S={S}")
    ok = True
    for name in names:
        Hq, Hkv, D, packed, opts = CHECKS[name]
        for dtype in dtypes:
            q, k, v, seg, pos = packed_inputs(B, S, Hq, Hkv, D, dtype, packed)
            common = dict(segment_ids=seg, positions=pos, **opts)
            kernel = jax.jit(lambda q, k, v, common=common: flash_attention(q, k, v, interpret=interpret, **common))
            ref = jax.jit(lambda q, k, v, common=common: reference_attention(q, k, v, **common))
            out, vjp = jax.vjp(kernel, q, k, v)
            ref_out, ref_vjp = jax.vjp(ref, q, k, v)
            ct = jax.random.normal(jax.random.key(7), out.shape, jnp.float32).astype(dtype)
            errs = [rel_err(out, ref_out)] + [rel_err(g, r) for g, r in zip(vjp(ct), ref_vjp(ct))]
            fwd_tol, grad_tol = (2e-3, 5e-3) if dtype == jnp.float32 else (2e-2, 5e-2)
            good = errs[0] < fwd_tol and max(errs[1:]) < grad_tol
            ok &= good
            print(
                f"{'PASS' if good else 'FAIL'}  {name:<26} {jnp.dtype(dtype).name:<8} Hq={Hq} Hkv={Hkv} D={D} "
                f"o {errs[0]:.1e}  dq {errs[1]:.1e}  dk {errs[2]:.1e}  dv {errs[3]:.1e}",
                flush=True,
            )
    return ok


def main(argv=None):
    platform = jax.default_backend()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq-lens", default="8192,32768", help="timed sequence lengths (GPU / TPU only)")
    p.add_argument("--window", type=int, default=4096, help="sliding window W of the local layer")
    p.add_argument("--tokens", type=int, default=32768, help="batch = max(1, tokens // S)")
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--rope-theta", type=float, default=10000.0)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--check", action="store_true", help="only compare the kernel with the reference, then exit")
    args = p.parse_args(argv)

    if args.check:
        sys.exit(0 if run_checks(platform) else 1)
    print_plan(args)
    if platform == "cpu":
        print("\n# no GPU / TPU: timings skipped (the kernel only runs in interpret mode here)")
        return
    print_timings(args, platform)


if __name__ == "__main__":
    main()
