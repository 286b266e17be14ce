"""Attention: the plain-XLA path and the dispatch to cuDNN or the Pallas kernel.

Shape letters: B batch, S sequence, K kv heads, G query heads per kv head (GQA group),
H = K * G query heads, E head dim, c query rows of a chunk, J keys a chunk sees.

`attend` runs one layer as its `layers.LayerSpec` says: full, sliding-window or chunked
attention; RoPE or not (full or partial, rotate-half or interleaved pairs); L2 QK-norm after
RoPE; Llama 4's query temperature on NoPE layers. The `xla` and `cudnn` paths rotate q and k
here; the `pallas` path hands the rotation to the kernel, which applies it to tiles as they are
loaded (and not at all for NoPE layers).

Local layers are defined on positions, which restart per packed document, so each document
behaves as if alone: key j is visible to query i iff same segment, j <= i, and
pos_i - W < pos_j (sliding) or pos_i // C == pos_j // C (chunked). On the XLA path a local
layer costs O(S * W): each chunk of c query rows reads only the c + W - 1 keys ending at its
last row. That band holds every visible key as long as positions advance by one per token
within a document (what packing produces).

Under a `context` mesh axis (context parallelism) rows arrive in zig-zag order and
`nopejax.context.attend` runs each path per device on spans of the true sequence that end with
its query chunks (queries = the last rows of the keys: "suffix queries").
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from nopejax import context, sharding
from nopejax import rope as rope_lib
from nopejax.config import PALLAS_CONTEXT_BLOCK
from nopejax.layers import LayerSpec

PALLAS_HEAD_DIMS = (64, 128, 256)  # what the kernel tiles support (nopejax.kernels.SUPPORTED_HEAD_DIMS)
CUDNN_HEAD_DIMS = (64, 128)
FULL = LayerSpec()


def resolve_impl(impl: str, head_dim: int | None = None, platform: str | None = None, context_chunk=None) -> str:
    """`auto` -> what is fastest on the platform for this head dim.

    TPU: the Pallas kernel (RoPE fused, local layers walk only their band). GPU: cuDNN with RoPE
    applied by XLA, when it takes the head dim: measured on an H200 (README, "GPU"), the Triton
    form of the kernel is correct but slower, 0.89x cuDNN's tokens/s in a SmolLM3-shaped training
    step. CPU and anything unsupported: plain XLA. Under context parallelism (`context_chunk`: the
    rows of each zig-zag chunk) the kernel runs only on TPU and in chunks of a multiple of 128 rows,
    so elsewhere XLA attention per device.
    """
    if impl != "auto":
        return impl
    platform = platform or jax.default_backend()
    pallas = head_dim is None or head_dim in PALLAS_HEAD_DIMS
    if context_chunk is not None:
        pallas = pallas and platform == "tpu" and context_chunk % PALLAS_CONTEXT_BLOCK == 0
    if platform == "tpu" and pallas:
        return "pallas"
    if platform == "gpu" and (head_dim is None or head_dim in CUDNN_HEAD_DIMS):
        return "cudnn"
    if platform == "gpu" and pallas:
        return "pallas"
    return "xla"


def visible(q_idx_c, k_idx_J, S: int, seg_q_Bc, seg_k_BJ, pos_q_Bc, pos_k_BJ, spec: LayerSpec, causal=True):
    """[B or 1, c, J] bool: may query row q_idx see key k_idx (indices into the S tokens).

    Keys outside [0, S) are band padding and never visible. Causality is by index; windows and
    chunks are by position, so they restart with each packed document.
    """
    ok_cJ = (k_idx_J[None, :] >= 0) & (k_idx_J[None, :] < S)
    if causal:
        ok_cJ = ok_cJ & (k_idx_J[None, :] <= q_idx_c[:, None])
    if spec.attention == "sliding":  # the index band too, so rows whose positions stand still (padding)
        ok_cJ = ok_cJ & (k_idx_J[None, :] > q_idx_c[:, None] - spec.window)  # agree on every path
    ok = ok_cJ[None]
    if seg_q_Bc is not None:
        ok = ok & (seg_q_Bc[:, :, None] == seg_k_BJ[:, None, :])
    local = local_visible(pos_q_Bc[:, :, None], pos_k_BJ[:, None, :], spec)
    return ok if local is None else ok & local


def local_visible(pos_q, pos_k, spec: LayerSpec):
    """A local layer's term, by position (broadcast q against k): the sliding window or the same
    chunk; None for full attention. The training paths and the KV-cache decoder share it."""
    if spec.attention == "sliding":
        return pos_k > pos_q - spec.window
    if spec.attention == "chunked":
        return pos_k // spec.window == pos_q // spec.window
    return None


Q_CHUNK = 512  # query rows per step of the chunked XLA path
MIN_LOCAL_CHUNK = 8  # a local layer's query chunk is about its window, not below this


def xla_attention(
    q_BSHE, k_BSKE, v_BSKE, segment_ids_BS=None, causal=True, *, positions_BS=None, spec=FULL, q_chunk=Q_CHUNK
):
    """Softmax attention in fp32 (as HF's eager path), GQA by grouping query heads.

    Full layers: long sequences run over query chunks of `q_chunk` rows, each rematerialized in
    the backward pass: every row still sees all its keys, so the result is the same, but the
    fp32 score matrix held at once is [B, H, q_chunk, S] instead of [B, H, S, S] (1 GiB per layer
    at S = 4096, H = 16). Local layers: query chunks against their key band only (`_banded`).

    Suffix queries (context parallelism): q may hold only the last Sq of the S tokens k holds;
    positions and segment ids are then the keys' [B, S].
    """
    B, S = k_BSKE.shape[:2]
    Sq = q_BSHE.shape[1]
    offset = S - Sq  # sequence index of query row 0
    if positions_BS is None:
        positions_BS = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))
    seg_BS, pos_BS = segment_ids_BS, positions_BS
    if spec.local and not offset:
        lookback = spec.window - 1  # keys further back than this (by index) are never visible
        c = min(q_chunk, max(MIN_LOCAL_CHUNK, spec.window))
        if c + lookback < S:  # else the band is the whole sequence
            return _banded(q_BSHE, k_BSKE, v_BSKE, pos_BS, seg_BS, spec, c, lookback)
    idx = jnp.arange(S)
    seg_q, pos_q = None if seg_BS is None else seg_BS[:, offset:], pos_BS[:, offset:]
    if 2 * q_chunk >= Sq or Sq % q_chunk:
        allowed = visible(offset + jnp.arange(Sq), idx, S, seg_q, seg_BS, pos_q, pos_BS, spec, causal)
        return _attend_rows(q_BSHE, k_BSKE, v_BSKE, allowed)
    n = Sq // q_chunk

    @jax.checkpoint
    def one_chunk(xs):
        q_BcHE, start, seg_Bc, pos_Bc = xs
        allowed = visible(start + jnp.arange(q_chunk), idx, S, seg_Bc, seg_BS, pos_Bc, pos_BS, spec, causal)
        return _attend_rows(q_BcHE, k_BSKE, v_BSKE, allowed)

    starts = offset + jnp.arange(n, dtype=jnp.int32) * q_chunk
    chunks = (_to_chunks(q_BSHE, n), starts, None if seg_q is None else _to_chunks(seg_q, n), _to_chunks(pos_q, n))
    return _from_chunks(jax.lax.map(one_chunk, chunks))


def _to_chunks(a, n):  # [B, n * c, ...] -> [n, B, c, ...]
    return jnp.moveaxis(a.reshape(a.shape[0], n, a.shape[1] // n, *a.shape[2:]), 1, 0)


def _from_chunks(a):  # [n, B, c, ...] -> [B, n * c, ...]
    return jnp.moveaxis(a, 0, 1).reshape(a.shape[1], -1, *a.shape[3:])


def _banded(q_BSHE, k_BSKE, v_BSKE, pos_BS, seg_BS, spec, c, lookback):
    """A local layer in O(S * (c + lookback)): query rows [s, s + c) see keys [s - lookback, s + c).

    Keys are padded with `lookback` in front (and queries and keys at the end up to a whole
    number of chunks), so every chunk slices a band of the same static length J = c + lookback.
    """
    S = q_BSHE.shape[1]
    n = -(-S // c)
    tail = n * c - S

    def pad(a, front, back):
        return jnp.pad(a, [(0, 0), (front, back)] + [(0, 0)] * (a.ndim - 2))

    J = c + lookback
    k_pad, v_pad, pos_k_pad = pad(k_BSKE, lookback, tail), pad(v_BSKE, lookback, tail), pad(pos_BS, lookback, tail)
    seg_k_pad = None if seg_BS is None else pad(seg_BS, lookback, tail)

    def band(a, start):  # padded index start .. start + J is key index start - lookback .. start + c
        return None if a is None else jax.lax.dynamic_slice_in_dim(a, start, J, axis=1)

    @jax.checkpoint
    def one_chunk(xs):
        q_BcHE, start, seg_Bc, pos_Bc = xs
        k_idx_J = start - lookback + jnp.arange(J)
        allowed = visible(
            start + jnp.arange(c), k_idx_J, S, seg_Bc, band(seg_k_pad, start), pos_Bc, band(pos_k_pad, start), spec
        )
        return _attend_rows(q_BcHE, band(k_pad, start), band(v_pad, start), allowed)

    starts = jnp.arange(n, dtype=jnp.int32) * c
    seg_q = None if seg_BS is None else _to_chunks(pad(seg_BS, 0, tail), n)
    chunks = (_to_chunks(pad(q_BSHE, 0, tail), n), starts, seg_q, _to_chunks(pad(pos_BS, 0, tail), n))
    return _from_chunks(jax.lax.map(one_chunk, chunks))[:, :S]


def _attend_rows(q_BcHE, k_BJKE, v_BJKE, allowed_BcJ):
    """c query rows against J keys, masked by `allowed` ([B or 1, c, J])."""
    B, c, H, E = q_BcHE.shape
    K = k_BJKE.shape[2]
    q_BcKGE = q_BcHE.reshape(B, c, K, H // K, E)
    scores_BKGcJ = jnp.einsum("bckgd,blkd->bkgcl", q_BcKGE, k_BJKE, preferred_element_type=jnp.float32)
    scores_BKGcJ = scores_BKGcJ * (E**-0.5)
    scores_BKGcJ = jnp.where(allowed_BcJ[:, None, None], scores_BKGcJ, jnp.finfo(jnp.float32).min)
    probs_BKGcJ = jax.nn.softmax(scores_BKGcJ, axis=-1).astype(v_BJKE.dtype)
    out_BcKGE = jnp.einsum("bkgcl,blkd->bckgd", probs_BKGcJ, v_BJKE, preferred_element_type=jnp.float32)
    return out_BcKGE.reshape(B, c, H, E).astype(q_BcHE.dtype)


def cudnn_attention(q_BSHE, k_BSKE, v_BSKE, segment_ids_BS=None, positions_BS=None, spec=FULL):
    S = q_BSHE.shape[1]
    m = None
    if segment_ids_BS is not None or spec.local:  # cuDNN takes a dense mask: O(S^2), but exact
        idx = jnp.arange(S)
        pos = positions_BS if positions_BS is not None else jnp.broadcast_to(idx, q_BSHE.shape[:2])
        m = visible(idx, idx, S, segment_ids_BS, segment_ids_BS, pos, pos, spec)[:, None]
    return jax.nn.dot_product_attention(q_BSHE, k_BSKE, v_BSKE, mask=m, is_causal=True, implementation="cudnn")


def nope_temperature_scale(positions_BS, floor_scale: float, attn_scale: float):
    """Llama 4's query temperature on NoPE layers: log1p(floor((pos + 1) / floor_scale)) * attn_scale + 1."""
    pos = positions_BS.astype(jnp.float32)
    return jnp.log1p(jnp.floor((pos + 1.0) / floor_scale)) * attn_scale + 1.0


def l2_norm(x_BSHE, eps: float):
    """Llama 4's weightless QK-norm: x * rsqrt(mean(x^2) + eps) in fp32, cast back."""
    x = x_BSHE.astype(jnp.float32)
    return (x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)).astype(x_BSHE.dtype)


def attend(
    q_BSHE, k_BSKE, v_BSKE, *, positions_BS, segment_ids_BS, spec: LayerSpec, cos_sin, rope, impl: str, norm_eps=1e-6,
    rope_on=None,
):  # fmt: skip
    """Causal attention of one layer as `spec` says. q and k arrive un-rotated.

    `rope` and `cos_sin` are this layer's frequencies (None on NoPE layers). An L2 QK-norm
    follows RoPE, so its layers are rotated here on every path, and the kernel gets rope=False.
    A `spec.rope_flag` body (layers.traced_specs) rotates by the traced `rope_on`: 1.0 as `rope`
    says, 0.0 by angle 0 (cos 1, sin 0, and a zero frequency in the kernel): q and k unchanged.
    """
    C = sharding.context_size()
    impl = resolve_impl(impl, q_BSHE.shape[-1], context_chunk=q_BSHE.shape[1] // (2 * C) if C > 1 else None)
    rotate_here = spec.use_rope and (impl != "pallas" or spec.qk_norm == "l2")
    if spec.rope_flag:
        rope = rope._replace(inv_freq=jnp.asarray(rope.inv_freq) * rope_on)
    if rotate_here:
        cos_BSR, sin_BSR = cos_sin
        if spec.rope_flag:
            cos_BSR, sin_BSR = jnp.where(rope_on > 0, cos_BSR, 1), jnp.where(rope_on > 0, sin_BSR, 0)
        q_BSHE = rope_lib.apply_rope(q_BSHE, cos_BSR, sin_BSR, spec.rope_layout)
        k_BSKE = rope_lib.apply_rope(k_BSKE, cos_BSR, sin_BSR, spec.rope_layout)
    if spec.qk_norm == "l2":
        q_BSHE, k_BSKE = l2_norm(q_BSHE, norm_eps), l2_norm(k_BSKE, norm_eps)
    if impl == "pallas":
        rotate = spec.use_rope and not rotate_here
        return _pallas(q_BSHE, k_BSKE, v_BSKE, positions_BS, segment_ids_BS, spec, rope, rotate)
    if spec.nope_temperature is not None:
        scale_BS = nope_temperature_scale(positions_BS, *spec.nope_temperature)
        q_BSHE = (q_BSHE.astype(jnp.float32) * scale_BS[:, :, None, None]).astype(q_BSHE.dtype)
    if sharding.context_size() > 1:  # cuDNN takes no suffix queries: XLA per device
        inner = lambda q, k, v, pos, seg: xla_attention(q, k, v, seg, positions_BS=pos, spec=spec)
        return context.attend(inner, q_BSHE, k_BSKE, v_BSKE, positions_BS, segment_ids_BS, lookback=_lookback(spec))
    if impl == "cudnn":
        return cudnn_attention(q_BSHE, k_BSKE, v_BSKE, segment_ids_BS, positions_BS, spec)
    return xla_attention(q_BSHE, k_BSKE, v_BSKE, segment_ids_BS, positions_BS=positions_BS, spec=spec)


def _lookback(spec: LayerSpec, align: int = 1) -> int | None:
    """How far back (in tokens) a query of this layer can see, rounded up to `align`; None if unbounded.

    Sliding layers see W - 1 keys back (positions advance by one per token within a document);
    chunked layers are treated as global under context parallelism (their chunk boundaries are on
    positions, which restart per document)."""
    if spec.attention != "sliding":
        return None
    return -(-(spec.window - 1) // align) * align


def _platform() -> str:
    """The platform being compiled for: the mesh's devices (TPU in an AOT dry run), else the default."""
    return sharding.compile_platform()


def kernel_options(spec: LayerSpec, rotate: bool) -> dict:
    """The kernel's per-layer keyword arguments, only those that differ from their defaults."""
    options = {}
    if spec.attention == "sliding":
        options["sliding_window"] = spec.window
    elif spec.attention == "chunked":
        options["chunk_size"] = spec.window
    if rotate and spec.rotary_fraction != 1.0:
        options["partial_rotary_factor"] = spec.rotary_fraction
    if rotate and spec.rope_layout != "half":
        options["rope_layout"] = spec.rope_layout
    if spec.nope_temperature is not None:
        options["nope_temperature"] = spec.nope_temperature
    return options


def _pallas(q_BSHE, k_BSKE, v_BSKE, positions_BS, segment_ids_BS, spec, rope, rotate):
    """The fused-RoPE flash kernel; under a mesh it runs per shard (batch and heads split).

    Inside `shard_map` each device sees its batch rows and its heads. With a `context` axis the
    sequence is split too, and `context.attend` gives the kernel suffix queries per device: spans
    whose lengths are multiples of 128 (TPU lanes), so the halo is rounded up to 128 keys.
    """
    from nopejax.kernels import flash_attention

    platform = _platform()
    options = kernel_options(spec, rotate)
    backend = {"tpu": "tpu", "gpu": "gpu", "cuda": "gpu", "rocm": "gpu"}.get(platform)

    def kernel(q, k, v, pos, seg):
        return flash_attention(
            q, k, v, segment_ids=seg, positions=pos, rope=rotate,
            inv_freq=jnp.asarray(rope.inv_freq) if rotate else None,  # [R / 2]: the rotated width's
            rope_attention_factor=rope.attention_factor if rotate else 1.0, causal=True,
            interpret=platform == "cpu", backend=backend, **options,
        )  # fmt: skip

    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
        return kernel(q_BSHE, k_BSKE, v_BSKE, positions_BS, segment_ids_BS)
    if sharding.context_size(mesh) > 1:
        lookback = _lookback(spec, align=128)
        return context.attend(kernel, q_BSHE, k_BSKE, v_BSKE, positions_BS, segment_ids_BS, lookback=lookback)
    heads = sharding.logical_to_spec(["act_batch", "act_seq", "act_heads", None], mesh)
    rows = sharding.logical_to_spec(["act_batch", "act_seq"], mesh)
    has_segments = segment_ids_BS is not None
    operands = (q_BSHE, k_BSKE, v_BSKE, positions_BS) + ((segment_ids_BS,) if has_segments else ())
    specs = (heads, heads, heads, rows) + ((rows,) if has_segments else ())

    @functools.partial(jax.shard_map, in_specs=specs, out_specs=heads, check_vma=False)
    def per_shard(q, k, v, pos, *seg):
        return kernel(q, k, v, pos, seg[0] if seg else None)

    return per_shard(*operands)
