"""Mosaic TPU lowering: forward, dK/dV and dQ pallas_calls over the shared tile math.

The kv (or q) sequence is the innermost, "arbitrary" grid axis; running
softmax statistics and fp32 accumulators live in VMEM scratch across it, as
in JAX's own TPU flash attention. Tiles above the causal diagonal are skipped
with pl.when and their index maps are clamped to the last (first) needed
block, so the pipeline does not DMA them either.

Layout: a head's [S, D] slab is read straight from [B, S, H*D] (a free
reshape of [B, S, H, D]) when D is a multiple of 128, Mosaic's lane width.
Smaller head dims cannot be cut out of that view (a block's last dim must be
a multiple of 128 or the whole axis), so they go through a [B, H, S, D]
transpose instead. Positions and segment ids are passed as [B, S, 1] (rows
of a tile) and [B, 1, S] (columns) views, never broadcast in HBM.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from nopejax.kernels import cost, tile
from nopejax.kernels.tile import TileConfig

LANES = 128

# Index maps and program ids are non-negative, so lax.div / lax.rem suffice; jnp's `//` and `%` add sign
# fix-ups that Mosaic only lowers with a real TPU attached (ahead-of-time compiles on a CPU host fail).


def _flat_heads(cfg: TileConfig) -> bool:
    return cfg.head_dim % LANES == 0


def to_kernel_layout(x_BSHD, cfg: TileConfig):
    B, S, H, D = x_BSHD.shape
    return x_BSHD.reshape(B, S, H * D) if _flat_heads(cfg) else x_BSHD.transpose(0, 2, 1, 3)


def from_kernel_layout(x, H: int, cfg: TileConfig):
    if _flat_heads(cfg):
        B, S, HD = x.shape
        return x.reshape(B, S, H, HD // H)
    return x.transpose(0, 2, 1, 3)


def _head_spec(cfg: TileConfig, rows: int, index):
    """BlockSpec of one head's [rows, D] tile; index(*grid) -> (batch, head, row block)."""
    D = cfg.head_dim
    if _flat_heads(cfg):
        return pl.BlockSpec((None, rows, D), lambda *g: (lambda b, h, r: (b, r, h))(*index(*g)))
    return pl.BlockSpec((None, None, rows, D), lambda *g: (lambda b, h, r: (b, h, r, 0))(*index(*g)))


def _row_spec(rows: int, index):  # [B, S, 1] -> [rows, 1]; index(*grid) -> (batch, row block)
    return pl.BlockSpec((None, rows, 1), lambda *g: (*index(*g), 0))


def _col_spec(cols: int, index):  # [B, 1, S] -> [1, cols]
    return pl.BlockSpec((None, 1, cols), lambda *g: (lambda b, c: (b, 0, c))(*index(*g)))


def _stat_spec(rows: int, index):  # [B, Hq, S, 1] -> [rows, 1]; index -> (batch, head, row block)
    return pl.BlockSpec((None, None, rows, 1), lambda *g: (*index(*g), 0))


def _side_inputs(cfg, positions, inv_freq, segment_ids, q_index, k_index, bq, bk):
    """Specs and arrays for positions / inv_freq (RoPE only) and segment ids (if any)."""
    names, specs, arrays = [], [], []
    if cfg.rope:
        pos_BS1 = positions[:, :, None]
        names += ["q_pos", "k_pos", "inv_freq"]
        specs += [
            _row_spec(bq, q_index),
            _row_spec(bk, k_index),
            pl.BlockSpec((1, cfg.head_dim // 2), lambda *g: (0, 0)),
        ]
        arrays += [pos_BS1, pos_BS1, inv_freq[None, :]]
    if cfg.has_segments:
        names += ["q_seg", "k_seg"]
        specs += [_row_spec(bq, q_index), _col_spec(bk, k_index)]
        arrays += [segment_ids[:, :, None], segment_ids[:, None, :]]
    return names, specs, arrays


def _rot(r, which, cfg):
    if not cfg.rope:
        return None
    return tile.rope_cos_sin(r[which + "_pos"][...], r["inv_freq"][...], cfg.rope_factor)


def _segs(r):
    if "q_seg" not in r:
        return None, None
    return r["q_seg"][...], r["k_seg"][...]


def _params(interpret):
    return dict(
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        interpret=interpret,
    )


# ----------------------------------------------------------------------------- forward


def _fwd_kernel(*refs, names, cfg: TileConfig, bq: int, bk: int):
    r = dict(zip(names, refs))
    qi, ki, nk = pl.program_id(2), pl.program_id(3), pl.num_programs(3)
    q_start, k_start = qi * bq, ki * bk
    all_rows = slice(None)

    @pl.when(ki == 0)
    def _init():
        r["m"][...] = jnp.full((bq, 1), -jnp.inf, jnp.float32)
        r["denom"][...] = jnp.zeros((bq, 1), jnp.float32)
        r["acc"][...] = jnp.zeros((bq, cfg.head_dim), jnp.float32)
        if cfg.rope:  # rotate q once per q tile, reused for every kv tile
            (r["q_rot"][...],) = tile.load_tile(r["q"], all_rows, 0, cfg, _rot(r, "q", cfg))

    @pl.when(tile.needs_run(q_start, bq, k_start, cfg))
    def _step():
        q_parts = (r["q_rot"][...],) if cfg.rope else (r["q"][...],)
        k_parts = tile.load_tile(r["k"], all_rows, 0, cfg, _rot(r, "k", cfg))
        s = tile.mask_tile(tile.scores(q_parts, k_parts, cfg), q_start, k_start, cfg, *_segs(r))
        m, denom, acc = tile.online_softmax_step(s, r["m"][...], r["denom"][...], r["acc"][...], r["v"][...])
        r["m"][...], r["denom"][...], r["acc"][...] = m, denom, acc

    @pl.when(ki == nk - 1)
    def _finish():
        o, lse = tile.finish_softmax(r["m"][...], r["denom"][...], r["acc"][...])
        r["o"][...] = o.astype(r["o"].dtype)
        r["lse"][...] = lse


def _last_kv_block(qi, bq, bk):
    return lax.div(qi * bq + bq - 1, bk)


def _q_major_index_maps(cfg: TileConfig, bq: int, bk: int):
    """Block index maps of the grid (B, Hq, q blocks, kv blocks), shared by forward and dQ."""

    def q_index(b, h, i, j):
        return b, h, i

    def k_index(b, h, i, j):
        # Clamp skipped (above-diagonal) steps to the last needed block: same block index, no new DMA.
        return b, lax.div(h, cfg.num_groups), (jnp.minimum(j, _last_kv_block(i, bq, bk)) if cfg.causal else j)

    def row_q(b, h, i, j):
        return b, i

    def row_k(b, h, i, j):
        return b, k_index(b, h, i, j)[2]

    return q_index, k_index, row_q, row_k


def forward(q, k, v, positions, inv_freq, segment_ids, cfg: TileConfig, bq: int, bk: int, interpret):
    """q [B,S,Hq,D], k/v [B,S,Hkv,D] (S padded) -> o [B,S,Hq,D], lse [B,Hq,S,1] (base 2)."""
    B, S, Hq, D = q.shape
    nq, nk = S // bq, S // bk

    q_index, k_index, row_q, row_k = _q_major_index_maps(cfg, bq, bk)
    side_names, side_specs, side_arrays = _side_inputs(cfg, positions, inv_freq, segment_ids, row_q, row_k, bq, bk)
    names = ["q", "k", "v", *side_names, "o", "lse", "m", "denom", "acc"] + (["q_rot"] if cfg.rope else [])
    scratch = [pltpu.VMEM((bq, 1), jnp.float32), pltpu.VMEM((bq, 1), jnp.float32), pltpu.VMEM((bq, D), jnp.float32)]
    if cfg.rope:
        scratch.append(pltpu.VMEM((bq, D), q.dtype))
    out_shape = [
        jax.ShapeDtypeStruct(to_kernel_layout(q, cfg).shape, q.dtype),
        jax.ShapeDtypeStruct((B, Hq, S, 1), jnp.float32),
    ]
    o, lse = pl.pallas_call(
        functools.partial(_fwd_kernel, names=names, cfg=cfg, bq=bq, bk=bk),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=0,
            grid=(B, Hq, nq, nk),
            in_specs=[
                _head_spec(cfg, bq, q_index),
                _head_spec(cfg, bk, k_index),
                _head_spec(cfg, bk, k_index),
                *side_specs,
            ],
            out_specs=[_head_spec(cfg, bq, q_index), _stat_spec(bq, q_index)],
            scratch_shapes=scratch,
        ),
        out_shape=out_shape,
        cost_estimate=cost.forward(q, k, cfg, bq, bk),
        name="nopejax_flash_fwd" + ("_rope" if cfg.rope else "_nope"),
        **_params(interpret),
    )(to_kernel_layout(q, cfg), to_kernel_layout(k, cfg), to_kernel_layout(v, cfg), *side_arrays)
    return from_kernel_layout(o, Hq, cfg), lse


# ----------------------------------------------------------------------------- backward: dK, dV


def _dkv_kernel(*refs, names, cfg: TileConfig, bq: int, bk: int, nq: int):
    r = dict(zip(names, refs))
    ki, j, nj = pl.program_id(2), pl.program_id(3), pl.num_programs(3)
    q_start, k_start = lax.rem(j, nq) * bq, ki * bk
    all_rows = slice(None)

    @pl.when(j == 0)
    def _init():
        r["dk"][...] = jnp.zeros((bk, cfg.head_dim), jnp.float32)
        r["dv"][...] = jnp.zeros((bk, cfg.head_dim), jnp.float32)
        if cfg.rope:  # k is fixed along this axis: rotate it once
            (r["k_rot"][...],) = tile.load_tile(r["k"], all_rows, 0, cfg, _rot(r, "k", cfg))

    @pl.when(tile.needs_run(q_start, bq, k_start, cfg))
    def _step():
        k_parts = (r["k_rot"][...],) if cfg.rope else (r["k"][...],)
        q_parts = tile.load_tile(r["q"], all_rows, 0, cfg, _rot(r, "q", cfg))
        s = tile.mask_tile(tile.scores(q_parts, k_parts, cfg), q_start, k_start, cfg, *_segs(r))
        do = r["do"][...]
        p, ds = tile.probs_and_dlogits(s, r["lse"][...], do, r["v"][...], r["di"][...])
        (dv,) = tile.dot_t_parts(p, (do,))
        (dk,) = tile.dot_t_parts(ds, q_parts)
        r["dv"][...] += dv
        r["dk"][...] += dk

    @pl.when(j == nj - 1)
    def _finish():
        r["dv_out"][...] = r["dv"][...].astype(r["dv_out"].dtype)
        tile.store_tile(r["dk_out"], all_rows, 0, (r["dk"][...] * cfg.sm_scale,), cfg, _rot(r, "k", cfg))


def backward_dkv(q, k, v, do, lse, di, positions, inv_freq, segment_ids, cfg: TileConfig, bq, bk, interpret):
    """dk, dv [B,S,Hkv,D]; a kv head accumulates over its q-head group in-kernel (no repeated k/v)."""
    B, S, Hkv, D = k.shape
    G = cfg.num_groups
    nq, nk = S // bq, S // bk

    def q_block(i, j):
        qi = lax.rem(j, nq)
        return jnp.maximum(qi, lax.div(i * bk, bq)) if cfg.causal else qi  # clamp skipped steps to the first needed

    def q_index(b, h, i, j):
        return b, h * G + lax.div(j, nq), q_block(i, j)

    def k_index(b, h, i, j):
        return b, h, i

    def row_q(b, h, i, j):
        return b, q_block(i, j)

    def row_k(b, h, i, j):
        return b, i

    side_names, side_specs, side_arrays = _side_inputs(cfg, positions, inv_freq, segment_ids, row_q, row_k, bq, bk)
    names = ["q", "k", "v", "do", "lse", "di", *side_names, "dk_out", "dv_out", "dk", "dv"]
    scratch = [pltpu.VMEM((bk, D), jnp.float32), pltpu.VMEM((bk, D), jnp.float32)]
    if cfg.rope:
        names.append("k_rot")
        scratch.append(pltpu.VMEM((bk, D), k.dtype))
    kv_shape = jax.ShapeDtypeStruct(to_kernel_layout(k, cfg).shape, k.dtype)
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, names=names, cfg=cfg, bq=bq, bk=bk, nq=nq),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=0,
            grid=(B, Hkv, nk, G * nq),
            in_specs=[
                _head_spec(cfg, bq, q_index),
                _head_spec(cfg, bk, k_index),
                _head_spec(cfg, bk, k_index),
                _head_spec(cfg, bq, q_index),
                _stat_spec(bq, q_index),
                _stat_spec(bq, q_index),
                *side_specs,
            ],
            out_specs=[_head_spec(cfg, bk, k_index), _head_spec(cfg, bk, k_index)],
            scratch_shapes=scratch,
        ),
        out_shape=[kv_shape, kv_shape],
        cost_estimate=cost.backward_dkv(q, k, cfg, bq, bk),
        name="nopejax_flash_dkv" + ("_rope" if cfg.rope else "_nope"),
        **_params(interpret),
    )(*(to_kernel_layout(x, cfg) for x in (q, k, v, do)), lse, di, *side_arrays)
    return from_kernel_layout(dk, Hkv, cfg), from_kernel_layout(dv, Hkv, cfg)


# ----------------------------------------------------------------------------- backward: dQ


def _dq_kernel(*refs, names, cfg: TileConfig, bq: int, bk: int):
    r = dict(zip(names, refs))
    qi, ki, nk = pl.program_id(2), pl.program_id(3), pl.num_programs(3)
    q_start, k_start = qi * bq, ki * bk
    all_rows = slice(None)

    @pl.when(ki == 0)
    def _init():
        r["dq"][...] = jnp.zeros((bq, cfg.head_dim), jnp.float32)
        if cfg.rope:
            (r["q_rot"][...],) = tile.load_tile(r["q"], all_rows, 0, cfg, _rot(r, "q", cfg))

    @pl.when(tile.needs_run(q_start, bq, k_start, cfg))
    def _step():
        q_parts = (r["q_rot"][...],) if cfg.rope else (r["q"][...],)
        k_parts = tile.load_tile(r["k"], all_rows, 0, cfg, _rot(r, "k", cfg))
        s = tile.mask_tile(tile.scores(q_parts, k_parts, cfg), q_start, k_start, cfg, *_segs(r))
        _, ds = tile.probs_and_dlogits(s, r["lse"][...], r["do"][...], r["v"][...], r["di"][...])
        (dq,) = tile.dot_parts(ds, k_parts)
        r["dq"][...] += dq

    @pl.when(ki == nk - 1)
    def _finish():
        tile.store_tile(r["dq_out"], all_rows, 0, (r["dq"][...] * cfg.sm_scale,), cfg, _rot(r, "q", cfg))


def backward_dq(q, k, v, do, lse, di, positions, inv_freq, segment_ids, cfg: TileConfig, bq, bk, interpret):
    """dq [B,S,Hq,D]."""
    B, S, Hq, D = q.shape
    nq, nk = S // bq, S // bk

    q_index, k_index, row_q, row_k = _q_major_index_maps(cfg, bq, bk)
    side_names, side_specs, side_arrays = _side_inputs(cfg, positions, inv_freq, segment_ids, row_q, row_k, bq, bk)
    names = ["q", "k", "v", "do", "lse", "di", *side_names, "dq_out", "dq"]
    scratch = [pltpu.VMEM((bq, D), jnp.float32)]
    if cfg.rope:
        names.append("q_rot")
        scratch.append(pltpu.VMEM((bq, D), q.dtype))
    (dq,) = pl.pallas_call(
        functools.partial(_dq_kernel, names=names, cfg=cfg, bq=bq, bk=bk),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=0,
            grid=(B, Hq, nq, nk),
            in_specs=[
                _head_spec(cfg, bq, q_index),
                _head_spec(cfg, bk, k_index),
                _head_spec(cfg, bk, k_index),
                _head_spec(cfg, bq, q_index),
                _stat_spec(bq, q_index),
                _stat_spec(bq, q_index),
                *side_specs,
            ],
            out_specs=[_head_spec(cfg, bq, q_index)],
            scratch_shapes=scratch,
        ),
        out_shape=[jax.ShapeDtypeStruct(to_kernel_layout(q, cfg).shape, q.dtype)],
        cost_estimate=cost.backward_dq(q, k, cfg, bq, bk),
        name="nopejax_flash_dq" + ("_rope" if cfg.rope else "_nope"),
        **_params(interpret),
    )(*(to_kernel_layout(x, cfg) for x in (q, k, v, do)), lse, di, *side_arrays)
    return from_kernel_layout(dq, Hq, cfg)
