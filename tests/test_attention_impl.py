"""The model with the Pallas kernel (interpret mode) against the plain XLA path, sharded."""

import jax
import jax.numpy as jnp
import numpy as np

from nopejax import config, model, sharding, validation

# Pallas (interpret mode) vs XLA at `highest` matmul precision (conftest): the largest error measured,
# relative to each array's largest value, is 3.0e-7 for logits and 6.2e-7 for a gradient leaf (the
# smallest leaves included), in both tests below. The bound is ~10x that.
PALLAS_VS_XLA = 5e-6


def assert_close_at_scale(got, want):
    """|got - want| <= PALLAS_VS_XLA x the largest |want| of the array: small gradient leaves stay tight."""
    want = np.asarray(want)
    np.testing.assert_allclose(got, want, rtol=0, atol=PALLAS_VS_XLA * float(np.abs(want).max()))


def test_pallas_model_matches_xla_on_a_2x2_mesh_through_shard_map():
    cfg = config.base_config()
    # one RoPE and one NoPE layer: both kernel forms, each traced once (more layers repeat them)
    cfg.model.update(vocab_size=96, d_model=256, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=64, d_ff=96,
                     dtype="float32", no_rope_layer_interval=2)  # fmt: skip
    cfg.mesh.update(data=2, fsdp=1, tensor=2)
    m = validation.validate(cfg).model
    graphdef, params = model.split(model.create(m, seed=0))
    m.attention_impl = "pallas"
    graphdef_pallas, _ = model.split(model.create(m, seed=0))
    mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:4])

    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, 96, (4, 128)), jnp.int32)
    segments = jnp.asarray(np.where(np.arange(128)[None] < rng.integers(20, 100, (4, 1)), 1, 2), jnp.int32)
    starts = np.argmax(segments == 2, axis=1)[:, None]
    positions = jnp.asarray(np.where(segments == 1, np.arange(128), np.arange(128) - starts), jnp.int32)

    def loss(params, graphdef):
        logits = model.apply(graphdef, params, tokens, positions, segments)
        return jnp.mean(jax.nn.log_softmax(logits)[..., 0]), logits

    with jax.set_mesh(mesh):
        grad = jax.jit(jax.grad(loss, has_aux=True), static_argnums=1)
        g_xla, logits_xla = grad(params, graphdef)
        g_pallas, logits_pallas = grad(params, graphdef_pallas)
        jaxpr = str(jax.make_jaxpr(lambda p: loss(p, graphdef_pallas))(params))
    assert "shard_map" in jaxpr and "pallas_call" in jaxpr
    assert_close_at_scale(logits_pallas, logits_xla)
    jax.tree.map(assert_close_at_scale, g_pallas, g_xla)


def test_query_chunked_xla_attention_equals_the_reference():
    """S > 2 * Q_CHUNK takes the chunked path; values and gradients equal plain attention."""
    from nopejax import attention
    from nopejax.kernels import reference_attention

    rng = np.random.default_rng(1)
    B, S, H, K, D = 2, 3 * attention.Q_CHUNK, 4, 2, 16
    q, k, v = (jnp.asarray(rng.normal(size=(B, S, h, D)), jnp.float32) for h in (H, K, K))
    seg = jnp.asarray(np.where(np.arange(S)[None] < rng.integers(100, S - 100, (B, 1)), 1, 2), jnp.int32)
    for causal in (True, False):
        ours = attention.xla_attention(q, k, v, seg, causal)
        ref = reference_attention(q, k, v, segment_ids=seg, rope=False, causal=causal)
        np.testing.assert_allclose(ours, ref, atol=1e-5)
    g_ours = jax.grad(lambda q: jnp.sum(attention.xla_attention(q, k, v, seg) ** 2))(q)
    g_ref = jax.grad(lambda q: jnp.sum(reference_attention(q, k, v, segment_ids=seg, rope=False) ** 2))(q)
    np.testing.assert_allclose(g_ours, g_ref, atol=1e-4)


def test_pallas_model_with_every_layer_option_matches_xla():
    """Local, chunked, partial + interleaved RoPE, NoPE temperature and L2 QK-norm: kernel == XLA path."""
    cfg = config.base_config()
    cfg.model.update(vocab_size=96, d_model=128, num_layers=4, num_heads=2, num_kv_heads=1, head_dim=64, d_ff=64,
                     dtype="float32", no_rope_layers=(1, 1, 1, 0),
                     layer_types=("sliding_attention", "chunked_attention", "sliding_attention", "full_attention"),
                     sliding_window=37, attention_chunk_size=48, partial_rotary_factor=0.5,
                     rope_layout="interleaved", nope_temperature=(16.0, 0.1), qk_norm="l2")  # fmt: skip
    m = validation.validate(cfg).model
    graphdef, params = model.split(model.create(m, seed=0))
    m.attention_impl = "pallas"
    graphdef_pallas, _ = model.split(model.create(m, seed=0))

    rng = np.random.default_rng(2)
    tokens = jnp.asarray(rng.integers(0, 96, (1, 150)), jnp.int32)
    segments = jnp.asarray(np.where(np.arange(150) < 110, 1, 2)[None], jnp.int32)
    positions = jnp.asarray(np.where(segments == 1, np.arange(150), np.arange(150) - 110), jnp.int32)

    def loss(params, graphdef):
        logits = model.apply(graphdef, params, tokens, positions, segments)
        return jnp.mean(jax.nn.log_softmax(logits)[..., 0]), logits

    grad = jax.jit(jax.grad(loss, has_aux=True), static_argnums=1)
    g_xla, logits_xla = grad(params, graphdef)
    g_pallas, logits_pallas = grad(params, graphdef_pallas)
    assert_close_at_scale(logits_pallas, logits_xla)
    jax.tree.map(assert_close_at_scale, g_pallas, g_xla)


def test_auto_picks_per_platform():
    from nopejax import attention

    assert attention.resolve_impl("auto", 128, "tpu") == "pallas"
    assert attention.resolve_impl("auto", 128, "gpu") == "cudnn"  # measured faster on an H200 (README)
    assert attention.resolve_impl("auto", 256, "gpu") == "pallas"
    assert attention.resolve_impl("auto", 48, "gpu") == "xla"
    assert attention.resolve_impl("auto", 128, "cpu") == "xla"
    assert attention.resolve_impl("xla", 128, "tpu") == "xla"
