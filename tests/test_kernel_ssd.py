"""The Pallas intra-chunk SSD kernels (nopejax/kernels/ssd.py) against XLA's chunked form
(nopejax.mixers.ssd.intra_chunk, itself tested against a sequential recurrence in test_ssd.py):
values and gradients in interpret mode on CPU, with and without document starts inside chunks;
then the Mosaic compile for a v5p chip ahead of time, forward and backward.

Tiny odd sizes: 2 groups of 3 heads, state 5, head dim 3, chunks of 7.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nopejax.kernels.ssd import ssd_intra_chunk
from nopejax.mixers.ssd import intra_chunk

F32, BF16 = jnp.float32, jnp.bfloat16


def _inputs(Bz=2, t=3, c=7, K=2, G=3, E=5, P=3, packed=True, seed=0):
    ks = jax.random.split(jax.random.key(seed), 5)
    C = jax.random.normal(ks[0], (Bz, t, c, K, E))
    B = jax.random.normal(ks[1], (Bz, t, c, K, E))
    xdt = jax.random.normal(ks[2], (Bz, t, c, K, G, P))
    a = -jax.nn.softplus(jax.random.normal(ks[3], (Bz, t, K, G, c)))  # log decays dt * A < 0
    starts = jax.random.bernoulli(ks[4], 0.25, (Bz, t, c)) if packed else jnp.zeros((Bz, t, c), bool)
    return C, B, xdt, a, jnp.cumsum(starts, axis=-1).astype(jnp.int32)


def _rel_err(x, ref):
    x, ref = np.asarray(x, np.float32), np.asarray(ref, np.float32)
    return float(np.max(np.abs(x - ref)) / max(1.0, float(np.max(np.abs(ref)))))


@pytest.mark.parametrize("packed", [False, True])
def test_forward_and_gradients_match_xla_form(packed):
    C, B, xdt, a, doc = _inputs(packed=packed)
    if packed:
        assert int(doc.max()) > 0  # some chunk really holds a document start
    w = jax.random.normal(jax.random.key(9), xdt.shape)  # a cotangent that is not all ones

    def loss(fn):
        return lambda *args: jnp.sum(fn(*args, doc) * w)

    kernel = lambda *args: ssd_intra_chunk(*args, interpret=True)
    y, y_ref = jax.jit(kernel)(C, B, xdt, a, doc), jax.jit(intra_chunk)(C, B, xdt, a, doc)
    # measured: 1.9e-6 of max |y| ~ 15 (fp32 matmuls in a different order)
    assert _rel_err(y, y_ref) < 2e-5
    grads = jax.jit(jax.grad(loss(kernel), argnums=(0, 1, 2, 3)))(C, B, xdt, a)
    grads_ref = jax.jit(jax.grad(loss(intra_chunk), argnums=(0, 1, 2, 3)))(C, B, xdt, a)
    for name, g, g_ref in zip(("dC", "dB", "dxdt", "da"), grads, grads_ref):
        assert _rel_err(g, g_ref) < 2e-5, name


def test_document_start_cuts_the_chunk():
    """Outputs before a start do not depend on inputs after it and vice versa (checked by gradients)."""
    C, B, xdt, a, _ = _inputs(Bz=1, t=1, c=7, packed=False)
    doc = jnp.array([[[0, 0, 0, 1, 1, 1, 1]]], jnp.int32)  # a document starts at position 3
    out_after = lambda x: ssd_intra_chunk(C, B, x, a, doc, interpret=True)[0, 0, 3:].sum()
    out_before = lambda x: ssd_intra_chunk(C, B, x, a, doc, interpret=True)[0, 0, :3].sum()
    assert np.all(np.asarray(jax.grad(out_after)(xdt))[0, 0, :3] == 0)
    assert np.all(np.asarray(jax.grad(out_before)(xdt))[0, 0, 3:] == 0)


def test_bad_inputs_raise_clear_errors():
    C, B, xdt, a, doc = _inputs()
    with pytest.raises(ValueError, match="must share"):
        ssd_intra_chunk(C, B[:, :2], xdt, a, doc, interpret=True)
    with pytest.raises(ValueError, match="backend must be"):
        ssd_intra_chunk(C, B, xdt, a, doc, backend="gpu")
    if jax.default_backend() == "cpu":
        with pytest.raises(ValueError, match="interpret=True"):
            ssd_intra_chunk(C, B, xdt, a, doc)


# ----------------------------------------------------------------------------- the real compiler


def _v5p_single_device_sharding():
    try:
        from jax.experimental import topologies

        topo = topologies.get_topology_desc(topology_name="v5p:2x2x1", platform="tpu")
    except Exception as e:  # libtpu absent or too old for this topology
        pytest.skip(f"TPU topology unavailable (is libtpu installed?): {e}")
    return jax.sharding.SingleDeviceSharding(topo.devices[0])


@pytest.mark.parametrize("dtype", [F32, BF16])
def test_tpu_lowering_compiles_ahead_of_time_for_v5p(dtype):
    """Mosaic accepts the forward and backward kernels at a 3B hybrid's Mamba2 shape (chunk 256,
    state 128, head dim 64), packed documents included."""
    sharding = _v5p_single_device_sharding()
    Bz, t, c, K, G, E, P = 1, 4, 256, 1, 4, 128, 64
    shape = lambda *s, dt=dtype: jax.ShapeDtypeStruct(s, dt, sharding=sharding)
    args = (shape(Bz, t, c, K, E), shape(Bz, t, c, K, E), shape(Bz, t, c, K, G, P), shape(Bz, t, K, G, c, dt=F32),
            shape(Bz, t, c, dt=jnp.int32))  # fmt: skip

    def loss(C, B, xdt, a, doc):
        return jnp.sum(ssd_intra_chunk(C, B, xdt, a, doc, backend="tpu") ** 2)

    compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3))).lower(*args).compile()
    assert compiled.as_text().count('custom_call_target="tpu_custom_call"') == 2
    temp = compiled.memory_analysis().temp_size_in_bytes
    # what the kernels' custom VJP keeps in HBM: y, dy and the layout copies, O(S) not O(S c) per head
    assert temp < 64 * Bz * t * c * K * G * max(E, P) * 4, temp
