"""Tile math shared by the TPU (Mosaic) and GPU (Triton) flash-attention kernels.

Everything here acts on one [rows, cols] tile already in fast memory; the
backend modules only decide how tiles are walked (a grid axis with scratch
accumulators on TPU, an in-kernel loop on GPU). Row vectors are kept 2-D,
[rows, 1], and column vectors [1, cols], which both Mosaic and Triton lower.

RoPE is applied while a q or k tile is loaded: the two halves of its first
rot_dim columns are read from the ref, rotated in fp32 (HF half-split
convention: x*cos + rotate_half(x)*sin, rotate_half(x) = concat(-x2, x1)) and
cast back to the input dtype for the matrix unit; the remaining columns of a
partially rotated head pass through. A tile is carried as a tuple of "parts"
whose dot products add up to the full one: (x,) for a NoPE tile or a rotated
tile re-joined on TPU, (x1, x2, *rest) for a rotated tile on GPU, where Triton
cannot concatenate along lanes. Gradients with respect to the rotated tiles
are rotated back with the transposed rotation before they are stored.

Local (sliding-window) and chunked layers: kv_block_range / q_block_range
give the blocks a tile can see, so both lowerings walk only that band
(O(S*W) tiles, not O(S^2)), and mask_tile masks inside it.

Suffix queries (context parallelism, nopejax/context.py): q may hold only the
last rows of the sequence k holds; q row i is then sequence index q_offset + i,
and every causal / band comparison adds that offset.

Softmax runs in base 2 (exp2, log2(e) folded into the score scale), as in
JAX's GPU kernel; the saved log-sum-exp is in the same base.
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
import numpy as np
from jax import lax

# Finite, so a row whose first tile is fully masked gives exp2(0) = 1 instead
# of NaN; the next unmasked tile's rescale factor exp2(MASK - m) wipes it.
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)
LOG2_E = math.log2(math.e)

_NT = (((1,), (1,)), ((), ()))  # a @ b.T
_TN = (((0,), (0,)), ((), ()))  # a.T @ b
_NN = (((1,), (0,)), ((), ()))  # a @ b


@dataclasses.dataclass(frozen=True)
class TileConfig:
    """Static facts every kernel needs; hashable so it can be a custom_vjp static argument."""

    causal: bool
    sm_scale: float
    rope: bool
    rope_factor: float
    head_dim: int
    num_groups: int  # Hq // Hkv; q head h reads kv head h // num_groups
    seq_len: int  # unpadded length; keys at or past it are masked when the input was padded
    padded_len: int
    has_segments: bool
    join_halves: bool  # re-join rotated halves into one tile (TPU); keep two parts (GPU)
    rot_dim: int = 0  # rotated width R (first R dims of a head, rotate-half within them); 0 for NoPE
    window: int | None = None  # sliding window W: pos_q - W < pos_k <= pos_q
    chunk: int | None = None  # chunk C: pos_q // C == pos_k // C (the ids come in as an input)
    window_on_positions: bool = False  # window compares the positions input, not the sequence index
    chunk_by_index: bool = False  # chunks start at multiples of C in the sequence index (no positions given)
    has_temperature: bool = False  # per-query logit scale (Llama 4 NoPE temperature) comes in as an input
    # cos/sin come in as [B, S, rot_dim/2] tables computed once by XLA (GPU), instead of being computed
    # from positions inside the kernel for every tile it visits (TPU). On an H200 the in-kernel
    # transcendentals cost more than the tile's matmuls (measured: RoPE forward 4x, backward 30x NoPE's).
    rope_tables: bool = False
    q_offset: int = 0  # sequence index of q row 0: q is the last rows of the keys' sequence (context parallelism)
    q_padded_len: int | None = None  # rows of q when fewer than the keys' (padded_len); None: the same

    @property
    def q_len(self) -> int:
        return self.padded_len if self.q_padded_len is None else self.q_padded_len

    @property
    def mask_padding(self) -> bool:
        # Causal masking already hides padded keys from every real query.
        return self.padded_len != self.seq_len and not self.causal

    @property
    def band(self) -> int | None:
        """Keys a query can see lie within this many sequence indices of it (itself included), if bounded.

        Exact for the window and for chunks on the sequence index. For windows and chunks on positions
        it is a superset as long as positions grow by at least 1 per token inside a document
        (arange, or per-document restarts): then pos_q - pos_k >= i_q - i_k for a visible key.
        """
        return self.window if self.window is not None else self.chunk


# ----------------------------------------------------------------------------- band of blocks
#
# Both lowerings walk only the blocks a causal window or chunk can see. These helpers take Python
# ints (grid sizes, cost estimates) or traced int32 scalars (index maps, loop bounds) alike.


def _div(a, b: int):
    return a // b if isinstance(a, int) else lax.div(a, b)


def _max(a, b):
    return max(a, b) if isinstance(a, int) and isinstance(b, int) else jnp.maximum(a, b)


def _min(a, b):
    return min(a, b) if isinstance(a, int) and isinstance(b, int) else jnp.minimum(a, b)


def kv_block_range(q_start, q_rows: int, cfg: TileConfig, bk: int):
    """[lo, hi) of the kv blocks a q tile starting at q row q_start can see."""
    nk = cfg.padded_len // bk
    q_start = q_start + cfg.q_offset  # a sequence index from here on
    hi = _div(q_start + q_rows - 1, bk) + 1 if cfg.causal else nk
    if cfg.chunk is not None and cfg.chunk_by_index:
        lo = _div(_div(q_start, cfg.chunk) * cfg.chunk, bk)
    elif cfg.band is not None:
        lo = _div(_max(q_start - cfg.band + 1, 0), bk)
    else:
        lo = 0
    return lo, hi


def q_block_range(k_start, k_cols: int, cfg: TileConfig, bq: int):
    """[lo, hi) of the q blocks that can see some key of a kv tile starting at k_start (may be empty)."""
    nq = cfg.q_len // bq
    off = cfg.q_offset  # q row = sequence index - off
    lo = _div(_max(k_start - off, 0), bq) if cfg.causal else 0
    last_key = k_start + k_cols - 1
    if cfg.chunk is not None and cfg.chunk_by_index:
        hi = _min(_div(_max((_div(last_key, cfg.chunk) + 1) * cfg.chunk - 1 - off, -bq), bq) + 1, nq)
    elif cfg.band is not None:
        hi = _min(_div(_max(last_key + cfg.band - 1 - off, -bq), bq) + 1, nq)
    else:
        hi = nq
    return lo, hi


def band_sizes(cfg: TileConfig, bq: int, bk: int) -> tuple[int, int]:
    """Widest kv range of a q block and widest q range of a kv block: the inner grid axes on TPU."""
    nq, nk = cfg.q_len // bq, cfg.padded_len // bk
    n_kv = max(hi - lo for lo, hi in (kv_block_range(i * bq, bq, cfg, bk) for i in range(nq)))
    n_q = max(hi - lo for lo, hi in (q_block_range(j * bk, bk, cfg, bq) for j in range(nk)))
    return n_kv, max(n_q, 1)


def computed_tiles(cfg: TileConfig, bq: int, bk: int) -> int:
    """(q tile, kv tile) pairs one head computes; the same set whether walked q-major or kv-major."""
    nq = cfg.q_len // bq
    return sum(hi - lo for lo, hi in (kv_block_range(i * bq, bq, cfg, bk) for i in range(nq)))


# ----------------------------------------------------------------------------- side inputs


def side_inputs(cfg: TileConfig, positions, inv_freq, segment_ids, chunk_ids, temperature):
    """(name, kind, array) for every small input a kernel reads beside q, k, v.

    kind says how a kernel blocks it: "q" rows of the q tile ([B, S, 1]), "k" rows of the kv
    tile ([B, S, 1]), "kc" columns of the kv tile ([B, 1, S]), "c" the same whole array everywhere,
    "qt" / "kt" rows of the q / kv tile of a [B, S, rot_dim/2] cos or sin table (rope_tables).
    The arrays are the keys' [B, S]; q-side ones keep the last q_len rows (suffix queries).
    """
    out = []
    if cfg.rope and cfg.rope_tables:
        cos, sin = rope_cos_sin(positions[:, :, None], inv_freq[None, None, :], cfg.rope_factor)
        out += [("qt_cos", "qt", cos), ("qt_sin", "qt", sin), ("kt_cos", "kt", cos), ("kt_sin", "kt", sin)]
    if (cfg.rope and not cfg.rope_tables) or cfg.window_on_positions:
        out.append(("q_pos", "q", positions[:, :, None]))
    if cfg.rope and not cfg.rope_tables:
        out.append(("k_pos", "k", positions[:, :, None]))
        out.append(("c_inv_freq", "c", inv_freq[None, :]))
    if cfg.window_on_positions:
        out.append(("kc_pos", "kc", positions[:, None, :]))
    if cfg.chunk is not None:
        out += [("q_chunk", "q", chunk_ids[:, :, None]), ("kc_chunk", "kc", chunk_ids[:, None, :])]
    if cfg.has_temperature:
        out.append(("q_temp", "q", temperature[:, :, None]))
    if cfg.has_segments:
        out += [("q_seg", "q", segment_ids[:, :, None]), ("kc_seg", "kc", segment_ids[:, None, :])]
    if cfg.q_padded_len is None:
        return out
    return [(n, kind, a[:, cfg.q_offset :] if kind in ("q", "qt") else a) for n, kind, a in out]


# ----------------------------------------------------------------------------- RoPE


def rope_cos_sin(pos_Q1, inv_freq_1r, factor: float):
    """cos and sin of position * inv_freq, [Q, r] (r = rot_dim / 2) fp32, scaled by the attention factor."""
    angle_Qr = pos_Q1.astype(jnp.float32) * inv_freq_1r
    cos, sin = jnp.cos(angle_Qr), jnp.sin(angle_Qr)
    if factor != 1.0:
        cos, sin = cos * factor, sin * factor
    return cos, sin


def _pass_pieces(cfg: TileConfig) -> list[tuple[int, int]]:
    """(offset, width) of the unrotated columns of a partially rotated head.

    Triton tiles must be powers of two wide, so on GPU the rest is cut into power-of-two pieces
    (96 -> 64 + 32); Mosaic takes it whole.
    """
    start, width = cfg.rot_dim, cfg.head_dim - cfg.rot_dim
    if cfg.join_halves:
        return [(start, width)] if width else []
    pieces = []
    for bit in reversed(range(width.bit_length())):
        if width & (1 << bit):
            pieces.append((start, 1 << bit))
            start += 1 << bit
    return pieces


def load_tile(ref, rows, col0: int, cfg: TileConfig, rot=None):
    """Read a [Q, E] tile (columns col0:col0+E of ref) as parts; rotate it when rot = (cos, sin)."""
    E = cfg.head_dim
    if rot is None:
        return (ref[rows, pl_slice(col0, E)],)
    half = cfg.rot_dim // 2
    cos, sin = rot
    x1 = ref[rows, pl_slice(col0, half)].astype(jnp.float32)
    x2 = ref[rows, pl_slice(col0 + half, half)].astype(jnp.float32)
    y1 = (x1 * cos - x2 * sin).astype(ref.dtype)
    y2 = (x2 * cos + x1 * sin).astype(ref.dtype)
    rest = tuple(ref[rows, pl_slice(col0 + off, w)] for off, w in _pass_pieces(cfg))
    if cfg.join_halves:
        return (jnp.concatenate([y1, y2, *rest], axis=1),)
    return (y1, y2, *rest)


def store_tile(ref, rows, col0: int, parts, cfg: TileConfig, rot=None):
    """Write fp32 parts of a gradient tile to ref, first undoing the rotation when rot is given."""
    E = cfg.head_dim
    if rot is None:
        (g,) = parts
        ref[rows, pl_slice(col0, E)] = g.astype(ref.dtype)
        return
    half = cfg.rot_dim // 2
    pieces = _pass_pieces(cfg)
    if len(parts) == 1:  # one joined tile: cut it where load_tile joined it
        (g,) = parts
        parts = (g[:, :half], g[:, half : 2 * half], *(g[:, off : off + w] for off, w in pieces))
    g1, g2, *rest = parts
    cos, sin = rot
    # Transpose of [[cos, -sin], [sin, cos]] acting on (x1, x2).
    ref[rows, pl_slice(col0, half)] = (g1 * cos + g2 * sin).astype(ref.dtype)
    ref[rows, pl_slice(col0 + half, half)] = (g2 * cos - g1 * sin).astype(ref.dtype)
    for (off, w), g in zip(pieces, rest):
        ref[rows, pl_slice(col0 + off, w)] = g.astype(ref.dtype)


def pl_slice(start: int, size: int):
    return slice(start, start + size)


# ----------------------------------------------------------------------------- products


def _dot(a, b, dims):
    # Explicit precision: a global jax_default_matmul_precision="highest" would otherwise ask Mosaic
    # for an fp32 contraction of bf16 operands, which it rejects. fp32 inputs stay exact.
    precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else lax.Precision.DEFAULT
    return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def scores(q_parts, k_parts, cfg: TileConfig, q_side: dict):
    """Scaled logits in base 2, [Q, J] fp32: (q . k) * sm_scale * log2(e), times the query temperature."""
    s = None
    for qp, kp in zip(q_parts, k_parts):
        d = _dot(qp, kp, _NT)
        s = d if s is None else s + d
    s = s * (cfg.sm_scale * LOG2_E)
    if cfg.has_temperature:  # scaling the logits row equals scaling q (Llama 4), without a rounded copy of q
        s = s * q_side["temp"]
    return s


def dot_parts(a, parts):
    """a @ part for each part, fp32: [Q, J] x [J, d] -> [Q, d]."""
    return tuple(_dot(a.astype(p.dtype), p, _NN) for p in parts)


def dot_t_parts(a, parts):
    """a.T @ part for each part, fp32: [Q, J] x [Q, d] -> [J, d]."""
    return tuple(_dot(a.astype(p.dtype), p, _TN) for p in parts)


def add_parts(acc, new):
    return tuple(a + n for a, n in zip(acc, new))


# ----------------------------------------------------------------------------- masks


def mask_tile(s, q_start, k_start, cfg: TileConfig, q_side: dict, k_side: dict):
    """Set masked logits to MASK_VALUE: causal, window, chunk, document (segment ids), padded keys.

    q_side holds [Q, 1] rows and k_side [1, J] columns of the side inputs ("pos", "chunk", "seg").
    """
    Q, J = s.shape
    keep = None

    def both(a, b):
        return b if a is None else jnp.logical_and(a, b)

    rows = q_start + cfg.q_offset + lax.broadcasted_iota(jnp.int32, (Q, 1), 0)
    cols = k_start + lax.broadcasted_iota(jnp.int32, (1, J), 1)
    if cfg.causal:
        keep = both(keep, cols <= rows)
    if cfg.mask_padding:
        keep = both(keep, cols < cfg.seq_len)
    if cfg.window is not None:  # the index band always, so rows whose positions stand still (padding) see
        keep = both(keep, rows - cols < cfg.window)  # the same keys on every path and block size
        if cfg.window_on_positions:
            keep = both(keep, q_side["pos"] - k_side["pos"] < cfg.window)
    if cfg.chunk is not None:
        keep = both(keep, q_side["chunk"] == k_side["chunk"])
    if cfg.has_segments:
        keep = both(keep, q_side["seg"] == k_side["seg"])
    if keep is None:
        return s
    return jnp.where(keep, s, MASK_VALUE)


# ----------------------------------------------------------------------------- softmax


def online_softmax_step(s, m_prev, denom_prev, acc_prev, v):
    """One flash-attention update with a masked base-2 logit tile s [Q, J]; returns (m, l, acc)."""
    m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))  # [Q, 1]
    alpha = jnp.exp2(m_prev - m_next)
    p = jnp.exp2(s - m_next)
    denom_next = alpha * denom_prev + jnp.sum(p, axis=1, keepdims=True)
    (pv,) = dot_parts(p, (v,))
    return m_next, denom_next, acc_prev * alpha + pv


def finish_softmax(m, denom, acc):
    """Normalised output [Q, E] fp32 and the base-2 log-sum-exp [Q, 1]."""
    return acc / denom, m + jnp.log2(denom)


def probs_and_dlogits(s, lse_Q1, do, v, di_Q1, cfg: TileConfig, q_side: dict):
    """Backward of one tile: p = softmax probs and ds = dL/d(q.k) / sm_scale, both [Q, J] fp32."""
    p = jnp.exp2(s - lse_Q1)
    dp = _dot(do, v, _NT)
    ds = p * (dp - di_Q1)
    if cfg.has_temperature:  # logit = temp * sm_scale * q.k
        ds = ds * q_side["temp"]
    return p, ds


def zeros_parts(rows: int, cfg: TileConfig, rope: bool):
    """fp32 accumulators shaped like the parts a (possibly rotated) tile is carried as."""
    if rope and not cfg.join_halves:
        widths = [cfg.rot_dim // 2] * 2 + [w for _, w in _pass_pieces(cfg)]
        return tuple(jnp.zeros((rows, w), jnp.float32) for w in widths)
    return (jnp.zeros((rows, cfg.head_dim), jnp.float32),)
