"""Context parallelism: one row's sequence split over the `context` mesh axis.

Causal load balancing (torchtitan's head-tail, MaxText's load-balanced CP): each row is cut into
2C chunks and reordered once, at data loading, so that context device i holds chunks i and
2C-1-i. A causal query in chunk j sees about j chunks of keys, so every device gets the same
share of the work (chunk i and chunk 2C-1-i together see 2C chunks). The reorder moves
`inputs`, `targets`, `positions`, `segment_ids` and `loss_mask` together; the loss is a sum over
tokens and attention masks come from true positions and document ids, so training is exact.

Attention under it (`attend`): inside `shard_map` each device keeps its two query chunks and
either all-gathers K, V, positions and document ids over the context axis (global layers; GQA
makes K and V small) and undoes the zig-zag on the key side, or, for a sliding window of W <= c + 1
keys (c the chunk length), fetches only the W - 1 keys before each of its chunks from the device
that holds them (a halo, `ppermute`), so local layers cost O(c * W) per device and no gather
of the sequence. Each query chunk then attends to a contiguous span of the true sequence that
ends with itself: `inner(q, k, v, positions, segment_ids)` with the queries being the last rows of
the keys (XLA path or the flash kernel). Differentiating all_gather gives the reduce-scatter of
dK and dV; ppermute's transpose sends the halo's gradient back.

Recurrent mixers under it (`recurrence`, for Mamba2's SSD): the state crosses shards as a summary.
Each device sees each of its chunks after a halo of the tokens before it (as sliding attention), so a
short conv and the document-start test are exact; it summarises each chunk from a zero state as
(transition, end state) (for SSD: total decay, 0 if a document starts inside; the end state from
zero), all-gathers the 2C summaries (small: no sequence axis), chains them in natural chunk order on
every device, and reruns each chunk from its true incoming state. Memory stays O(S / C) per device;
the gather's gradient is a reduce-scatter.

Shape letters: B batch, S sequence (s = S / C per device, c = s / 2 per chunk), H query heads,
K kv heads, E head dim, J keys of a span.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from nopejax import sharding

PAD_SEGMENT = -1  # document id of keys that do not exist (before the sequence start): matches no query


def zigzag_order(seq_len: int, num_shards: int) -> np.ndarray:
    """[S] indices into the natural order: position t of the reordered row holds token order[t].

    Device i's contiguous block of S / C holds chunks i and 2C-1-i (each S / 2C tokens).
    """
    C = num_shards
    if seq_len % (2 * C):
        raise ValueError(f"seq_len {seq_len} is not divisible by 2 x {C} context shards")
    c = seq_len // (2 * C)
    chunks = [j for i in range(C) for j in (i, 2 * C - 1 - i)]
    return np.concatenate([np.arange(j * c, (j + 1) * c) for j in chunks])


def reorder(batch: dict, num_shards: int) -> dict:
    """Every [B, S] array of a batch into zig-zag order (identity for one shard)."""
    if num_shards == 1:
        return batch
    return {k: v[:, zigzag_order(v.shape[1], num_shards)] for k, v in batch.items()}


def restore(batch: dict, num_shards: int) -> dict:
    """The inverse of `reorder`: [B, S] arrays back into natural order."""
    if num_shards == 1:
        return batch
    return {k: v[:, np.argsort(zigzag_order(v.shape[1], num_shards))] for k, v in batch.items()}


# ---------------------------------------------------------------------------------------------
# Inside shard_map: one device's rows [B, s = 2c] are chunks (d, 2C-1-d) of the row


def _natural(x_Bs, C: int, axis: str):
    """All-gather a zig-zag-sharded [B, s, ...] array over `axis` and return it in natural order [B, S, ...].

    Gathered, device i's block [chunk i, chunk 2C-1-i] comes i-th: chunks 0..C-1 are the first
    halves in device order, chunks C..2C-1 the second halves in reverse device order.
    """
    g = jax.lax.all_gather(x_Bs, axis, axis=1, tiled=True)  # [B, C * s, ...]
    B, c = g.shape[0], x_Bs.shape[1] // 2
    halves = g.reshape(B, C, 2, c, *g.shape[2:])
    first = halves[:, :, 0].reshape(B, C * c, *g.shape[2:])
    second = halves[:, ::-1, 1].reshape(B, C * c, *g.shape[2:])
    return jnp.concatenate([first, second], axis=1)


def _prefix_span(x_BS, end, span: int, fill):
    """The `span` entries of a natural-order [B, S, ...] array that end (exclusive) at index `end`,
    with `fill` standing in for indices below 0: a static-length window over a traced end."""
    front = jnp.full((x_BS.shape[0], span, *x_BS.shape[2:]), fill, x_BS.dtype)
    padded = jnp.concatenate([front, x_BS], axis=1)
    return jax.lax.dynamic_slice_in_dim(padded, end, span, axis=1)


def _halos(x_Bs, lookback: int, C: int, d, axis: str, fill):
    """The `lookback` entries before each of this device's two chunks: ([B, lookback, ...] x 2).

    Chunk d's come from the end of chunk d-1 (first half of device d-1; nothing for d = 0: `fill`);
    chunk 2C-1-d's from the end of chunk 2C-2-d: the second half of device d+1, or for d = C-1 this
    device's own first half. Needs lookback <= c.
    """
    c = x_Bs.shape[1] // 2
    tail_a, tail_b = x_Bs[:, c - lookback : c], x_Bs[:, 2 * c - lookback :]
    from_left = jax.lax.ppermute(tail_a, axis, [(i, i + 1) for i in range(C - 1)])
    from_right = jax.lax.ppermute(tail_b, axis, [(i + 1, i) for i in range(C - 1)])
    halo_a = jnp.where(d == 0, jnp.asarray(fill, x_Bs.dtype), from_left)
    halo_b = jnp.where(d == C - 1, tail_a, from_right)
    return halo_a, halo_b


def _spans(arrays, lookback: int | None, C: int, d, axis: str):
    """Per query chunk (2), the key span ending with it: a list of (k, v, positions, segment_ids)."""
    fills = (0, 0, 0, PAD_SEGMENT)
    c = arrays[0].shape[1] // 2
    if lookback is not None and lookback <= c:
        if lookback == 0:
            return [tuple(a[:, i * c : (i + 1) * c] for a in arrays) for i in range(2)]
        halos = [_halos(a, lookback, C, d, axis, f) for a, f in zip(arrays, fills)]
        return [
            tuple(jnp.concatenate([h[i], a[:, i * c : (i + 1) * c]], axis=1) for h, a in zip(halos, arrays))
            for i in range(2)
        ]
    natural = [_natural(a, C, axis) for a in arrays]
    S = natural[0].shape[1]
    ends = ((d + 1) * c, (2 * C - d) * c)  # chunk d and chunk 2C-1-d end here (exclusive)
    return [tuple(_prefix_span(a, end, S, f) for a, f in zip(natural, fills)) for end in ends]


def attend(inner, q_BSHE, k_BSKE, v_BSKE, positions_BS, segment_ids_BS, *, lookback: int | None = None):
    """Attention of zig-zag-ordered rows under the abstract mesh's `context` axis.

    `inner(q [B, c, H, E], k [B, J, K, E], v, positions [B, J], segment_ids [B, J]) -> [B, c, H, E]`
    attends causally with the queries being the last c of the J keys (masks by index within the
    span, windows by position, documents by id). `lookback`: keys further back than this are never
    visible (W - 1 for a sliding window of W), so a halo suffices; None for global layers.
    """
    mesh = jax.sharding.get_abstract_mesh()
    C = sharding.context_size(mesh)
    axis = sharding.CONTEXT_AXIS
    heads = sharding.logical_to_spec(["act_batch", "act_seq", "act_heads", None], mesh)
    rows = sharding.logical_to_spec(["act_batch", "act_seq"], mesh)
    if segment_ids_BS is None:  # one document per row; spans still need ids for their padding
        segment_ids_BS = jnp.zeros(positions_BS.shape, jnp.int32)

    @functools.partial(jax.shard_map, in_specs=(heads, heads, heads, rows, rows), out_specs=heads, check_vma=False)
    def per_shard(q, k, v, pos, seg):
        d = jax.lax.axis_index(axis)
        c = q.shape[1] // 2
        spans = _spans((k, v, pos, seg.astype(jnp.int32)), lookback, C, d, axis)
        outs = [inner(q[:, i * c : (i + 1) * c], *span) for i, span in enumerate(spans)]
        return jnp.concatenate(outs, axis=1)

    return per_shard(q_BSHE, k_BSKE, v_BSKE, positions_BS, segment_ids_BS)


def recurrence(summarize, run, combine, consts, xs_BS: tuple, segment_ids_BS, *, lookback: int):
    """A left-to-right recurrence over zig-zag-ordered rows under the `context` axis -> [B, S, ...].

    Per chunk (each device's two), with T = lookback + c tokens (the `lookback` before the chunk,
    then the chunk; `fill` 0 and segment id PAD_SEGMENT's 0 before the row's start):
    `summarize(consts, xs [B, T, ...], segment_ids [B, T]) -> (transition, state_from_zero)`, the
    chunk's effect on any incoming state, from its own tokens alone; `combine(transition,
    state_in, state_from_zero) -> state_out` chains them (`ssd.combine`); `run(consts, xs,
    segment_ids, state_in) -> [B, c, ...]`, the chunk's outputs from its true incoming state.
    Summaries are gathered over the axis and chained in natural chunk order on every device.
    """
    mesh = jax.sharding.get_abstract_mesh()
    C = sharding.context_size(mesh)
    axis = sharding.CONTEXT_AXIS
    rows = sharding.logical_to_spec(["act_batch", "act_seq"], mesh)  # trailing dims replicated
    if segment_ids_BS is None:  # one document per row
        segment_ids_BS = jnp.ones(xs_BS[0].shape[:2], jnp.int32)
    in_specs = (jax.tree.map(lambda _: jax.P(), consts), tuple(rows for _ in xs_BS), rows)

    @functools.partial(jax.shard_map, in_specs=in_specs, out_specs=rows, check_vma=False)
    def per_shard(consts, xs, seg):
        d = jax.lax.axis_index(axis)
        c = seg.shape[1] // 2
        seg = seg.astype(jnp.int32)
        halos = [_halos(a, lookback, C, d, axis, 0) for a in (*xs, seg)]
        pieces = [  # per own chunk: its xs and segment ids, each after its halo
            [jnp.concatenate([h[i], a[:, i * c : (i + 1) * c]], axis=1) for h, a in zip(halos, (*xs, seg))]
            for i in range(2)
        ]
        summaries = [summarize(consts, tuple(p[:-1]), p[-1]) for p in pieces]
        # [C, 2, ...] over devices and slots -> [2C, ...] in natural order: chunk j < C is device j's
        # first slot, chunk j >= C device 2C-1-j's second
        gathered = jax.tree.map(lambda a, b: jax.lax.all_gather(jnp.stack([a, b]), axis), *summaries)
        natural = jax.tree.map(lambda g: jnp.concatenate([g[:, 0], g[::-1, 1]]), gathered)

        def step(state_in, summary):
            transition, from_zero = summary
            return combine(transition, state_in, from_zero), state_in

        _, incoming = jax.lax.scan(step, jnp.zeros_like(natural[1][0]), natural)  # [2C, ...]: into chunk j
        outs = [run(consts, tuple(p[:-1]), p[-1], incoming[j]) for p, j in zip(pieces, (d, 2 * C - 1 - d))]
        return jnp.concatenate(outs, axis=1)

    return per_shard(consts, tuple(xs_BS), segment_ids_BS)
