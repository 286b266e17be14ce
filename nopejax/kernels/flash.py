"""Public flash attention with RoPE fused in for RoPE layers; one kernel for RoPE and NoPE layers.

`rope` is a static flag: a RoPE layer compiles a variant that rotates q and k
tiles in fp32 as they are loaded (no rotated copies in HBM) and a NoPE layer
compiles one with no rotation work at all (SmolLM3 puts a NoPE layer every
4th layer; the causal mask alone carries order there). The backward pass is a
flash backward (a dK/dV kernel and a dQ kernel) that recomputes the rotated
tiles and rotates dq and dk back before writing them.

This module validates inputs, pads the sequence to a whole number of blocks,
picks the backend and holds the custom_vjp; the kernels are in tpu.py (Mosaic
TPU) and gpu.py (Triton), their shared tile math in tile.py.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

from nopejax.kernels import gpu, tpu
from nopejax.kernels.tile import TileConfig

SUPPORTED_HEAD_DIMS = (64, 128, 256)

# (forward block_q, block_k, backward block_q, block_k) per backend.
_DEFAULT_BLOCKS = {"tpu": (512, 512, 512, 512), "gpu": (128, 64, 64, 64)}


@dataclasses.dataclass(frozen=True)
class _Plan:
    cfg: TileConfig
    backend: str
    blocks: tuple[int, int, int, int]
    interpret: bool


def flash_attention(
    q,  # [B, S, Hq, D]
    k,  # [B, S, Hkv, D]
    v,  # [B, S, Hkv, D]
    *,
    segment_ids=None,  # [B, S] int: packed documents never attend across ids
    positions=None,  # [B, S] int: RoPE positions; default arange(S) per row
    rope: bool = True,
    rope_theta: float = 10000.0,
    causal: bool = True,
    interpret: bool = False,
    sm_scale: float | None = None,
    inv_freq=None,  # [D // 2] fp32, overrides rope_theta (YaRN / linear scaling)
    rope_attention_factor: float = 1.0,
    block_q: int | None = None,
    block_k: int | None = None,
    backend: str | None = None,
):
    """Flash attention over [B, S, H, D] inputs; returns o [B, S, Hq, D] in q's dtype.

    GQA: q head h attends with kv head h // (Hq // Hkv); k and v are never repeated.
    On CPU pass interpret=True (TPU kernel form under Pallas's TPU interpreter).
    `positions`, `segment_ids` and `inv_freq` are not differentiated.
    """
    B, S, Hq, D, Hkv = _check_shapes(q, k, v, segment_ids, positions)
    backend = _resolve_backend(backend, interpret)
    if sm_scale is None:
        sm_scale = D**-0.5
    if rope:
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))
        if inv_freq is None:
            inv_freq = 1.0 / (rope_theta ** (jnp.arange(0, D, 2, dtype=jnp.float32) / D))
        inv_freq = jnp.asarray(inv_freq, jnp.float32)
        if inv_freq.shape != (D // 2,):
            raise ValueError(f"inv_freq must have shape (D//2,) = ({D // 2},); got {inv_freq.shape}")
        positions = positions.astype(jnp.int32)
    else:
        positions = inv_freq = None  # NoPE: nothing RoPE-related reaches the kernel
    if segment_ids is not None:
        segment_ids = segment_ids.astype(jnp.int32)

    blocks = _resolve_blocks(backend, S, block_q, block_k)
    Sp = _round_up(S, math.lcm(*blocks))
    cfg = TileConfig(
        causal=bool(causal),
        sm_scale=float(sm_scale),
        rope=bool(rope),
        rope_factor=float(rope_attention_factor),
        head_dim=D,
        num_groups=Hq // Hkv,
        seq_len=S,
        padded_len=Sp,
        has_segments=segment_ids is not None,
        join_halves=backend == "tpu",
    )
    plan = _Plan(cfg=cfg, backend=backend, blocks=blocks, interpret=bool(interpret))
    if Sp != S:  # pad to whole blocks; padded keys are masked, padded query rows dropped
        pad = lambda x: None if x is None else jnp.pad(x, [(0, 0), (0, Sp - S)] + [(0, 0)] * (x.ndim - 2))
        q, k, v, positions, segment_ids = map(pad, (q, k, v, positions, segment_ids))
    o = _flash(q, k, v, positions, inv_freq, segment_ids, plan)
    return o[:, :S] if Sp != S else o


# ----------------------------------------------------------------------------- custom_vjp


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _flash(q, k, v, positions, inv_freq, segment_ids, plan: _Plan):
    return _flash_fwd(q, k, v, positions, inv_freq, segment_ids, plan)[0]


def _impl(plan: _Plan):
    return tpu if plan.backend == "tpu" else gpu


def _interpret_arg(plan: _Plan):
    if not plan.interpret:
        return False
    if plan.backend == "tpu" and hasattr(_pltpu(), "InterpretParams"):
        return _pltpu().InterpretParams()
    return True


def _pltpu():
    from jax.experimental.pallas import tpu as pltpu

    return pltpu


def _flash_fwd(q, k, v, positions, inv_freq, segment_ids, plan: _Plan):
    bq, bk, _, _ = plan.blocks
    o, lse = _impl(plan).forward(q, k, v, positions, inv_freq, segment_ids, plan.cfg, bq, bk, _interpret_arg(plan))
    return o, (q, k, v, positions, inv_freq, segment_ids, o, lse)


def _flash_bwd(plan: _Plan, res, do):
    q, k, v, positions, inv_freq, segment_ids, o, lse = res
    _, _, bq, bk = plan.blocks
    do = do.astype(q.dtype)
    # di = rowsum(dO * O), the softmax-backward correction; one fused XLA reduction.
    di = jnp.einsum("bshd,bshd->bhs", o.astype(jnp.float32), do.astype(jnp.float32))[..., None]
    impl, interpret = _impl(plan), _interpret_arg(plan)
    args = (q, k, v, do, lse, di, positions, inv_freq, segment_ids, plan.cfg, bq, bk, interpret)
    dk, dv = impl.backward_dkv(*args)
    dq = impl.backward_dq(*args)
    return dq, dk, dv, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


# ----------------------------------------------------------------------------- validation


def _check_shapes(q, k, v, segment_ids, positions):
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(
            "q, k, v must be [batch, seq, heads, head_dim]; "
            f"got q{tuple(q.shape)}, k{tuple(k.shape)}, v{tuple(v.shape)}"
        )
    B, S, Hq, D = q.shape
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape; got k{tuple(k.shape)}, v{tuple(v.shape)}")
    if k.shape[0] != B or k.shape[1] != S or k.shape[3] != D:
        raise ValueError(
            f"k/v must be [B, S, Hkv, D] with q's B={B}, S={S}, D={D} (self-attention); got k{tuple(k.shape)}"
        )
    Hkv = k.shape[2]
    if D not in SUPPORTED_HEAD_DIMS:
        raise ValueError(
            f"head_dim D={D} is not supported by the flash kernel; use one of {SUPPORTED_HEAD_DIMS} "
            "or the XLA attention path"
        )
    if Hq % Hkv:
        raise ValueError(
            f"num q heads Hq={Hq} must be a multiple of num kv heads Hkv={Hkv} (GQA); choose Hkv dividing Hq"
        )
    if q.dtype != k.dtype or q.dtype != v.dtype:
        raise ValueError(f"q, k, v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    for name, x in (("segment_ids", segment_ids), ("positions", positions)):
        if x is not None and tuple(x.shape) != (B, S):
            raise ValueError(f"{name} must be [B, S] = [{B}, {S}]; got {tuple(x.shape)}")
    return B, S, Hq, D, Hkv


def _resolve_backend(backend, interpret) -> str:
    if backend is None:
        platform = jax.default_backend()
        if platform == "tpu":
            backend = "tpu"
        elif platform in ("gpu", "cuda", "rocm"):
            backend = "gpu"
        elif interpret:
            backend = "tpu"  # exercise the TPU form under Pallas's interpreter
        else:
            raise ValueError(
                f"flash_attention has no compiled Pallas lowering for platform {platform!r}; "
                "pass interpret=True (slow, for tests) or use the XLA attention path"
            )
    if backend not in ("tpu", "gpu"):
        raise ValueError(f"backend must be 'tpu', 'gpu' or None; got {backend!r}")
    return backend


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _resolve_blocks(backend: str, S: int, block_q, block_k) -> tuple[int, int, int, int]:
    defaults = _DEFAULT_BLOCKS[backend]
    chosen = (block_q, block_k, block_q, block_k)
    blocks = []
    for name, user, default in zip(("block_q", "block_k") * 2, chosen, defaults):
        b = default if user is None else int(user)
        if backend == "tpu":
            if b % tpu.LANES:
                raise ValueError(f"{name}={b} must be a multiple of {tpu.LANES} on TPU (the lane width)")
            b = min(b, _round_up(S, tpu.LANES))
        else:
            if b < 16 or b & (b - 1):
                raise ValueError(f"{name}={b} must be a power of two >= 16 on GPU (Triton tile shapes)")
            b = min(b, max(16, 1 << (S - 1).bit_length()))
        blocks.append(b)
    return tuple(blocks)
