"""Public flash attention with RoPE fused in for RoPE layers; one kernel for RoPE and NoPE layers.

`rope` is a static flag: a RoPE layer compiles a variant that rotates q and k
tiles in fp32 as they are loaded (no rotated copies in HBM) and a NoPE layer
compiles one with no rotation work at all (SmolLM3 puts a NoPE layer every
4th layer; the causal mask alone carries order there). The backward pass is a
flash backward (a dK/dV kernel and a dQ kernel) that recomputes the rotated
tiles and rotates dq and dk back before writing them.

Layer options, all static: sliding_window (local layers), chunk_size
(Llama 4 chunked layers), partial_rotary_factor, rope_layout ("half" or
"interleaved") and nope_temperature (Llama 4's query scale on NoPE layers).
Local and chunked layers launch grids over the band of blocks they can see
only; describe() / grid_steps() report what a call would launch.

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
from jax import lax

from nopejax.kernels import cost, gpu, tile, tpu
from nopejax.kernels.tile import TileConfig

SUPPORTED_HEAD_DIMS = (64, 128, 256)

# (forward block_q, block_k, backward block_q, block_k) per backend.
_DEFAULT_BLOCKS = {"tpu": (512, 512, 512, 512), "gpu": (128, 64, 64, 64)}
# GPU rows of 512 bytes or more (E = 256 in bf16 or fp32): half the tiles, or Triton's double-buffered k/v
# (forward) and q/dO (dK/dV) tiles exceed an H100/H200's 227 KiB of shared memory (measured on an H200:
# 289 KiB requested in fp32, 240 KiB in bf16; fp32 passes the --check matrix with these blocks, and bf16
# at the same blocks needs half its bytes).
_WIDE_ROW_GPU_BLOCKS = (64, 32, 32, 32)


@dataclasses.dataclass(frozen=True)
class _Plan:
    cfg: TileConfig
    backend: str
    blocks: tuple[int, int, int, int]
    interpret: bool


def flash_attention(
    q,  # [B, S, Hq, E], or [B, Sq, Hq, E]: the last Sq of the S tokens (suffix queries)
    k,  # [B, S, Hkv, E]
    v,  # [B, S, Hkv, E]
    *,
    segment_ids=None,  # [B, S] int: packed documents never attend across ids
    positions=None,  # [B, S] int: RoPE positions (restarting per document); default arange(S) per row
    rope: bool = True,
    rope_theta: float = 10000.0,
    causal: bool = True,
    interpret: bool = False,
    sliding_window: int | None = None,
    chunk_size: int | None = None,
    partial_rotary_factor: float = 1.0,
    rope_layout: str = "half",
    nope_temperature: tuple[float, float] | None = None,
    sm_scale: float | None = None,
    inv_freq=None,  # [rot_dim // 2] fp32, overrides rope_theta (YaRN / linear scaling)
    rope_attention_factor: float = 1.0,
    block_q: int | None = None,
    block_k: int | None = None,
    backend: str | None = None,
):
    """Flash attention over [B, S, H, E] inputs; returns o [B, S, Hq, E] in q's dtype.

    GQA: q head h attends with kv head h // (Hq // Hkv); k and v are never repeated.
    Suffix queries (context parallelism): q may have fewer rows than k when causal; they are
    then the last Sq tokens of k's sequence (q row i is token S - Sq + i), positions and
    segment ids are given for all S tokens, and on TPU Sq and S must be multiples of 128.
    On CPU pass interpret=True: the TPU kernel form under Pallas's HLO interpreter, which turns the
    kernel body into XLA ops. (Not the TPU interpreter, pltpu.InterpretParams: it runs the body
    through io_callbacks, and XLA:CPU (jax 0.10) deadlocks when several devices each run independent
    io_callbacks on arguments of 100 KiB or more, as a multi-device train step with the kernel does.)
    `positions`, `segment_ids` and `inv_freq` are not differentiated. All layer options are static.

    Layer options (HF semantics, each document of a packed row behaving as if it were alone):
      sliding_window=W: key j visible to query i iff pos_i - W < pos_j <= pos_i (same document).
      chunk_size=C: visible iff causal and pos_i // C == pos_j // C (Llama 4 chunked attention).
        Both compare `positions` when given, else the sequence index. The kernel walks only the
        blocks of the band i - W < j <= i in sequence index, which holds every visible key as long
        as positions grow by at least 1 per token inside a document (arange, or restarting at 0 per
        document); keys visible by position but outside that band (e.g. repeated positions) are
        not seen. Both need causal=True.
      partial_rotary_factor=f: rotate the first rot_dim = int(f * E) dims (even), frequencies
        over rot_dim (inv_freq then has rot_dim // 2 entries); the rest pass through.
      rope_layout: "half" rotates (x[i], x[i + rot_dim/2]) (rotate_half, Llama / SmolLM3);
        "interleaved" rotates adjacent pairs (x[2i], x[2i+1]) (Cohere2, Llama 4). The kernel runs
        the half form on q and k with their rotated dims de-interleaved (a permutation applied to
        both leaves q.k unchanged).
      nope_temperature=(floor_scale, attn_scale): NoPE layers only (rope=False): logits of the
        query at position p are scaled by log1p(floor((p + 1) / floor_scale)) * attn_scale + 1,
        the same as scaling q (Llama 4).
    """
    B, S, Hq, E, Hkv = _check_shapes(q, k, v, segment_ids, positions, causal)
    backend = _resolve_backend(backend, interpret)
    Sq = q.shape[1]
    if Sq != S and backend != "tpu":
        raise ValueError("suffix queries (fewer q rows than k rows) run on the TPU form only; use the XLA path")
    rot_dim = _check_layer_options(
        E, rope, causal, sliding_window, chunk_size, partial_rotary_factor, rope_layout, nope_temperature, backend
    )
    if sm_scale is None:
        sm_scale = E**-0.5
    positions_given = positions is not None
    needs_positions = rope or chunk_size is not None or nope_temperature is not None
    if needs_positions or (sliding_window is not None and positions_given):
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))
        positions = positions.astype(jnp.int32)
    else:
        positions = None  # nothing position-dependent reaches the kernel
    if rope:
        if inv_freq is None:
            inv_freq = 1.0 / (rope_theta ** (jnp.arange(0, rot_dim, 2, dtype=jnp.float32) / rot_dim))
        inv_freq = jnp.asarray(inv_freq, jnp.float32)
        if inv_freq.shape != (rot_dim // 2,):
            raise ValueError(
                f"inv_freq must have shape (rot_dim//2,) = ({rot_dim // 2},) for head_dim {E} and "
                f"partial_rotary_factor {partial_rotary_factor}; got {inv_freq.shape}"
            )
        if rope_layout == "interleaved":
            q, k = _deinterleave(q, rot_dim), _deinterleave(k, rot_dim)
    else:
        inv_freq = None
    if segment_ids is not None:
        segment_ids = segment_ids.astype(jnp.int32)
    chunk_ids = None if chunk_size is None else lax.div(positions, jnp.int32(chunk_size))
    temperature = None
    if nope_temperature is not None:
        floor_scale, attn_scale = nope_temperature
        temperature = jnp.log1p(jnp.floor((positions.astype(jnp.float32) + 1.0) / floor_scale)) * attn_scale + 1.0

    plan = _make_plan(
        S, E, Hq // Hkv, backend, block_q, block_k, bool(interpret), causal=causal, sm_scale=sm_scale, rope=rope,
        rope_factor=rope_attention_factor, rot_dim=rot_dim, has_segments=segment_ids is not None,
        window=sliding_window, chunk=chunk_size, positions_given=positions_given,
        has_temperature=temperature is not None, row_bytes=E * q.dtype.itemsize, q_len=Sq,
    )  # fmt: skip
    Sp = plan.cfg.padded_len
    if Sp != S:  # pad to whole blocks; padded keys are masked, padded query rows dropped
        pad = lambda x: None if x is None else jnp.pad(x, [(0, 0), (0, Sp - S)] + [(0, 0)] * (x.ndim - 2))
        q, k, v, positions, segment_ids, chunk_ids, temperature = map(
            pad, (q, k, v, positions, segment_ids, chunk_ids, temperature)
        )
    o = _flash(q, k, v, (positions, inv_freq, segment_ids, chunk_ids, temperature), plan)
    return o[:, :S] if Sp != S else o


def _deinterleave(x_BSHE, rot_dim: int):
    """Rotated dims from pair order (x0, x1, x2, x3, ...) to half order (x0, x2, ..., x1, x3, ...)."""
    B, S, H, E = x_BSHE.shape
    rot = x_BSHE[..., :rot_dim].reshape(B, S, H, rot_dim // 2, 2).swapaxes(-1, -2).reshape(B, S, H, rot_dim)
    return rot if rot_dim == E else jnp.concatenate([rot, x_BSHE[..., rot_dim:]], axis=-1)


def _make_plan(
    S, E, num_groups, backend, block_q, block_k, interpret, *, causal, sm_scale, rope, rope_factor, rot_dim,
    has_segments, window, chunk, positions_given, has_temperature, row_bytes, q_len=None,
) -> _Plan:  # fmt: skip
    suffix = q_len is not None and q_len != S
    if suffix:
        blocks = _suffix_blocks(S, q_len, block_q, block_k)
    else:
        blocks = _resolve_blocks(backend, S, block_q, block_k, row_bytes)
    cfg = TileConfig(
        causal=bool(causal),
        sm_scale=float(sm_scale),
        rope=bool(rope),
        rope_factor=float(rope_factor),
        head_dim=E,
        num_groups=num_groups,
        seq_len=S,
        padded_len=_round_up(S, math.lcm(*blocks)),
        has_segments=has_segments,
        join_halves=backend == "tpu",
        rope_tables=bool(rope) and backend == "gpu",
        rot_dim=rot_dim if rope else 0,
        window=window,
        chunk=chunk,
        window_on_positions=window is not None and positions_given,
        chunk_by_index=chunk is not None and not positions_given,
        has_temperature=has_temperature,
        q_offset=S - q_len if suffix else 0,
        q_padded_len=q_len if suffix else None,
    )
    return _Plan(cfg=cfg, backend=backend, blocks=blocks, interpret=interpret)


def _suffix_blocks(S: int, Sq: int, block_q, block_k) -> tuple[int, int, int, int]:
    """TPU blocks for suffix queries: the largest of 512, 256, 128 dividing both lengths, so neither
    is padded (padding would move the queries off the end of the keys)."""
    for b in (512, 256, tpu.LANES):
        if Sq % b == 0 and S % b == 0 and all(u is None or u == b for u in (block_q, block_k)):
            return (b, b, b, b)
    raise ValueError(
        f"suffix queries need q rows ({Sq}) and k rows ({S}) that are multiples of {tpu.LANES} on TPU "
        "(and block_q = block_k, if given, one of 512/256/128 dividing both)"
    )


def describe(
    seq_len: int,
    *,
    batch: int = 1,
    num_heads: int = 1,
    num_kv_heads: int = 1,
    head_dim: int = 128,
    dtype=jnp.bfloat16,
    causal: bool = True,
    rope: bool = True,
    sliding_window: int | None = None,
    chunk_size: int | None = None,
    packed: bool = False,
    block_q: int | None = None,
    block_k: int | None = None,
    backend: str = "tpu",
) -> dict[str, dict]:
    """What flash_attention would launch for these shapes, without running it.

    Per kernel ("forward", "dkv", "dq"): "steps" (TPU: grid steps, the product of "grid";
    GPU: inner-loop iterations over all programs, "grid" being the program grid) and the
    pl.CostEstimate fields "flops", "transcendentals", "bytes_accessed". `packed` = positions
    are passed (windows and chunks then compare positions, and chunks use the band grid).
    """
    E = head_dim
    _check_layer_options(E, rope, causal, sliding_window, chunk_size, 1.0, "half", None, backend)
    plan = _make_plan(
        seq_len, E, num_heads // num_kv_heads, backend, block_q, block_k, False, causal=causal, sm_scale=E**-0.5,
        rope=rope, rope_factor=1.0, rot_dim=E, has_segments=packed, window=sliding_window, chunk=chunk_size,
        positions_given=packed, has_temperature=False, row_bytes=E * jnp.dtype(dtype).itemsize,
    )  # fmt: skip
    cfg, (bq, bk, bq_b, bk_b) = plan.cfg, plan.blocks
    Sp = cfg.padded_len
    q = jax.ShapeDtypeStruct((batch, Sp, num_heads, E), dtype)
    kv = jax.ShapeDtypeStruct((batch, Sp, num_kv_heads, E), dtype)
    costs = {
        "forward": cost.forward(q, kv, cfg, bq, bk),
        "dkv": cost.backward_dkv(q, kv, cfg, bq_b, bk_b),
        "dq": cost.backward_dq(q, kv, cfg, bq_b, bk_b),
    }
    if backend == "tpu":
        grids = tpu.grids(batch, num_heads, cfg, bq, bk, bq_b, bk_b)
        steps = {name: math.prod(g) for name, g in grids.items()}
    else:
        grids = {
            "forward": (Sp // bq, batch, num_heads),
            "dkv": (Sp // bk_b, batch, num_kv_heads),
            "dq": (Sp // bq_b, batch, num_heads),
        }
        steps = gpu.loop_steps(batch, num_heads, cfg, bq, bk, bq_b, bk_b)
    return {
        name: dict(
            grid=grids[name],
            steps=steps[name],
            flops=costs[name].flops,
            transcendentals=costs[name].transcendentals,
            bytes_accessed=costs[name].bytes_accessed,
        )
        for name in ("forward", "dkv", "dq")
    }


def grid_steps(seq_len: int, **kwargs) -> dict[str, int]:
    """Steps per kernel ("forward", "dkv", "dq") flash_attention runs; kwargs as for describe()."""
    return {name: d["steps"] for name, d in describe(seq_len, **kwargs).items()}


# ----------------------------------------------------------------------------- custom_vjp


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _flash(q, k, v, extras, plan: _Plan):
    return _flash_fwd(q, k, v, extras, plan)[0]


def _impl(plan: _Plan):
    return tpu if plan.backend == "tpu" else gpu


def _flash_fwd(q, k, v, extras, plan: _Plan):
    bq, bk, _, _ = plan.blocks
    side = tile.side_inputs(plan.cfg, *extras)
    o, lse = _impl(plan).forward(q, k, v, side, plan.cfg, bq, bk, plan.interpret)
    return o, (q, k, v, extras, o, lse)


def _flash_bwd(plan: _Plan, res, do):
    q, k, v, extras, o, lse = res
    _, _, bq, bk = plan.blocks
    do = do.astype(q.dtype)
    # di = rowsum(dO * O), the softmax-backward correction; one fused XLA reduction.
    di = jnp.einsum("bshd,bshd->bhs", o.astype(jnp.float32), do.astype(jnp.float32))[..., None]
    impl, interpret = _impl(plan), plan.interpret
    side = tile.side_inputs(plan.cfg, *extras)
    args = (q, k, v, do, lse, di, side, plan.cfg, bq, bk, interpret)
    dk, dv = impl.backward_dkv(*args)
    dq = impl.backward_dq(*args)
    return dq, dk, dv, tuple(None for _ in extras)


_flash.defvjp(_flash_fwd, _flash_bwd)


# ----------------------------------------------------------------------------- validation


def _check_shapes(q, k, v, segment_ids, positions, causal=True):
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(
            "q, k, v must be [batch, seq, heads, head_dim]; "
            f"got q{tuple(q.shape)}, k{tuple(k.shape)}, v{tuple(v.shape)}"
        )
    B, Sq, Hq, E = q.shape
    S = k.shape[1]
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape; got k{tuple(k.shape)}, v{tuple(v.shape)}")
    if k.shape[0] != B or k.shape[3] != E or not (Sq == S or (causal and Sq < S)):
        raise ValueError(
            f"k/v must be [B, S, Hkv, E] with q's B={B}, S={Sq}, E={E} (self-attention; or, causal, more "
            f"rows than q: q is then their suffix); got k{tuple(k.shape)}"
        )
    Hkv = k.shape[2]
    if E not in SUPPORTED_HEAD_DIMS:
        raise ValueError(
            f"head_dim E={E} is not supported by the flash kernel; use one of {SUPPORTED_HEAD_DIMS} "
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
    return B, S, Hq, E, Hkv


def _check_layer_options(
    E, rope, causal, sliding_window, chunk_size, partial_rotary_factor, rope_layout, nope_temperature, backend
) -> int:
    """Validate the static layer options; returns the rotated width rot_dim."""
    for name, value in (("sliding_window", sliding_window), ("chunk_size", chunk_size)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be an int >= 1 (or None for a global layer); got {value!r}")
    if sliding_window is not None and chunk_size is not None:
        raise ValueError("set sliding_window (local layer) or chunk_size (chunked layer), not both")
    if (sliding_window is not None or chunk_size is not None) and not causal:
        raise ValueError("sliding_window and chunk_size need causal=True (HF local and chunked layers are causal)")
    if rope_layout not in ("half", "interleaved"):
        raise ValueError(
            f"rope_layout must be 'half' (rotate_half) or 'interleaved' (adjacent pairs); got {rope_layout!r}"
        )
    if not 0.0 < partial_rotary_factor <= 1.0:
        raise ValueError(f"partial_rotary_factor must be in (0, 1]; got {partial_rotary_factor}")
    rot_dim = int(E * partial_rotary_factor)
    if rot_dim < 2 or rot_dim % 2:
        raise ValueError(
            f"partial_rotary_factor {partial_rotary_factor} gives rot_dim = int({E} * f) = {rot_dim}; "
            "it must be even and >= 2: choose f so that f * head_dim is even"
        )
    if nope_temperature is not None:
        if rope:
            raise ValueError(
                "nope_temperature applies to NoPE layers only (rope=False), as in Llama 4; "
                "pass nope_temperature=None for RoPE layers"
            )
        if len(nope_temperature) != 2 or not float(nope_temperature[0]) > 0:
            raise ValueError(f"nope_temperature must be (floor_scale > 0, attn_scale); got {nope_temperature!r}")
    if backend == "gpu" and rope:
        half, rest = rot_dim // 2, E - rot_dim
        # Triton tiles are powers of two, and tl.dot needs at least 16 along the contraction.
        if half < 16 or half & (half - 1) or (rest and rest % 16):
            raise ValueError(
                f"on GPU, rot_dim = {rot_dim} (partial_rotary_factor {partial_rotary_factor} of head_dim {E}) "
                "must make rot_dim/2 a power of two >= 16 and head_dim - rot_dim a multiple of 16; "
                "use the XLA attention path for this layer"
            )
    return rot_dim


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


def _resolve_blocks(backend: str, S: int, block_q, block_k, row_bytes: int) -> tuple[int, int, int, int]:
    defaults = _WIDE_ROW_GPU_BLOCKS if backend == "gpu" and row_bytes >= 512 else _DEFAULT_BLOCKS[backend]
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
