"""Compiled-kernel correctness on a real accelerator: the Pallas flash kernel vs the fp32 reference.

    python benchmarks/gpu_kernel_check.py          # on a GPU or TPU host

Forward output and q/k/v gradients of `flash_attention` (compiled, not interpret mode) against
`reference_attention` in fp32, for RoPE and NoPE layers, GQA, packed documents and a sequence
that is not a multiple of the block. Prints one row per case with the max abs errors; exits
non-zero if any exceeds its tolerance (bf16 inputs: 2e-2 forward, 5e-2 gradients relative to
the gradient's scale).
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp

from nopejax.kernels import flash_attention, reference_attention

CASES = [
    # name, B, S, Hq, Hkv, D, rope, segments, dtype
    ("rope gqa", 2, 1024, 8, 2, 128, True, False, "bfloat16"),
    ("nope gqa", 2, 1024, 8, 2, 128, False, False, "bfloat16"),
    ("rope packed odd S", 2, 777, 4, 4, 64, True, True, "bfloat16"),
    ("rope fp32 D256", 1, 384, 4, 1, 256, True, False, "float32"),
]


def segments(B, S):
    # three documents per row, positions restarting in each
    cuts = jnp.array([0, S // 3, (2 * S) // 3], jnp.int32)
    idx = jnp.arange(S, dtype=jnp.int32)
    seg = 1 + jnp.sum(idx[:, None] >= cuts[None, 1:], axis=1)
    pos = idx - cuts[seg - 1]
    return jnp.broadcast_to(seg, (B, S)), jnp.broadcast_to(pos, (B, S))


def check(name, B, S, Hq, Hkv, D, rope, has_seg, dtype):
    ks = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(ks[0], (B, S, Hq, D), jnp.float32)
    k = jax.random.normal(ks[1], (B, S, Hkv, D), jnp.float32)
    v = jax.random.normal(ks[2], (B, S, Hkv, D), jnp.float32)
    ct = jax.random.normal(ks[3], (B, S, Hq, D), jnp.float32)
    seg, pos = segments(B, S) if has_seg else (None, None)
    kw = dict(segment_ids=seg, positions=pos, rope=rope, rope_theta=10000.0, causal=True)

    def loss(fn, q, k, v):
        return jnp.sum(fn(q, k, v).astype(jnp.float32) * ct)

    kern = lambda q, k, v: flash_attention(q.astype(dtype), k.astype(dtype), v.astype(dtype), **kw)
    ref = lambda q, k, v: reference_attention(q, k, v, **kw)
    _, g_k = jax.jit(jax.value_and_grad(lambda *a: loss(kern, *a), argnums=(0, 1, 2)))(q, k, v)
    _, g_r = jax.jit(jax.value_and_grad(lambda *a: loss(ref, *a), argnums=(0, 1, 2)))(q, k, v)
    out_k, out_r = jax.jit(kern)(q, k, v).astype(jnp.float32), jax.jit(ref)(q, k, v)
    err_o = float(jnp.max(jnp.abs(out_k - out_r)))
    errs_g = [float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(b)) + 1e-6)) for a, b in zip(g_k, g_r)]
    tol_o, tol_g = (2e-2, 5e-2) if dtype == "bfloat16" else (2e-3, 5e-3)
    ok = err_o <= tol_o and max(errs_g) <= tol_g
    grads = " ".join(f"{e:.2e}" for e in errs_g)
    print(f"| {name:<18} | {S:>5} | {dtype:<8} | {err_o:.2e} | {grads} | {'ok' if ok else 'FAIL'} |")
    return ok


def main():
    print(f"# {jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}")
    print("| case | S | dtype | max|o - ref| | rel max|dq,dk,dv - ref| | |")
    results = [check(*case) for case in CASES]
    sys.exit(0 if all(results) else 1)


if __name__ == "__main__":
    main()
