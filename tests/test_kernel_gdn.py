"""The Pallas Gated DeltaNet kernels (nopejax/kernels/gdn.py) against XLA's chunked form (nopejax.mixers.gated_delta's
`ut_transform` and `chunk_output`) and against a plain token-by-token recurrence written here: values and
gradients of every input in interpret mode on CPU, with document starts inside chunks, S not a multiple of
the chunk, negative eigenvalues (beta up to 2) and aligned keys; then the Mosaic compile for a v5p chip
ahead of time, forward and backward.

Tiny odd sizes: 2 key heads serving 4 value heads, key dim 5, value dim 3, chunks of 7 (not a power of two)
and 8.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nopejax.kernels.gdn import gdn_chunk_output, gdn_ut_transform
from nopejax.mixers import gated_delta as gd
from nopejax.mixers.ssd import document_starts

F32, BF16 = jnp.float32, jnp.bfloat16
K, G, E, P = 2, 2, 5, 3
PALLAS = gd.Intra(
    functools.partial(gdn_ut_transform, interpret=True), functools.partial(gdn_chunk_output, interpret=True)
)


def _normed(x):
    return x / jnp.sqrt(jnp.sum(x * x, -1, keepdims=True))


def _rel_err(x, ref):
    x, ref = np.asarray(x, np.float32), np.asarray(ref, np.float32)
    assert np.all(np.isfinite(x))
    return float(np.max(np.abs(x - ref)) / max(1.0, float(np.max(np.abs(ref)))))


def _parts(Bz=2, t=2, c=7, aligned=False, seed=0):
    """Inputs of both parts in gated_delta's chunk layout; documents start inside chunks; beta in (0, 2)."""
    ks = jax.random.split(jax.random.key(seed), 8)
    k = _normed(jax.random.normal(ks[0], (Bz, t, c, K, E)))
    if aligned:  # every key the same: A's entries are beta exp(decay), near 2, and T's entries do not decay
        k = jnp.broadcast_to(k[:, :, :1], k.shape)
    beta = 2 * jax.nn.sigmoid(jax.random.normal(ks[1], (Bz, t, K, G, c)) + (3.0 if aligned else 0.0))
    g = -0.05 * jax.nn.softplus(jax.random.normal(ks[2], (Bz, t, K, G, c)))
    doc = jnp.cumsum(jax.random.bernoulli(ks[3], 0.2, (Bz, t, c)), axis=-1).astype(jnp.int32)
    return dict(
        q=jax.random.normal(ks[4], (Bz, t, c, K, E)) * E**-0.5,
        k=k,
        v=jax.random.normal(ks[5], (Bz, t, c, K, G, P)),
        beta=beta,
        cum=jnp.cumsum(g, axis=-1),
        doc=doc,
        new=jax.random.normal(ks[6], (Bz, t, K, G, c, P)),
        state=jax.random.normal(ks[7], (Bz, t, K, G, E, P)),
    )


def _weighted(fn, names, x, seed):
    """sum(out * w) over fn's outputs, w fixed random cotangents (not all ones), as a function of x[names]."""
    outs = jax.eval_shape(lambda: fn(**x))
    outs = outs if isinstance(outs, (tuple, list)) else [outs]
    ws = [jax.random.normal(jax.random.key(seed + i), o.shape) for i, o in enumerate(outs)]

    def loss(*args):
        y = fn(**{**x, **dict(zip(names, args))})
        y = y if isinstance(y, (tuple, list)) else [y]
        return sum(jnp.sum(a * w) for a, w in zip(y, ws))

    return jax.jit(jax.grad(loss, argnums=tuple(range(len(names)))))


UT_ARGS = ("k", "v", "beta", "cum")
OUT_ARGS = ("q", "k", "new", "state", "cum")


def _ut(impl):
    return lambda q=None, new=None, state=None, **x: impl.ut(x["k"], x["v"], x["beta"], x["cum"], x["doc"])


def _out(impl):
    return lambda v=None, beta=None, **x: impl.output(x["q"], x["k"], x["new"], x["state"], x["cum"], x["doc"])


@pytest.mark.parametrize("aligned", [False, True])
def test_parts_and_their_gradients_match_the_xla_form(aligned):
    """Both kernels, values and the gradients of every input, against gated_delta's XLA parts."""
    x = _parts(aligned=aligned)
    assert int(x["doc"].max()) > 0  # some chunk really holds a document start
    for part, names in ((_ut, UT_ARGS), (_out, OUT_ARGS)):
        got, want = jax.jit(part(PALLAS))(**x), jax.jit(part(gd.XLA_INTRA))(**x)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            assert _rel_err(a, b) < 2e-6  # measured: at most 1.5e-7 (fp32 sums in another order)
        grads = _weighted(part(PALLAS), names, x, 1)(*(x[n] for n in names))
        grads_ref = _weighted(part(gd.XLA_INTRA), names, x, 1)(*(x[n] for n in names))
        for name, a, b in zip(names, grads, grads_ref):
            assert _rel_err(a, b) < 5e-6, name  # measured: at most 5.4e-7 (d cum, aligned keys)


def test_inverse_survives_aligned_keys_where_a_series_does_not():
    """Aligned keys with beta near 2 in a chunk of 64: A's entries are near 2, so (I + A)^-1 has entries of size 1
    everywhere below the diagonal. The kernel's blocked inverse gives u = T (beta v) with (I + A) u = beta v to
    fp32 accuracy, as the XLA form's; the product series (I - A)(I + A^2)(I + A^4).. (exact in exact arithmetic)
    loses everything."""
    x = _parts(Bz=1, t=1, c=64, aligned=True)
    x["doc"] = jnp.zeros_like(x["doc"])  # one document: the whole [c, c] tile is coupled
    u, _ = jax.jit(PALLAS.ut)(x["k"], x["v"], x["beta"], x["cum"], x["doc"])
    kk = jnp.einsum("btlke,btmke->btklm", x["k"], x["k"])
    c = u.shape[-2]
    pair = jnp.exp(x["cum"][..., :, None] - x["cum"][..., None, :]) * jnp.tril(jnp.ones((c, c)), -1)
    A = x["beta"][..., :, None] * kk[:, :, :, None] * pair
    assert float(A.max()) > 1.9
    rhs = x["beta"][..., None] * jnp.moveaxis(x["v"], 2, -2)
    hi = functools.partial(jnp.matmul, precision=jax.lax.Precision.HIGHEST)
    residual = lambda u: float(jnp.abs(hi(jnp.eye(c) + A, u) - rhs).max()) / float(jnp.abs(rhs).max())
    u_xla, _ = jax.jit(gd.ut_transform)(x["k"], x["v"], x["beta"], x["cum"], x["doc"])
    assert residual(u) < 2e-5 and residual(u_xla) < 5e-5  # measured 2.3e-6 (kernel), 6.2e-6 (XLA)
    series, power = jnp.eye(c) - A, hi(A, A)
    for _ in range(5):  # (I - A)(I + A^2)(I + A^4)..(I + A^32): exact for c = 64, A^64 = 0
        series, power = hi(series, jnp.eye(c) + power), hi(power, power)
    assert residual(hi(series, rhs)) > 1.0  # measured 9e18: the series' error


def _recurrence(q_BSKE, k_BSKE, v_BSHO, g_BSH, beta_BSH, state_BHEO, segment_ids_BS):
    """Token by token: S <- exp(g) S (0 at a document start), S <- S + beta k (v - S^T k)^T, o = S^T q / sqrt(E);
    padding (segment id 0) leaves S as it is."""
    q_BSHE = jnp.repeat(q_BSKE, G, axis=2) * E**-0.5
    k_BSHE = jnp.repeat(k_BSKE, G, axis=2)
    prev_BS = jnp.concatenate([segment_ids_BS[:, :1], segment_ids_BS[:, :-1]], axis=1)
    start_BS = (segment_ids_BS != prev_BS) & (segment_ids_BS != 0)
    real_BS = segment_ids_BS != 0

    def token(s_BHEO, inputs):
        q, k, v, g, beta, start, real = inputs
        decay_BH = jnp.where(start[:, None], 0.0, jnp.where(real[:, None], jnp.exp(g), 1.0))
        beta = jnp.where(real[:, None], beta, 0.0)
        s_BHEO = decay_BH[..., None, None] * s_BHEO
        delta_BHO = beta[..., None] * (v - jnp.einsum("bhkv,bhk->bhv", s_BHEO, k))
        s_BHEO = s_BHEO + k[..., None] * delta_BHO[..., None, :]
        return s_BHEO, jnp.einsum("bhkv,bhk->bhv", s_BHEO, q)

    seq = [jnp.moveaxis(a, 1, 0) for a in (q_BSHE, k_BSHE, v_BSHO, g_BSH, beta_BSH, start_BS, real_BS)]
    final, o_SBHO = jax.lax.scan(token, state_BHEO, seq)
    return jnp.moveaxis(o_SBHO, 0, 1), final


@pytest.mark.parametrize("aligned", [False, True])
def test_rule_with_the_kernels_equals_the_token_recurrence(aligned):
    """gated_delta with both kernels (S = 21, chunks of 8: a padded tail) against the recurrence, outputs, final
    state and the gradients of q, k, v, g, beta and the initial state; packed rows with documents starting inside
    chunks and padding; beta in (0, 2); with `aligned` every key of a row equal."""
    Bz, S, H = 2, 21, K * G
    ks = jax.random.split(jax.random.key(3), 7)
    k = _normed(jax.random.normal(ks[1], (Bz, S, K, E)))
    if aligned:
        k = jnp.broadcast_to(k[:, :1], k.shape)
    args = dict(
        q_BSKE=jax.random.normal(ks[0], (Bz, S, K, E)),
        k_BSKE=k,
        v_BSHO=jax.random.normal(ks[2], (Bz, S, H, P)),
        g_BSH=-0.1 * jax.nn.softplus(jax.random.normal(ks[3], (Bz, S, H))),
        beta_BSH=2 * jax.nn.sigmoid(jax.random.normal(ks[4], (Bz, S, H)) + (3.0 if aligned else 0.0)),
        initial_state_BHEO=jax.random.normal(ks[5], (Bz, H, E, P)),
    )
    seg = np.array([[1] * 5 + [2] * 11 + [3] * 5, [1] * 10 + [2] * 8 + [0] * 3], np.int32)
    assert bool(document_starts(jnp.asarray(seg))[:, 1:].any())
    w = jax.random.normal(ks[6], (Bz, S, H, P))
    names = tuple(args)

    def loss(rule):
        def f(*a):
            o, final = rule(*a)
            return jnp.sum(o * w) + jnp.sum(jnp.sin(final)), (o, final)

        return jax.jit(jax.value_and_grad(f, argnums=tuple(range(len(names))), has_aux=True))

    chunked = lambda *a: gd.gated_delta(*a[:5], chunk=8, segment_ids_BS=jnp.asarray(seg), initial_state_BHEO=a[5],
                                        intra=PALLAS)  # fmt: skip
    (_, (o, final)), grads = loss(chunked)(*args.values())
    (_, (o_ref, final_ref)), grads_ref = loss(lambda *a: _recurrence(*a, jnp.asarray(seg)))(*args.values())
    # measured: o and final state at most 6.3e-7 (aligned), gradients at most 1.4e-6 (g, aligned)
    assert _rel_err(o, o_ref) < 5e-6 and _rel_err(final, final_ref) < 5e-6
    for name, a, b in zip(names, grads, grads_ref):
        assert _rel_err(a, b) < 1e-5, name


def test_bad_inputs_raise_clear_errors():
    x = _parts()
    with pytest.raises(ValueError, match="must share"):
        gdn_ut_transform(x["k"][:, :1], x["v"], x["beta"], x["cum"], x["doc"], interpret=True)
    with pytest.raises(ValueError, match="must have one shape"):
        gdn_chunk_output(x["q"][..., :2], x["k"], x["new"], x["state"], x["cum"], x["doc"], interpret=True)
    with pytest.raises(ValueError, match="backend must be"):
        gdn_ut_transform(x["k"], x["v"], x["beta"], x["cum"], x["doc"], backend="gpu")
    if jax.default_backend() == "cpu":
        with pytest.raises(ValueError, match="interpret=True"):
            gdn_chunk_output(x["q"], x["k"], x["new"], x["state"], x["cum"], x["doc"])


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
    """Mosaic accepts both kernels forward and backward at the 3B GDN shape (chunk 64, key and value heads of
    128, 2 value heads per key head), packed documents included."""
    sharding = _v5p_single_device_sharding()
    Bz, t, c, E_, P_ = 1, 2, 64, 128, 128
    shape = lambda *s, dt=dtype: jax.ShapeDtypeStruct(s, dt, sharding=sharding)
    args = (shape(Bz, t, c, 1, E_), shape(Bz, t, c, 1, G, P_), shape(Bz, t, 1, G, c, dt=F32),
            shape(Bz, t, 1, G, c, dt=F32), shape(Bz, t, c, dt=jnp.int32), shape(Bz, t, c, 1, E_),
            shape(Bz, t, 1, G, E_, P_))  # fmt: skip

    def loss(k, v, beta, cum, doc, q, state):
        u, w = gdn_ut_transform(k, v, beta, cum, doc, backend="tpu")
        new = (u - jnp.einsum("btkgce,btkgep->btkgcp", w, state.astype(F32))).astype(dtype)
        return jnp.sum(gdn_chunk_output(q, k, new, state, cum, doc, backend="tpu") ** 2)

    compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 5, 6))).lower(*args).compile()
    hlo = compiled.as_text()
    assert hlo.count('custom_call_target="tpu_custom_call"') == 4
    for name in ("ut_transform_fwd", "ut_transform_bwd", "chunk_output_fwd", "chunk_output_bwd"):
        assert f"nopejax_gdn_{name}" in hlo
