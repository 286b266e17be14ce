"""The token embedding lookup under a mesh: the token ids travel, not the table.

The table [V, D] is stored with D split over the weight-sharding axes (`embed`: fsdp, context,
expert) and V over `vocab` (tensor). Gathering it whole for the lookup, as the partitioner would,
moves V x D per device and step (1 GiB in fp32 at V 128k, D 2048), and its gradient comes back as
an all-reduce of the whole table, twice that. Here each device instead gathers the token ids of its
D-group (int32: a few KiB), looks up its own D columns for all of them, and one all-to-all hands
every device its own tokens' rows with D whole: tokens x D bytes, the size of the embeddings
themselves. The backward pass is the transpose (an all-to-all of the rows' gradient, then each
device's scatter-add into its own columns), so no device ever holds the table or its gradient
whole. Measured in docs/results/tpu-aot.md ("The embedding lookup").
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from nopejax.sharding import constrain, mesh_axes


def _size(axes: tuple[str, ...], mesh) -> int:
    return math.prod(mesh.shape[a] for a in axes)


def lookup(table_VD: jax.Array, tokens_BS: jax.Array, dtype) -> jax.Array:
    """table [V, D] (any dtype), tokens int32 [B, S] -> rows [B, S, D] in `dtype`, sharded like
    the activations (`act_batch`, `act_seq`). The same values as `jnp.take(table, tokens)` on one
    device; the gradient accumulates in the table's dtype (fp32 for a bf16 model's fp32 table)."""
    mesh = jax.sharding.get_abstract_mesh()
    (V, D), (B, S) = table_VD.shape, tokens_BS.shape
    if mesh is None or mesh.empty or math.prod(mesh.shape.values()) == 1:
        return jnp.take(table_VD, tokens_BS, axis=0).astype(dtype)
    d_axes, batch_axes, seq_axes = mesh_axes("embed", mesh), mesh_axes("act_batch", mesh), mesh_axes("act_seq", mesh)
    vocab_axes = mesh_axes("vocab", mesh)
    vocab_axes = vocab_axes if V % _size(vocab_axes, mesh) == 0 else ()
    n = _size(d_axes, mesh)
    if n == 1 or D % n or B % _size(batch_axes, mesh) or S % _size(seq_axes, mesh):
        # D whole on every device already (or a generation batch the mesh does not divide): the
        # table gathered over D is small or unavoidable, and the partitioner does it
        table_VD = constrain(table_VD, ("vocab", "act_embed"))
        return jnp.take(table_VD, tokens_BS, axis=0).astype(dtype)

    def per_device(table_vd, tokens_bs):
        tokens_nbs = jax.lax.all_gather(tokens_bs, d_axes)  # the D-group's tokens, in group order
        if vocab_axes:  # vocabulary-parallel: rows of other devices' vocabulary are zero here
            v = table_vd.shape[0]
            local_nbs = tokens_nbs - jax.lax.axis_index(vocab_axes) * v
            inside_nbs = (local_nbs >= 0) & (local_nbs < v)
            rows_nbsd = jnp.take(table_vd, jnp.where(inside_nbs, local_nbs, 0), axis=0)
            rows_nbsd = jnp.where(inside_nbs[..., None], rows_nbsd, 0).astype(dtype)
            rows_nbsd = jax.lax.psum(rows_nbsd, vocab_axes)  # one nonzero term per row: exact in any dtype
        else:
            rows_nbsd = jnp.take(table_vd, tokens_nbs, axis=0).astype(dtype)
        # piece j (device j's tokens, my columns) goes to device j; my tokens' pieces arrive in
        # group order, which is the order of D's shards
        rows_1bsD = jax.lax.all_to_all(rows_nbsd, d_axes, split_axis=0, concat_axis=3, tiled=True)
        return rows_1bsD[0]

    batch, seq = batch_axes or None, seq_axes or None
    return jax.shard_map(
        per_device,
        in_specs=(PartitionSpec(vocab_axes or None, d_axes), PartitionSpec(batch, seq)),
        out_specs=PartitionSpec(batch, seq, None),
    )(table_VD, tokens_BS)
