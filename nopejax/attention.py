"""Attention: the plain-XLA reference and the dispatch to cuDNN or the Pallas kernel.

Shape letters: B batch, S sequence, K kv heads, G query heads per kv head (GQA group),
H = K * G query heads, D head dim.

`attend` takes un-rotated q and k plus a static `use_rope` flag. The `xla` and `cudnn` paths
rotate q and k here; the `pallas` path hands the rotation to the kernel, which applies it to
tiles as they are loaded (and not at all for NoPE layers).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from nopejax import rope as rope_lib
from nopejax import sharding

PALLAS_HEAD_DIMS = (64, 128, 256)  # what the kernel tiles support (nopejax.kernels.SUPPORTED_HEAD_DIMS)


def resolve_impl(impl: str, head_dim: int | None = None, platform: str | None = None) -> str:
    """`auto` -> the Pallas kernel on GPU/TPU when it supports the head dim, else plain XLA."""
    if impl != "auto":
        return impl
    platform = platform or jax.default_backend()
    usable = head_dim is None or head_dim in PALLAS_HEAD_DIMS
    return "pallas" if platform in ("gpu", "tpu") and usable else "xla"


def row_mask(q_start, c: int, S: int, seg_q_Bc, seg_k_BS, causal: bool = True):
    """[B or 1, 1, 1, c, S] bool: may query row q_start + i see key j (causal and same document)."""
    allowed_cS = jnp.ones((c, S), bool)
    if causal:
        allowed_cS = jnp.arange(S)[None, :] <= q_start + jnp.arange(c)[:, None]
    allowed = allowed_cS[None, None, None]
    if seg_q_Bc is not None:
        allowed = allowed & (seg_q_Bc[:, :, None] == seg_k_BS[:, None, :])[:, None, None]
    return allowed


Q_CHUNK = 512  # query rows per step of the chunked XLA path


def xla_attention(q_BSHD, k_BSKD, v_BSKD, segment_ids_BS=None, causal=True):
    """Softmax attention in fp32 (as HF's eager path), GQA by grouping query heads.

    Long sequences run over query chunks of Q_CHUNK rows, each rematerialized in the backward
    pass: every row still sees all its keys, so the result is the same, but the fp32 score
    matrix held at once is [B, H, Q_CHUNK, S] instead of [B, H, S, S] (1 GiB per layer at
    S = 4096, H = 16).
    """
    S = q_BSHD.shape[1]
    seg_BS = segment_ids_BS
    if S <= 2 * Q_CHUNK or S % Q_CHUNK:
        return _attend_rows(q_BSHD, k_BSKD, v_BSKD, 0, seg_BS, seg_BS, causal)
    n = S // Q_CHUNK

    def to_chunks(a):  # [B, S, ...] -> [n, B, Q_CHUNK, ...]
        return jnp.moveaxis(a.reshape(a.shape[0], n, Q_CHUNK, *a.shape[2:]), 1, 0)

    @jax.checkpoint
    def one_chunk(xs):
        q_BcHD, start, seg_Bc = xs
        return _attend_rows(q_BcHD, k_BSKD, v_BSKD, start, seg_Bc, seg_BS, causal)

    starts = jnp.arange(n, dtype=jnp.int32) * Q_CHUNK
    out_nBcHD = jax.lax.map(one_chunk, (to_chunks(q_BSHD), starts, None if seg_BS is None else to_chunks(seg_BS)))
    return jnp.moveaxis(out_nBcHD, 0, 1).reshape(q_BSHD.shape)


def _attend_rows(q_BcHD, k_BSKD, v_BSKD, q_start, seg_q_Bc, seg_k_BS, causal):
    """Query rows q_start .. q_start + c - 1 against all S keys."""
    B, c, H, D = q_BcHD.shape
    S, K = k_BSKD.shape[1], k_BSKD.shape[2]
    q_BcKGD = q_BcHD.reshape(B, c, K, H // K, D)
    scores_BKGcS = jnp.einsum("bckgd,bskd->bkgcs", q_BcKGD, k_BSKD, preferred_element_type=jnp.float32)
    scores_BKGcS = scores_BKGcS * (D**-0.5)
    allowed = row_mask(q_start, c, S, seg_q_Bc, seg_k_BS, causal)
    scores_BKGcS = jnp.where(allowed, scores_BKGcS, jnp.finfo(jnp.float32).min)
    probs_BKGcS = jax.nn.softmax(scores_BKGcS, axis=-1).astype(v_BSKD.dtype)
    out_BcKGD = jnp.einsum("bkgcs,bskd->bckgd", probs_BKGcS, v_BSKD, preferred_element_type=jnp.float32)
    return out_BcKGD.reshape(B, c, H, D).astype(q_BcHD.dtype)


def cudnn_attention(q_BSHD, k_BSKD, v_BSKD, segment_ids_BS=None):
    S = q_BSHD.shape[1]
    m = None if segment_ids_BS is None else row_mask(0, S, S, segment_ids_BS, segment_ids_BS)[:, 0]
    return jax.nn.dot_product_attention(q_BSHD, k_BSKD, v_BSKD, mask=m, is_causal=True, implementation="cudnn")


def attend(q_BSHD, k_BSKD, v_BSKD, *, positions_BS, segment_ids_BS, cos_sin, use_rope: bool, rope, impl: str):
    """Causal attention; rotary embedding applied only when `use_rope` (a Python bool)."""
    impl = resolve_impl(impl, q_BSHD.shape[-1])
    if impl == "pallas":
        return _pallas(q_BSHD, k_BSKD, v_BSKD, positions_BS, segment_ids_BS, use_rope, rope)
    if use_rope:
        cos_BSD, sin_BSD = cos_sin
        q_BSHD = rope_lib.apply_rope(q_BSHD, cos_BSD, sin_BSD)
        k_BSKD = rope_lib.apply_rope(k_BSKD, cos_BSD, sin_BSD)
    if impl == "cudnn":
        return cudnn_attention(q_BSHD, k_BSKD, v_BSKD, segment_ids_BS)
    return xla_attention(q_BSHD, k_BSKD, v_BSKD, segment_ids_BS)


def _platform() -> str:
    """The platform being compiled for: the mesh's devices (TPU in an AOT dry run), else the default."""
    mesh = jax.sharding.get_abstract_mesh()
    device = getattr(mesh, "abstract_device", None) if mesh is not None and not mesh.empty else None
    return getattr(device, "platform", None) or jax.default_backend()


def _pallas(q_BSHD, k_BSKD, v_BSKD, positions_BS, segment_ids_BS, use_rope, rope):
    """The fused-RoPE flash kernel; under a mesh it runs per shard (batch and heads split).

    Inside `shard_map` each device sees its batch rows and its heads; the sequence axis is never
    sharded (`act_seq` maps to no mesh axis), so every shard holds whole sequences.
    """
    from nopejax.kernels import flash_attention

    platform = _platform()
    backend = {"tpu": "tpu", "gpu": "gpu", "cuda": "gpu", "rocm": "gpu"}.get(platform)

    def kernel(q, k, v, pos, seg):
        return flash_attention(
            q, k, v, segment_ids=seg, positions=pos, rope=use_rope, inv_freq=jnp.asarray(rope.inv_freq),
            rope_attention_factor=rope.attention_factor, causal=True, interpret=platform == "cpu",
            backend=backend,
        )  # fmt: skip

    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
        return kernel(q_BSHD, k_BSKD, v_BSKD, positions_BS, segment_ids_BS)
    heads = sharding.logical_to_spec(["act_batch", "act_seq", "act_heads", None], mesh)
    rows = sharding.logical_to_spec(["act_batch", "act_seq"], mesh)
    has_segments = segment_ids_BS is not None
    operands = (q_BSHD, k_BSKD, v_BSKD, positions_BS) + ((segment_ids_BS,) if has_segments else ())
    specs = (heads, heads, heads, rows) + ((rows,) if has_segments else ())

    @functools.partial(jax.shard_map, in_specs=specs, out_specs=heads, check_vma=False)
    def per_shard(q, k, v, pos, *seg):
        return kernel(q, k, v, pos, seg[0] if seg else None)

    return per_shard(*operands)
