"""pl.CostEstimate for each pallas_call, so XLA schedules around the kernels sensibly.

Counts follow what the kernels actually do: only tiles on or below the causal
diagonal, and for local (sliding-window) and chunked layers only tiles inside
the band, are computed (and their k/v or q/dO tiles read); RoPE costs a cos
and a sin per rotated pair plus a few flops per rotated element, and exp2 is
one transcendental per logit.
"""

from __future__ import annotations

from jax.experimental import pallas as pl

from nopejax.kernels import tile
from nopejax.kernels.tile import TileConfig


def _computed_tiles(cfg: TileConfig, bq: int, bk: int) -> int:
    """(q tile, kv tile) pairs one head computes."""
    return tile.computed_tiles(cfg, bq, bk)


def _rope_elems(cfg: TileConfig, rows: int) -> tuple[int, int, int]:
    """(flops, transcendentals, bytes) to rotate a [rows, E] tile."""
    if not cfg.rope:
        return 0, 0, 0
    R = cfg.rot_dim
    if cfg.rope_tables:  # 2 mul + 1 add per rotated element; cos and sin read as fp32 [rows, R/2] each
        return 3 * rows * R, 0, 4 * rows * R
    return 4 * rows * R, rows * R, 4 * rows  # + the angle; cos and sin of R/2 angles; positions read


def forward(q, k, cfg: TileConfig, bq: int, bk: int) -> pl.CostEstimate:
    B, S, Hq, E = q.shape
    pairs = _computed_tiles(cfg, bq, bk) * B * Hq
    rope_q = _rope_elems(cfg, S)
    rope_k = _rope_elems(cfg, bk)
    it = q.dtype.itemsize
    return pl.CostEstimate(
        flops=pairs * (4 * bq * bk * E + 6 * bq * bk) + B * Hq * rope_q[0] + pairs * rope_k[0],
        transcendentals=pairs * bq * bk + B * Hq * rope_q[1] + pairs * rope_k[1],
        bytes_accessed=2 * B * S * Hq * E * it
        + pairs * 2 * bk * E * it
        + 4 * B * Hq * S
        + B * Hq * rope_q[2]
        + pairs * rope_k[2],
    )


def backward_dkv(q, k, cfg: TileConfig, bq: int, bk: int) -> pl.CostEstimate:
    B, S, Hq, E = q.shape
    Hkv = k.shape[2]
    pairs = _computed_tiles(cfg, bq, bk) * B * Hq
    rope_q = _rope_elems(cfg, bq)
    rope_k = _rope_elems(cfg, S)
    it = q.dtype.itemsize
    return pl.CostEstimate(
        flops=pairs * (8 * bq * bk * E + 6 * bq * bk) + pairs * rope_q[0] + 2 * B * Hkv * rope_k[0],
        transcendentals=pairs * bq * bk + pairs * rope_q[1] + 2 * B * Hkv * rope_k[1],
        bytes_accessed=4 * B * S * Hkv * E * it
        + pairs * (2 * bq * E * it + 8 * bq)
        + pairs * rope_q[2]
        + 2 * B * Hkv * rope_k[2],
    )


def backward_dq(q, k, cfg: TileConfig, bq: int, bk: int) -> pl.CostEstimate:
    B, S, Hq, E = q.shape
    pairs = _computed_tiles(cfg, bq, bk) * B * Hq
    rope_q = _rope_elems(cfg, S)
    rope_k = _rope_elems(cfg, bk)
    it = q.dtype.itemsize
    return pl.CostEstimate(
        flops=pairs * (6 * bq * bk * E + 4 * bq * bk) + 2 * B * Hq * rope_q[0] + pairs * rope_k[0],
        transcendentals=pairs * bq * bk + 2 * B * Hq * rope_q[1] + pairs * rope_k[1],
        bytes_accessed=3 * B * S * Hq * E * it
        + 8 * B * Hq * S
        + pairs * 2 * bk * E * it
        + 2 * B * Hq * rope_q[2]
        + pairs * rope_k[2],
    )
