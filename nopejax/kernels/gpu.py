"""GPU lowering (Pallas Triton backend): forward, dK/dV and dQ pallas_calls over the shared tile math.

Follows the structure of JAX's GPU flash attention
(jax/experimental/pallas/ops/gpu/attention.py): the grid covers (q or kv
block, batch, head) and each program loops over the other sequence axis with
lax.fori_loop, holding accumulators in registers. The loop bounds are the
band tile.kv_block_range / q_block_range gives (the causal diagonal, and the
window or chunk start of local and chunked layers), so blocks outside it are
never visited.

Differences from that kernel: RoPE tiles stay as two halves (Triton cannot
concatenate along the last axis, so q.k is two half-width dots); GQA is read
through the kv head index (h // group) in the forward and dQ kernels, and the
dK/dV kernel runs per kv head looping over its q-head group, whose heads are
adjacent in the [B, S, H*E] view; di = rowsum(dO * O) comes from XLA.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from nopejax.kernels import cost, tile
from nopejax.kernels.tile import TileConfig


def _compiler_params(cfg: TileConfig, rows: int):
    from jax.experimental.pallas import triton as plgpu

    num_warps = 4 if cfg.head_dim <= 64 or rows < 128 else 8
    return plgpu.CompilerParams(num_warps=num_warps, num_stages=2)


def _flat(x_BSHE):
    B, S, H, E = x_BSHE.shape
    return x_BSHE.reshape(B, S, H * E)


def _side_specs(side, q_rows: int, k_rows: int, q_index, k_index):
    """BlockSpecs of tile.side_inputs; q_index / k_index(*grid) -> (batch, row block)."""
    specs = []
    for _, kind, array in side:
        if kind in ("q", "qt"):  # [B, S, width]: rows of the q tile, whole width
            specs.append(pl.BlockSpec((None, q_rows, array.shape[-1]), lambda *g: (*q_index(*g), 0)))
        elif kind in ("k", "kt"):
            specs.append(pl.BlockSpec((None, k_rows, array.shape[-1]), lambda *g: (*k_index(*g), 0)))
        elif kind == "kc":
            specs.append(pl.BlockSpec((None, 1, k_rows), lambda *g: (lambda b, c: (b, 0, c))(*k_index(*g))))
        else:
            specs.append(pl.BlockSpec(array.shape, lambda *g, n=array.ndim: (0,) * n))
    return specs


def _rot(r, which, rows, cfg):
    if not cfg.rope:
        return None
    if cfg.rope_tables:
        return r[which + "t_cos"][rows, :], r[which + "t_sin"][rows, :]
    return tile.rope_cos_sin(r[which + "_pos"][rows, :], r["c_inv_freq"][...], cfg.rope_factor)


def _q_side(r, side, rows):
    return {n[2:]: r[n][rows, :] for n, kind, _ in side if kind == "q"}


def _k_side(r, side, cols):
    return {n[3:]: r[n][:, cols] for n, kind, _ in side if kind == "kc"}


def _suffix(cfg: TileConfig) -> str:
    kind = "_local" if cfg.window is not None else "_chunked" if cfg.chunk is not None else ""
    return ("_rope" if cfg.rope else "_nope") + kind


def loop_steps(B: int, Hq: int, cfg: TileConfig, bq: int, bk: int, bq_bwd: int, bk_bwd: int):
    """Total inner-loop iterations (tiles visited) of the forward, dK/dV and dQ kernels."""
    return {
        "forward": B * Hq * tile.computed_tiles(cfg, bq, bk),
        "dkv": B * Hq * tile.computed_tiles(cfg, bq_bwd, bk_bwd),
        "dq": B * Hq * tile.computed_tiles(cfg, bq_bwd, bk_bwd),
    }


# ----------------------------------------------------------------------------- forward


def _fwd_kernel(*refs, names, side, cfg: TileConfig, bq: int, bk: int):
    r = dict(zip(names, refs))
    q_start = pl.program_id(0) * bq
    all_rows = slice(None)
    q_parts = tile.load_tile(r["q"], all_rows, 0, cfg, _rot(r, "q", all_rows, cfg))
    q_side = _q_side(r, side, all_rows)

    def body(j, carry):
        k_start = j * bk
        rows = pl.ds(k_start, bk)
        k_parts = tile.load_tile(r["k"], rows, 0, cfg, _rot(r, "k", rows, cfg))
        s = tile.scores(q_parts, k_parts, cfg, q_side)
        s = tile.mask_tile(s, q_start, k_start, cfg, q_side, _k_side(r, side, rows))
        return tile.online_softmax_step(s, *carry, r["v"][rows, :])

    init = (
        jnp.full((bq, 1), -jnp.inf, jnp.float32),
        jnp.zeros((bq, 1), jnp.float32),
        jnp.zeros((bq, cfg.head_dim), jnp.float32),
    )
    lo, hi = tile.kv_block_range(q_start, bq, cfg, bk)  # only the band this q block can see
    m, denom, acc = lax.fori_loop(lo, hi, body, init)
    o, lse = tile.finish_softmax(m, denom, acc)
    r["o"][...] = o.astype(r["o"].dtype)
    r["lse"][...] = lse


def forward(q, k, v, side, cfg: TileConfig, bq: int, bk: int, interpret):
    """q [B,S,Hq,E], k/v [B,S,Hkv,E] (S padded) -> o [B,S,Hq,E], lse [B,Hq,S,1] (base 2)."""
    B, S, Hq, E = q.shape
    G = cfg.num_groups
    nq = S // bq
    names = ["q", "k", "v", *(n for n, _, _ in side), "o", "lse"]
    o, lse = pl.pallas_call(
        functools.partial(_fwd_kernel, names=names, side=side, cfg=cfg, bq=bq, bk=bk),
        grid=(nq, B, Hq),
        in_specs=[
            pl.BlockSpec((None, bq, E), lambda i, b, h: (b, i, h)),
            pl.BlockSpec((None, S, E), lambda i, b, h: (b, 0, h // G)),
            pl.BlockSpec((None, S, E), lambda i, b, h: (b, 0, h // G)),
            *_side_specs(side, bq, S, lambda i, b, h: (b, i), lambda i, b, h: (b, 0)),
        ],
        out_specs=[
            pl.BlockSpec((None, bq, E), lambda i, b, h: (b, i, h)),
            pl.BlockSpec((None, None, bq, 1), lambda i, b, h: (b, h, i, 0)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((B, S, Hq * E), q.dtype),
            jax.ShapeDtypeStruct((B, Hq, S, 1), jnp.float32),
        ],
        compiler_params=_compiler_params(cfg, bq),
        cost_estimate=cost.forward(q, k, cfg, bq, bk),
        interpret=interpret,
        name="nopejax_flash_fwd" + _suffix(cfg),
    )(_flat(q), _flat(k), _flat(v), *(a for _, _, a in side))
    return o.reshape(q.shape), lse


# ----------------------------------------------------------------------------- backward: dK, dV


def _dkv_kernel(*refs, names, side, cfg: TileConfig, bq: int, bk: int):
    r = dict(zip(names, refs))
    E = cfg.head_dim
    k_start = pl.program_id(0) * bk
    all_rows = slice(None)
    k_parts = tile.load_tile(r["k"], all_rows, 0, cfg, _rot(r, "k", all_rows, cfg))
    v = r["v"][...]
    k_side = _k_side(r, side, all_rows)
    lo, hi = tile.q_block_range(k_start, bk, cfg, bq)  # only the q blocks that see this kv block

    dk = tile.zeros_parts(bk, cfg, cfg.rope)
    dv = jnp.zeros((bk, E), jnp.float32)
    for g in range(cfg.num_groups):  # q heads sharing this kv head sit side by side in the H*E view

        def body(i, carry, g=g):
            dk, dv = carry
            q_start = i * bq
            rows = pl.ds(q_start, bq)
            q_parts = tile.load_tile(r["q"], rows, g * E, cfg, _rot(r, "q", rows, cfg))
            q_side = _q_side(r, side, rows)
            s = tile.mask_tile(tile.scores(q_parts, k_parts, cfg, q_side), q_start, k_start, cfg, q_side, k_side)
            do = r["do"][rows, pl.ds(g * E, E)]
            p, ds = tile.probs_and_dlogits(s, r["lse"][g, rows, :], do, v, r["di"][g, rows, :], cfg, q_side)
            (dv_i,) = tile.dot_t_parts(p, (do,))
            return tile.add_parts(dk, tile.dot_t_parts(ds, q_parts)), dv + dv_i

        dk, dv = lax.fori_loop(lo, hi, body, (dk, dv))

    r["dv_out"][...] = dv.astype(r["dv_out"].dtype)
    # the rotation is read again rather than held live across the loop (registers, not spills)
    tile.store_tile(r["dk_out"], all_rows, 0, tuple(x * cfg.sm_scale for x in dk), cfg, _rot(r, "k", all_rows, cfg))


def backward_dkv(q, k, v, do, lse, di, side, cfg: TileConfig, bq, bk, interpret):
    """dk, dv [B,S,Hkv,E]; a kv head accumulates over its q-head group in-kernel (no repeated k/v)."""
    B, S, Hkv, E = k.shape
    G = cfg.num_groups
    nk = S // bk
    names = ["q", "k", "v", "do", "lse", "di", *(n for n, _, _ in side), "dk_out", "dv_out"]
    group_spec = pl.BlockSpec((None, S, G * E), lambda j, b, h: (b, 0, h))
    kv_spec = pl.BlockSpec((None, bk, E), lambda j, b, h: (b, j, h))
    stat_spec = pl.BlockSpec((None, G, S, 1), lambda j, b, h: (b, h, 0, 0))
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, names=names, side=side, cfg=cfg, bq=bq, bk=bk),
        grid=(nk, B, Hkv),
        in_specs=[
            group_spec,
            kv_spec,
            kv_spec,
            group_spec,
            stat_spec,
            stat_spec,
            *_side_specs(side, S, bk, lambda j, b, h: (b, 0), lambda j, b, h: (b, j)),
        ],
        out_specs=[kv_spec, kv_spec],
        out_shape=[jax.ShapeDtypeStruct((B, S, Hkv * E), k.dtype)] * 2,
        compiler_params=_compiler_params(cfg, bk),
        cost_estimate=cost.backward_dkv(q, k, cfg, bq, bk),
        interpret=interpret,
        name="nopejax_flash_dkv" + _suffix(cfg),
    )(_flat(q), _flat(k), _flat(v), _flat(do), lse, di, *(a for _, _, a in side))
    return dk.reshape(k.shape), dv.reshape(v.shape)


# ----------------------------------------------------------------------------- backward: dQ


def _dq_kernel(*refs, names, side, cfg: TileConfig, bq: int, bk: int):
    r = dict(zip(names, refs))
    q_start = pl.program_id(0) * bq
    all_rows = slice(None)
    q_parts = tile.load_tile(r["q"], all_rows, 0, cfg, _rot(r, "q", all_rows, cfg))
    q_side = _q_side(r, side, all_rows)
    do, lse, di = r["do"][...], r["lse"][...], r["di"][...]

    def body(j, dq):
        k_start = j * bk
        rows = pl.ds(k_start, bk)
        k_parts = tile.load_tile(r["k"], rows, 0, cfg, _rot(r, "k", rows, cfg))
        s = tile.scores(q_parts, k_parts, cfg, q_side)
        s = tile.mask_tile(s, q_start, k_start, cfg, q_side, _k_side(r, side, rows))
        _, ds = tile.probs_and_dlogits(s, lse, do, r["v"][rows, :], di, cfg, q_side)
        return tile.add_parts(dq, tile.dot_parts(ds, k_parts))

    lo, hi = tile.kv_block_range(q_start, bq, cfg, bk)
    dq = lax.fori_loop(lo, hi, body, tile.zeros_parts(bq, cfg, cfg.rope))
    tile.store_tile(r["dq_out"], all_rows, 0, tuple(x * cfg.sm_scale for x in dq), cfg, _rot(r, "q", all_rows, cfg))


def backward_dq(q, k, v, do, lse, di, side, cfg: TileConfig, bq, bk, interpret):
    """dq [B,S,Hq,E]."""
    B, S, Hq, E = q.shape
    G = cfg.num_groups
    nq = S // bq
    names = ["q", "k", "v", "do", "lse", "di", *(n for n, _, _ in side), "dq_out"]
    q_spec = pl.BlockSpec((None, bq, E), lambda i, b, h: (b, i, h))
    kv_spec = pl.BlockSpec((None, S, E), lambda i, b, h: (b, 0, h // G))
    stat_spec = pl.BlockSpec((None, None, bq, 1), lambda i, b, h: (b, h, i, 0))
    (dq,) = pl.pallas_call(
        functools.partial(_dq_kernel, names=names, side=side, cfg=cfg, bq=bq, bk=bk),
        grid=(nq, B, Hq),
        in_specs=[
            q_spec,
            kv_spec,
            kv_spec,
            q_spec,
            stat_spec,
            stat_spec,
            *_side_specs(side, bq, S, lambda i, b, h: (b, i), lambda i, b, h: (b, 0)),
        ],
        out_specs=[q_spec],
        out_shape=[jax.ShapeDtypeStruct((B, S, Hq * E), q.dtype)],
        compiler_params=_compiler_params(cfg, bq),
        cost_estimate=cost.backward_dq(q, k, cfg, bq, bk),
        interpret=interpret,
        name="nopejax_flash_dq" + _suffix(cfg),
    )(_flat(q), _flat(k), _flat(v), _flat(do), lse, di, *(a for _, _, a in side))
    return dq.reshape(q.shape)
