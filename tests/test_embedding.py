"""The embedding lookup under a mesh (nopejax/embedding.py): the rows and the table's gradient equal
a plain `jnp.take` on one device, and no device receives the table or its gradient whole."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks.hlo_collectives import collective_bytes
from nopejax import embedding, sharding
from nopejax.config import base_config

V, D, B, S = 1024, 64, 8, 16  # a table 8x the size of one step's rows, so moving it shows
BATCH = ("act_batch", "act_seq")

MESHES = [
    dict(fsdp=8),
    dict(data=2, fsdp=4),
    dict(fsdp=2, context=2, tensor=2),
    dict(expert=2, fsdp=2, context=2),
    dict(data=2, context=2, tensor=2),
    dict(data=8),  # D whole everywhere: the partitioner's lookup
]


def _mesh(**axes):
    cfg = base_config().mesh
    cfg.data = 1
    cfg.update(axes)
    return sharding.make_mesh(cfg, jax.devices()[:8])


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(0)
    table_VD = jnp.asarray(rng.normal(size=(V, D)), jnp.float32)
    tokens_BS = jnp.asarray(rng.integers(0, V, size=(B, S)), jnp.int32)
    tokens_BS = tokens_BS.at[0, :4].set(7)  # a repeated token: its gradient rows add up
    weight_BSD = jnp.asarray(rng.normal(size=(B, S, D)), jnp.float32)
    return table_VD, tokens_BS, weight_BSD


def _value_and_grad(weight_BSD, dtype):
    def loss(table_VD, tokens_BS):
        rows_BSD = embedding.lookup(table_VD, tokens_BS, dtype)
        return jnp.sum(rows_BSD.astype(jnp.float32) * weight_BSD), rows_BSD

    return jax.jit(jax.value_and_grad(loss, has_aux=True))


@pytest.mark.parametrize("axes", MESHES, ids=lambda a: "-".join(f"{k}{v}" for k, v in a.items()))
def test_lookup_equals_one_device_and_moves_no_table(axes, inputs):
    table_VD, tokens_BS, weight_BSD = inputs
    want_rows = jnp.take(table_VD, tokens_BS, axis=0)
    # the gradient written out: each token's weight row added into its table row
    want_grad = np.zeros((V, D), np.float32)
    np.add.at(want_grad, np.asarray(tokens_BS).ravel(), np.asarray(weight_BSD).reshape(-1, D))
    mesh = _mesh(**axes)
    step = _value_and_grad(weight_BSD, jnp.float32)
    with jax.set_mesh(mesh):
        table = jax.device_put(table_VD, jax.NamedSharding(mesh, sharding.logical_to_spec(("vocab", "embed"), mesh)))
        tokens = jax.device_put(tokens_BS, jax.NamedSharding(mesh, sharding.logical_to_spec(BATCH, mesh)))
        (_, rows_BSD), grad_VD = step(table, tokens)
        hlo = step.lower(table, tokens).compile().as_text()
    np.testing.assert_array_equal(rows_BSD, want_rows)  # a lookup: exact
    np.testing.assert_allclose(grad_VD, want_grad, rtol=0, atol=1e-6)  # fp32 sums in another order: measured 4.8e-7
    # what one device receives: its tokens' rows (B S D / devices, forward and backward) and the ids;
    # of the table only the data-parallel all-reduce of its own share's gradient, as of every weight.
    # The partitioner's lookup gathers the whole table and all-reduces its whole gradient.
    table_bytes, data = V * D * 4, mesh.shape["data"]
    share = table_bytes // np.prod([mesh.shape[a] for a in jax.tree.leaves(tuple(table.sharding.spec))])
    moved = sum(row["moved_bytes"] for row in collective_bytes(hlo).values()) - 2 * share * (data - 1) / data
    assert moved < table_bytes / 8, f"{moved:.0f} bytes received besides the share; the table is {table_bytes}"
    assert grad_VD.sharding.spec == table.sharding.spec  # the gradient stays where the table lives


def test_lookup_in_bfloat16_accumulates_the_gradient_in_the_tables_dtype(inputs):
    """A bf16 model looks up bf16 rows, but a token seen many times sums its gradient in fp32."""
    table_VD, _, _ = inputs
    tokens_BS = jnp.full((B, S), 3, jnp.int32)  # one token, 128 times
    weight_BSD = jnp.full((B, S, D), 1.0 + 2.0**-7, jnp.float32)  # not a bf16 sum's multiple after ~64 adds
    step = _value_and_grad(weight_BSD, jnp.bfloat16)
    with jax.set_mesh(_mesh(fsdp=8)):
        (_, rows_BSD), grad_VD = step(table_VD, tokens_BS)
    assert rows_BSD.dtype == jnp.bfloat16
    # each row's cotangent is bf16 (the rows' dtype); 1 + 2^-7 is one exactly, and 128 of them sum
    # exactly in fp32, not in bf16 (whose 8-bit mantissa stops adding 1.0078 near 256)
    np.testing.assert_array_equal(grad_VD[3], np.full(D, B * S * (1.0 + 2.0**-7), np.float32))
