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


def mask(segment_ids_BS, S: int, causal: bool = True):
    """[B, 1, 1, S, S] bool (or [1, 1, 1, S, S] without segments): may query i see key j."""
    allowed = jnp.tril(jnp.ones((S, S), bool)) if causal else jnp.ones((S, S), bool)
    allowed = allowed[None, None, None]
    if segment_ids_BS is not None:
        same_doc = segment_ids_BS[:, :, None] == segment_ids_BS[:, None, :]
        allowed = allowed & same_doc[:, None, None]
    return allowed


def xla_attention(q_BSHD, k_BSKD, v_BSKD, segment_ids_BS=None, causal=True):
    """Softmax attention in fp32 (as HF's eager path), GQA by grouping query heads."""
    B, S, H, D = q_BSHD.shape
    K = k_BSKD.shape[2]
    q_BSKGD = q_BSHD.reshape(B, S, K, H // K, D)
    scores_BKGST = jnp.einsum("bskgd,btkd->bkgst", q_BSKGD, k_BSKD, preferred_element_type=jnp.float32)
    scores_BKGST = scores_BKGST * (D**-0.5)
    scores_BKGST = jnp.where(mask(segment_ids_BS, S, causal), scores_BKGST, jnp.finfo(jnp.float32).min)
    probs_BKGST = jax.nn.softmax(scores_BKGST, axis=-1).astype(v_BSKD.dtype)
    out_BSKGD = jnp.einsum("bkgst,btkd->bskgd", probs_BKGST, v_BSKD, preferred_element_type=jnp.float32)
    return out_BSKGD.reshape(B, S, H, D).astype(q_BSHD.dtype)


def cudnn_attention(q_BSHD, k_BSKD, v_BSKD, segment_ids_BS=None):
    m = None if segment_ids_BS is None else mask(segment_ids_BS, q_BSHD.shape[1])[:, 0]
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

    def kernel(q, k, v, pos, seg):
        return flash_attention(
            q, k, v, segment_ids=seg, positions=pos, rope=use_rope, inv_freq=jnp.asarray(rope.inv_freq),
            rope_attention_factor=rope.attention_factor, causal=True, interpret=_platform() == "cpu",
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
