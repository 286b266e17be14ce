"""Mosaic TPU lowering: forward, dK/dV and dQ pallas_calls over the shared tile math.

The innermost, "arbitrary" grid axis walks the kv (or q) blocks a q (kv)
block can see: all of them for a global layer, only the band
tile.kv_block_range / q_block_range gives for a local or chunked layer, so a
local layer's grid has about S*W/(bq*bk) steps per head. Running softmax
statistics and fp32 accumulators live in VMEM scratch across it, as in JAX's
own TPU flash attention. Steps past a block's range (above the causal
diagonal, or the short bands at the start of the sequence) are skipped with
pl.when and their index maps are clamped to the last needed block, so the
pipeline does not DMA them either.

Layout: a head's [S, E] slab is read straight from [B, S, H*E] (a free
reshape of [B, S, H, E]) when E is a multiple of 128, Mosaic's lane width.
Smaller head dims cannot be cut out of that view (a block's last dim must be
a multiple of 128 or the whole axis), so they go through a [B, H, S, E]
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


def to_kernel_layout(x_BSHE, cfg: TileConfig):
    B, S, H, E = x_BSHE.shape
    return x_BSHE.reshape(B, S, H * E) if _flat_heads(cfg) else x_BSHE.transpose(0, 2, 1, 3)


def from_kernel_layout(x, H: int, cfg: TileConfig):
    if _flat_heads(cfg):
        B, S, HE = x.shape
        return x.reshape(B, S, H, HE // H)
    return x.transpose(0, 2, 1, 3)


def _head_spec(cfg: TileConfig, rows: int, index):
    """BlockSpec of one head's [rows, E] tile; index(*grid) -> (batch, head, row block)."""
    E = cfg.head_dim
    if _flat_heads(cfg):
        return pl.BlockSpec((None, rows, E), lambda *g: (lambda b, h, r: (b, r, h))(*index(*g)))
    return pl.BlockSpec((None, None, rows, E), lambda *g: (lambda b, h, r: (b, h, r, 0))(*index(*g)))


def _side_specs(side, q_index, k_index, bq: int, bk: int):
    """BlockSpecs of tile.side_inputs; q_index / k_index(*grid) -> (batch, row block)."""
    specs = []
    for _, kind, array in side:
        if kind == "q":  # [B, S, 1] -> [bq, 1]
            specs.append(pl.BlockSpec((None, bq, 1), lambda *g: (*q_index(*g), 0)))
        elif kind == "k":
            specs.append(pl.BlockSpec((None, bk, 1), lambda *g: (*k_index(*g), 0)))
        elif kind == "kc":  # [B, 1, S] -> [1, bk]
            specs.append(pl.BlockSpec((None, 1, bk), lambda *g: (lambda b, c: (b, 0, c))(*k_index(*g))))
        else:
            specs.append(pl.BlockSpec(array.shape, lambda *g, n=array.ndim: (0,) * n))
    return specs


def _stat_spec(rows: int, index):  # [B, Hq, S, 1] -> [rows, 1]; index -> (batch, head, row block)
    return pl.BlockSpec((None, None, rows, 1), lambda *g: (*index(*g), 0))


def _rot(r, which, cfg):
    if not cfg.rope:
        return None
    return tile.rope_cos_sin(r[which + "_pos"][...], r["c_inv_freq"][...], cfg.rope_factor)


def _sides(r, side):
    """Row values of the q tile's side inputs and column values of the kv tile's, by short name."""
    q_side = {n[2:]: r[n][...] for n, kind, _ in side if kind == "q"}
    k_side = {n[3:]: r[n][...] for n, kind, _ in side if kind == "kc"}
    return q_side, k_side


def _params(interpret):
    return dict(
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        interpret=interpret,
    )


# ----------------------------------------------------------------------------- grids


def grids(B: int, Hq: int, cfg: TileConfig, bq: int, bk: int, bq_bwd: int, bk_bwd: int):
    """Grid of the forward, dK/dV and dQ pallas_calls: the inner axis spans only the band of blocks."""
    Hkv = Hq // cfg.num_groups
    n_kv, _ = tile.band_sizes(cfg, bq, bk)
    n_kv_bwd, n_q_bwd = tile.band_sizes(cfg, bq_bwd, bk_bwd)
    return {
        "forward": (B, Hq, cfg.q_len // bq, n_kv),
        "dkv": (B, Hkv, cfg.padded_len // bk_bwd, cfg.num_groups * n_q_bwd),
        "dq": (B, Hq, cfg.q_len // bq_bwd, n_kv_bwd),
    }


def _q_major_maps(cfg: TileConfig, bq: int, bk: int):
    """Index maps of the grid (B, Hq, q block i, band step j), shared by forward and dQ.

    Step j visits kv block lo(i) + j; steps past the band's end (q blocks near the start have
    fewer blocks to see) are clamped to the last needed block: same block index, no new DMA.
    """

    def kv_block(i, j):
        lo, hi = tile.kv_block_range(i * bq, bq, cfg, bk)
        return jnp.minimum(lo + j, hi - 1)

    def q_index(b, h, i, j):
        return b, h, i

    def k_index(b, h, i, j):
        return b, lax.div(h, cfg.num_groups), kv_block(i, j)

    def row_q(b, h, i, j):
        return b, i

    def row_k(b, h, i, j):
        return b, kv_block(i, j)

    return q_index, k_index, row_q, row_k


# ----------------------------------------------------------------------------- forward


def _q_major_scores(r, side, cfg: TileConfig, q_start, k_start):
    """The masked score tile of the kernels that walk kv blocks for one q block (forward, dQ): q as
    rotated once at j == 0 (`q_rot`) or as read, k rotated per tile. -> (scores, q side inputs, k parts)."""
    q_side, k_side = _sides(r, side)
    q_parts = (r["q_rot"][...],) if cfg.rope else (r["q"][...],)
    k_parts = tile.load_tile(r["k"], slice(None), 0, cfg, _rot(r, "k", cfg))
    s = tile.mask_tile(tile.scores(q_parts, k_parts, cfg, q_side), q_start, k_start, cfg, q_side, k_side)
    return s, q_side, k_parts


def _fwd_kernel(*refs, names, side, cfg: TileConfig, bq: int, bk: int):
    r = dict(zip(names, refs))
    qi, j, nj = pl.program_id(2), pl.program_id(3), pl.num_programs(3)
    lo, hi = tile.kv_block_range(qi * bq, bq, cfg, bk)
    q_start, k_start = qi * bq, (lo + j) * bk
    all_rows = slice(None)

    @pl.when(j == 0)
    def _init():
        r["m"][...] = jnp.full((bq, 1), -jnp.inf, jnp.float32)
        r["denom"][...] = jnp.zeros((bq, 1), jnp.float32)
        r["acc"][...] = jnp.zeros((bq, cfg.head_dim), jnp.float32)
        if cfg.rope:  # rotate q once per q tile, reused for every kv tile
            (r["q_rot"][...],) = tile.load_tile(r["q"], all_rows, 0, cfg, _rot(r, "q", cfg))

    @pl.when(lo + j < hi)
    def _step():
        s, _, _ = _q_major_scores(r, side, cfg, q_start, k_start)
        m, denom, acc = tile.online_softmax_step(s, r["m"][...], r["denom"][...], r["acc"][...], r["v"][...])
        r["m"][...], r["denom"][...], r["acc"][...] = m, denom, acc

    @pl.when(j == nj - 1)
    def _finish():
        o, lse = tile.finish_softmax(r["m"][...], r["denom"][...], r["acc"][...])
        r["o"][...] = o.astype(r["o"].dtype)
        r["lse"][...] = lse


def forward(q, k, v, side, cfg: TileConfig, bq: int, bk: int, interpret):
    """q [B,S,Hq,E], k/v [B,S,Hkv,E] (S padded) -> o [B,S,Hq,E], lse [B,Hq,S,1] (base 2)."""
    B, S, Hq, E = q.shape
    grid = grids(B, Hq, cfg, bq, bk, bq, bk)["forward"]
    q_index, k_index, row_q, row_k = _q_major_maps(cfg, bq, bk)
    names = ["q", "k", "v", *(n for n, _, _ in side), "o", "lse", "m", "denom", "acc"]
    scratch = [pltpu.VMEM((bq, 1), jnp.float32), pltpu.VMEM((bq, 1), jnp.float32), pltpu.VMEM((bq, E), jnp.float32)]
    if cfg.rope:
        names.append("q_rot")
        scratch.append(pltpu.VMEM((bq, E), q.dtype))
    out_shape = [
        jax.ShapeDtypeStruct(to_kernel_layout(q, cfg).shape, q.dtype),
        jax.ShapeDtypeStruct((B, Hq, S, 1), jnp.float32),
    ]
    o, lse = pl.pallas_call(
        functools.partial(_fwd_kernel, names=names, side=side, cfg=cfg, bq=bq, bk=bk),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=0,
            grid=grid,
            in_specs=[
                _head_spec(cfg, bq, q_index),
                _head_spec(cfg, bk, k_index),
                _head_spec(cfg, bk, k_index),
                *_side_specs(side, row_q, row_k, bq, bk),
            ],
            out_specs=[_head_spec(cfg, bq, q_index), _stat_spec(bq, q_index)],
            scratch_shapes=scratch,
        ),
        out_shape=out_shape,
        cost_estimate=cost.forward(q, k, cfg, bq, bk),
        name="nopejax_flash_fwd" + _suffix(cfg),
        **_params(interpret),
    )(to_kernel_layout(q, cfg), to_kernel_layout(k, cfg), to_kernel_layout(v, cfg), *(a for _, _, a in side))
    return from_kernel_layout(o, Hq, cfg), lse


def _suffix(cfg: TileConfig) -> str:
    kind = "_local" if cfg.window is not None else "_chunked" if cfg.chunk is not None else ""
    return ("_rope" if cfg.rope else "_nope") + kind


# ----------------------------------------------------------------------------- backward: dK, dV


def _dkv_kernel(*refs, names, side, cfg: TileConfig, bq: int, bk: int, n_q: int):
    r = dict(zip(names, refs))
    ki, j, nj = pl.program_id(2), pl.program_id(3), pl.num_programs(3)
    lo, hi = tile.q_block_range(ki * bk, bk, cfg, bq)
    qb = lo + lax.rem(j, n_q)
    q_start, k_start = qb * bq, ki * bk
    all_rows = slice(None)

    @pl.when(j == 0)
    def _init():
        r["dk"][...] = jnp.zeros((bk, cfg.head_dim), jnp.float32)
        r["dv"][...] = jnp.zeros((bk, cfg.head_dim), jnp.float32)
        if cfg.rope:  # k is fixed along this axis: rotate it once
            (r["k_rot"][...],) = tile.load_tile(r["k"], all_rows, 0, cfg, _rot(r, "k", cfg))

    @pl.when(qb < hi)
    def _step():
        q_side, k_side = _sides(r, side)
        k_parts = (r["k_rot"][...],) if cfg.rope else (r["k"][...],)
        q_parts = tile.load_tile(r["q"], all_rows, 0, cfg, _rot(r, "q", cfg))
        s = tile.mask_tile(tile.scores(q_parts, k_parts, cfg, q_side), q_start, k_start, cfg, q_side, k_side)
        do = r["do"][...]
        p, ds = tile.probs_and_dlogits(s, r["lse"][...], do, r["v"][...], r["di"][...], cfg, q_side)
        (dv,) = tile.dot_t_parts(p, (do,))
        (dk,) = tile.dot_t_parts(ds, q_parts)
        r["dv"][...] += dv
        r["dk"][...] += dk

    @pl.when(j == nj - 1)
    def _finish():
        r["dv_out"][...] = r["dv"][...].astype(r["dv_out"].dtype)
        tile.store_tile(r["dk_out"], all_rows, 0, (r["dk"][...] * cfg.sm_scale,), cfg, _rot(r, "k", cfg))


def _backward_in_specs(side, cfg: TileConfig, bq: int, bk: int, q_index, k_index, row_q, row_k) -> list:
    """What both backward kernels read, in `_backward_operands`' order: q, k, v, do, lse, di, side inputs."""
    heads = [_head_spec(cfg, bq, q_index), _head_spec(cfg, bk, k_index), _head_spec(cfg, bk, k_index)]
    return [*heads, _head_spec(cfg, bq, q_index), _stat_spec(bq, q_index), _stat_spec(bq, q_index),
            *_side_specs(side, row_q, row_k, bq, bk)]  # fmt: skip


def _backward_operands(q, k, v, do, lse, di, side, cfg: TileConfig) -> tuple:
    return (*(to_kernel_layout(x, cfg) for x in (q, k, v, do)), lse, di, *(a for _, _, a in side))


def backward_dkv(q, k, v, do, lse, di, side, cfg: TileConfig, bq, bk, interpret):
    """dk, dv [B,S,Hkv,E]; a kv head accumulates over its q-head group in-kernel (no repeated k/v).

    Grid (B, Hkv, kv block i, j): j runs over the group's heads and, per head, the band of q
    blocks that see kv block i; steps past the band are clamped to its last block.
    """
    B, _, Hkv, E = k.shape
    G = cfg.num_groups
    grid = grids(B, Hkv * G, cfg, bq, bk, bq, bk)["dkv"]
    n_q = grid[3] // G

    def q_block(i, j):
        lo, hi = tile.q_block_range(i * bk, bk, cfg, bq)
        return jnp.maximum(jnp.minimum(lo + lax.rem(j, n_q), hi - 1), 0)  # an empty range (suffix q) reads block 0

    def q_index(b, h, i, j):
        return b, h * G + lax.div(j, n_q), q_block(i, j)

    def k_index(b, h, i, j):
        return b, h, i

    def row_q(b, h, i, j):
        return b, q_block(i, j)

    def row_k(b, h, i, j):
        return b, i

    names = ["q", "k", "v", "do", "lse", "di", *(n for n, _, _ in side), "dk_out", "dv_out", "dk", "dv"]
    scratch = [pltpu.VMEM((bk, E), jnp.float32), pltpu.VMEM((bk, E), jnp.float32)]
    if cfg.rope:
        names.append("k_rot")
        scratch.append(pltpu.VMEM((bk, E), k.dtype))
    kv_shape = jax.ShapeDtypeStruct(to_kernel_layout(k, cfg).shape, k.dtype)
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, names=names, side=side, cfg=cfg, bq=bq, bk=bk, n_q=n_q),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=0,
            grid=grid,
            in_specs=_backward_in_specs(side, cfg, bq, bk, q_index, k_index, row_q, row_k),
            out_specs=[_head_spec(cfg, bk, k_index), _head_spec(cfg, bk, k_index)],
            scratch_shapes=scratch,
        ),
        out_shape=[kv_shape, kv_shape],
        cost_estimate=cost.backward_dkv(q, k, cfg, bq, bk),
        name="nopejax_flash_dkv" + _suffix(cfg),
        **_params(interpret),
    )(*_backward_operands(q, k, v, do, lse, di, side, cfg))
    return from_kernel_layout(dk, Hkv, cfg), from_kernel_layout(dv, Hkv, cfg)


# ----------------------------------------------------------------------------- backward: dQ


def _dq_kernel(*refs, names, side, cfg: TileConfig, bq: int, bk: int):
    r = dict(zip(names, refs))
    qi, j, nj = pl.program_id(2), pl.program_id(3), pl.num_programs(3)
    lo, hi = tile.kv_block_range(qi * bq, bq, cfg, bk)
    q_start, k_start = qi * bq, (lo + j) * bk
    all_rows = slice(None)

    @pl.when(j == 0)
    def _init():
        r["dq"][...] = jnp.zeros((bq, cfg.head_dim), jnp.float32)
        if cfg.rope:
            (r["q_rot"][...],) = tile.load_tile(r["q"], all_rows, 0, cfg, _rot(r, "q", cfg))

    @pl.when(lo + j < hi)
    def _step():
        s, q_side, k_parts = _q_major_scores(r, side, cfg, q_start, k_start)
        _, ds = tile.probs_and_dlogits(s, r["lse"][...], r["do"][...], r["v"][...], r["di"][...], cfg, q_side)
        (dq,) = tile.dot_parts(ds, k_parts)
        r["dq"][...] += dq

    @pl.when(j == nj - 1)
    def _finish():
        tile.store_tile(r["dq_out"], all_rows, 0, (r["dq"][...] * cfg.sm_scale,), cfg, _rot(r, "q", cfg))


def backward_dq(q, k, v, do, lse, di, side, cfg: TileConfig, bq, bk, interpret):
    """dq [B,S,Hq,E]."""
    B, _, Hq, E = q.shape
    grid = grids(B, Hq, cfg, bq, bk, bq, bk)["dq"]
    q_index, k_index, row_q, row_k = _q_major_maps(cfg, bq, bk)
    names = ["q", "k", "v", "do", "lse", "di", *(n for n, _, _ in side), "dq_out", "dq"]
    scratch = [pltpu.VMEM((bq, E), jnp.float32)]
    if cfg.rope:
        names.append("q_rot")
        scratch.append(pltpu.VMEM((bq, E), q.dtype))
    (dq,) = pl.pallas_call(
        functools.partial(_dq_kernel, names=names, side=side, cfg=cfg, bq=bq, bk=bk),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=0,
            grid=grid,
            in_specs=_backward_in_specs(side, cfg, bq, bk, q_index, k_index, row_q, row_k),
            out_specs=[_head_spec(cfg, bq, q_index)],
            scratch_shapes=scratch,
        ),
        out_shape=[jax.ShapeDtypeStruct(to_kernel_layout(q, cfg).shape, q.dtype)],
        cost_estimate=cost.backward_dq(q, k, cfg, bq, bk),
        name="nopejax_flash_dq" + _suffix(cfg),
        **_params(interpret),
    )(*_backward_operands(q, k, v, do, lse, di, side, cfg))
    return from_kernel_layout(dq, Hq, cfg)
