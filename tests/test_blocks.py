"""The block forms (model.block: parallel + LayerNorm as Cohere2, post_norm + QK-norm as EXAONE 4,
sandwich) on every path: exactly the norm weights each needs, packed documents = separate ones,
scanned = unrolled, sharded = 1 device, KV-cache decoding = full recomputation; config errors.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding

import nopejax
from nopejax import config, hf, model, sharding, train, validation


def family_cfg(kind: str, **kw) -> config.ConfigDict:
    """A nopejax model in each block form, local RoPE : global NoPE (window 4), odd sizes."""
    cfg = config.base_config()
    cfg.model.update(vocab_size=67, d_model=30, num_layers=5, num_heads=3, num_kv_heads=1, head_dim=10, d_ff=37,
                     dtype="float32", global_attention_interval=4, no_rope_layer_interval=4, sliding_window=4,
                     rope_theta=100.0)  # fmt: skip
    cfg.model.update(
        {
            "cohere2": dict(block="parallel", norm="layernorm", rope_layout="interleaved", logit_scale=0.5),
            "exaone4": dict(block="post_norm", qk_norm="rms"),
            "sandwich": dict(block="sandwich", qk_norm="rms"),
            # AFMoE's attention: sandwich + the sigmoid output gate + muP's embedding scale
            "trinity": dict(block="sandwich", qk_norm="rms", attention_gate=True, embed_scale=30**0.5),
        }[kind],
        **kw,
    )
    return validation.validate(cfg)


def random_module(m, seed=0):
    """A Decoder whose norm weights are away from 1 (they init to 1, which hides swapped norms)."""
    _, params = model.split(model.create(m, seed=seed))
    rng = np.random.default_rng(seed)
    for name in params["layers"]:
        if name.endswith("norm"):
            params["layers"][name] = rng.uniform(0.5, 1.5, params["layers"][name].shape).astype(np.float32)
    return hf.build(m, params)


BLOCKS = ["cohere2", "exaone4", "sandwich"]


@pytest.mark.parametrize("kind", BLOCKS)
def test_block_params_are_exactly_what_the_form_needs(kind):
    names = set(random_module(family_cfg(kind).model).layers.keys())
    norms = {n for n in names if n.endswith("norm")} - {"q_norm", "k_norm"}
    assert norms == set(model.BLOCK_NORMS[family_cfg(kind).model.block])


@pytest.mark.parametrize("kind", BLOCKS)
def test_packed_equals_separate_and_scanned_equals_unrolled(kind):
    m = family_cfg(kind).model
    module = random_module(m, seed=1)
    rng = np.random.default_rng(3)
    doc_a, doc_b = rng.integers(0, 67, 9), rng.integers(0, 67, 14)
    packed = jnp.asarray(np.concatenate([doc_a, doc_b])[None], jnp.int32)
    seg = jnp.asarray(np.r_[np.ones(9), np.full(14, 2)][None], jnp.int32)
    pos = jnp.asarray(np.r_[np.arange(9), np.arange(14)][None], jnp.int32)
    together = module(packed, positions=pos, segment_ids=seg)
    np.testing.assert_allclose(together[:, :9], module(jnp.asarray(doc_a[None], jnp.int32)), atol=1e-5)
    np.testing.assert_allclose(together[:, 9:], module(jnp.asarray(doc_b[None], jnp.int32)), atol=1e-5)
    unrolled_cfg = m.copy_and_resolve_references()
    unrolled_cfg.scan_layers = False
    unrolled = hf.build(unrolled_cfg, model.split(module)[1])
    np.testing.assert_allclose(unrolled(packed, pos, seg), together, atol=1e-6, rtol=0)


@pytest.mark.parametrize("kind", ["cohere2", "exaone4", "trinity"])
def test_sharded_equals_one_device(kind):
    cfg = family_cfg(kind)
    cfg.mesh.update(data=2, fsdp=2, tensor=1)
    m = cfg.model
    graphdef, params = model.split(random_module(m, seed=2))
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, 67, (4, 24)), jnp.int32)

    def loss(params):
        logits = model.apply(graphdef, params, tokens)
        return jnp.mean(jax.nn.log_softmax(logits)[..., 0]), logits

    g_one, logits_one = jax.jit(jax.grad(loss, has_aux=True))(params)
    mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:4])
    shardings = jax.tree.map(lambda a: NamedSharding(mesh, sharding.logical_to_spec(a, mesh)),
                             train.param_logical_axes(m), is_leaf=lambda x: isinstance(x, tuple))  # fmt: skip
    with jax.set_mesh(mesh):
        g_sharded, logits_sharded = jax.jit(jax.grad(loss, has_aux=True))(jax.device_put(params, shardings))
    assert len(g_sharded["layers"]["wq"].sharding.device_set) == 4
    np.testing.assert_allclose(logits_sharded, logits_one, atol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-4), g_sharded, g_one)


@pytest.mark.parametrize("kind", [*BLOCKS, "trinity"])
def test_generate_equals_full_recomputation(kind):
    module = random_module(family_cfg(kind, scan_layers=kind != "exaone4").model, seed=4)
    prompt = np.asarray([1, 5, 9, 2, 33, 7], np.int32)
    ids, logits = nopejax.generate(module, prompt, max_new_tokens=9, return_logits=True)
    full = np.asarray(module(jnp.asarray(np.concatenate([prompt, ids])[None])))[0]
    expected = full[len(prompt) - 1 : -1]
    np.testing.assert_allclose(logits, expected, atol=1e-5 * np.abs(expected).max(), rtol=0)
    np.testing.assert_array_equal(ids, expected.argmax(-1))


def test_block_config_errors_name_the_field():
    for key, value in (("block", "post"), ("norm", "rmsnorm"), ("logit_scale", 0.0), ("hf_family", "gemma3")):
        cfg = config.base_config()
        cfg.model[key] = value
        with pytest.raises(config.ConfigError, match=rf"`model\.{key}`.*Fix:"):
            validation.validate(cfg)


def test_sandwich_matches_a_plain_numpy_layer():
    """No transformers class here has the sandwich block (Gemma 3's scales norms by 1 + w), so the
    reference is written out: pre-norm and post-norm around each sublayer, one NoPE layer, MHA."""
    cfg = config.base_config()
    cfg.model.update(vocab_size=23, d_model=12, num_layers=1, num_heads=2, num_kv_heads=2, head_dim=6, d_ff=17,
                     dtype="float32", no_rope_layers=(0,), block="sandwich", rms_norm_eps=1e-5)  # fmt: skip
    m = validation.validate(cfg).model
    module = random_module(m, seed=6)
    p = {k: np.asarray(v, np.float64)[0] for k, v in model.split(module)[1]["layers"].items()}
    embed = np.asarray(module.embed[...], np.float64)
    tokens = np.array([3, 9, 1, 22, 7, 7, 0])

    def rms(x, w):
        return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + 1e-5) * w

    x = embed[tokens]
    h = rms(x, p["attn_norm"])
    q, k, v = (np.einsum("sd,dhe->hse", h, p[w]) for w in ("wq", "wk", "wv"))
    scores = np.einsum("hqe,hke->hqk", q, k) / np.sqrt(6) + np.triu(np.full((7, 7), -np.inf), 1)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    o = np.einsum("hqk,hke->qhe", probs / probs.sum(-1, keepdims=True), v)
    x = x + rms(np.einsum("she,hed->sd", o, p["wo"]), p["attn_post_norm"])
    h = rms(x, p["mlp_norm"])
    gate, up = h @ p["w_gate"], h @ p["w_up"]
    x = x + rms((gate / (1 + np.exp(-gate)) * up) @ p["w_down"], p["mlp_post_norm"])
    want = rms(x, np.asarray(module.final_norm[...], np.float64)) @ embed.T
    got = np.asarray(module(jnp.asarray(tokens[None], jnp.int32)))[0]
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
