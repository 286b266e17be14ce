"""Hybrid stacks: Mamba2 layers, FFN-only layers and mixer-only layers beside NoPE attention.

The reference is a per-layer loop written here (its own RMSNorm, causal softmax attention and
SwiGLU, each layer's params picked from the stacks by its own count of the layers before it), with
the Mamba2 mixer from nopejax/mixers/mamba2.py, which tests/test_mamba2.py holds to transformers.
What this file tests is the stack: which params each layer reads, the block plan over mixed layer
kinds, norms, residuals and scales.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nopejax import config, layers, model, moe, validation
from nopejax.mixers import gated_deltanet
from nopejax.mixers import mamba2 as mamba2_lib
from nopejax.mixers.kinds import KINDS

V = 61
# Nemotron-H-like: Mamba2 and attention layers without FFN, FFN-only layers between; period 3
NEMOTRON_LIKE = dict(
    layer_types=("mamba2", "mlp", "full_attention") * 2,
    ffn_types=("none", "dense", "none") * 2,
)
# Granite-4.0-H-like: Mamba2 x2 : NoPE attention, every layer with its FFN; a 1-layer tail
GRANITE_LIKE = dict(layer_types=("mamba2", "mamba2", "full_attention") * 2 + ("mamba2",))
# OLMo-Hybrid-like: Gated DeltaNet x3 : NoPE attention, with negative eigenvalues; a Mamba2 layer too
GDN_LIKE = dict(
    layer_types=("gated_deltanet",) * 3 + ("full_attention", "mamba2", "gated_deltanet"), gdn_allow_neg_eigval=True
)


def tiny(**overrides):
    cfg = config.base_config()
    cfg.model.update(
        vocab_size=V, d_model=20, num_heads=2, num_kv_heads=1, head_dim=6, d_ff=14, dtype="float32",
        no_rope_layer_interval=1,
    )  # fmt: skip
    kinds = overrides.get("layer_types", ())
    if "mamba2" in kinds:
        cfg.model.update(mamba_num_heads=4, mamba_head_dim=5, mamba_groups=2, mamba_state_size=3, mamba_chunk_size=4)
    if "gated_deltanet" in kinds:
        cfg.model.update(gdn_key_heads=2, gdn_value_heads=4, gdn_key_head_dim=3, gdn_value_head_dim=5, gdn_chunk_size=4)
    cfg.model.update(num_layers=len(kinds) or 6, **overrides)
    return validation.validate(cfg).model


RECURRENT = {"mamba2": ("mamba_", mamba2_lib.mamba2), "gated_deltanet": ("gdn_", gated_deltanet.gated_deltanet)}


def _rms(x, w, eps):
    return x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + eps) * w


def _attention(p, h, segment_ids, m):
    """Causal NoPE softmax attention within documents, GQA by repeating K and V."""
    q = jnp.einsum("bsd,dhe->bshe", h, p["wq"])
    k = jnp.repeat(jnp.einsum("bsd,dke->bske", h, p["wk"]), m.num_heads // m.num_kv_heads, axis=2)
    v = jnp.repeat(jnp.einsum("bsd,dke->bske", h, p["wv"]), m.num_heads // m.num_kv_heads, axis=2)
    scale = m.attention_scale if m.attention_scale is not None else m.head_dim**-0.5
    scores = jnp.einsum("bqhe,bkhe->bhqk", q, k) * scale
    S = h.shape[1]
    ok = jnp.tril(jnp.ones((S, S), bool))[None] & (segment_ids[:, :, None] == segment_ids[:, None, :])
    probs = jax.nn.softmax(jnp.where(ok[:, None], scores, -jnp.inf), axis=-1)
    return jnp.einsum("bshe,hed->bsd", jnp.einsum("bhqk,bkhe->bqhe", probs, v), p["wo"])


def reference_logits(params, m, tokens, segment_ids):
    stacks, eps, r = params["layers"], m.rms_norm_eps, m.residual_scale
    x = params["embed"][tokens] * m.embed_scale
    counts = dict.fromkeys(("mixer", "attention", "mamba2", "gated_deltanet", "ffn"), 0)
    for kind, ffn in zip(layers.layer_types(m), layers.ffn_pattern(m)):
        if kind != "mlp":
            h = _rms(x, stacks["attn_norm"][counts["mixer"]], eps)
            counts["mixer"] += 1
            if kind in RECURRENT:
                prefix, forward = RECURRENT[kind]
                p = {n.removeprefix(prefix): a[counts[kind]] for n, a in stacks.items() if n.startswith(prefix)}
                counts[kind] += 1
                out = forward(p, h, KINDS[kind].dims(m), segment_ids_BS=segment_ids)[0]
            else:
                p = {n: stacks[n][counts["attention"]] for n in ("wq", "wk", "wv", "wo")}
                counts["attention"] += 1
                out = _attention(p, h, segment_ids, m)
            x = x + r * out
        if ffn != "none":
            j = counts["ffn"]
            h = _rms(x, stacks["mlp_norm"][j], eps)
            counts["ffn"] += 1
            up = jax.nn.silu(h @ stacks["w_gate"][j]) * (h @ stacks["w_up"][j])
            x = x + r * (up @ stacks["w_down"][j])
    x = _rms(x, params["final_norm"], eps)
    return x @ params["embed"].T * m.logit_scale


@pytest.mark.parametrize(
    "overrides",
    [
        NEMOTRON_LIKE,
        dict(GRANITE_LIKE, residual_scale=0.22, attention_scale=0.3, embed_scale=1.7, logit_scale=0.4),
        GDN_LIKE,
    ],
    ids=["nemotron_like", "granite_like", "gdn_like"],
)
def test_hybrid_stack_equals_layer_by_layer_reference(overrides):
    m = tiny(**overrides)
    module = model.create(m, seed=3)
    _, params = model.split(module)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, V, (2, 11)), jnp.int32)
    segment_ids = jnp.asarray([[1] * 5 + [2] * 6, [1] * 9 + [0] * 2], jnp.int32)
    positions = jnp.asarray([[*range(5), *range(6)], [*range(9), 0, 0]], jnp.int32)
    got = module(tokens, positions=positions, segment_ids=segment_ids)
    want = reference_logits(params, m, tokens, segment_ids)
    real = np.asarray(segment_ids) != 0
    np.testing.assert_allclose(np.asarray(got)[real], np.asarray(want)[real], atol=2e-5, rtol=0)


def test_hybrid_params_stack_by_kind():
    m = tiny(**NEMOTRON_LIKE)
    _, params = model.split(model.create(m))
    shapes = {name: a.shape for name, a in params["layers"].items()}
    d = KINDS["mamba2"].dims(m)
    assert shapes["wq"] == (2, 20, 2, 6)  # the two attention layers
    assert shapes["mamba_in_proj"] == (2, 20, d.proj_dim)  # the two Mamba2 layers
    assert shapes["w_up"] == (2, 20, 14) and shapes["mlp_norm"] == (2, 20)  # the two FFN-only layers
    assert shapes["attn_norm"] == (4, 20)  # every layer with a mixer
    # transformers' Mamba2 init: A = 1..H per layer
    np.testing.assert_allclose(np.exp(params["layers"]["mamba_A_log"]), np.tile(np.arange(1, 5), (2, 1)), rtol=1e-6)
    assert model.param_count(m) == sum(a.size for a in jax.tree.leaves(params))


@pytest.mark.parametrize(
    "overrides, plan",
    [(NEMOTRON_LIKE, "period"), (NEMOTRON_LIKE, "switch"), (GDN_LIKE, "switch")],
    ids=["nemotron_like-period", "nemotron_like-switch", "gdn_like-switch"],
)
def test_hybrid_scanned_equals_unrolled(overrides, plan):
    """Either scan plan (blocks of the period, or one switch over the distinct layer specs) gives the
    unrolled stack's logits and gradients. (Nothing in GDN_LIKE repeats: its period plan is one 4-layer
    block scanned once and a 2-layer tail, what the nemotron_like case covers with 2 blocks.)"""
    m = tiny(**overrides, remat="full", scan_plan=plan)
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, V, (2, 9)), jnp.int32)

    @nnx.jit
    def logits_and_grads(module):
        return module(tokens), nnx.grad(lambda mod: jnp.mean(mod(tokens) ** 2))(module)

    out1, g1 = logits_and_grads(model.create(m, seed=1))
    m.scan_layers = False
    out2, g2 = logits_and_grads(model.create(m, seed=1))
    np.testing.assert_allclose(out1, out2, atol=1e-6, rtol=0)
    g1, g2 = nnx.to_pure_dict(g1), nnx.to_pure_dict(g2)
    for name in ("mamba_A_log", "gdn_A_log"):  # every recurrent layer's decay gets a gradient
        assert name not in g1["layers"] or np.abs(g1["layers"][name]).min() > 0
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-4), g1, g2)


@pytest.mark.parametrize("overrides", [GRANITE_LIKE, GDN_LIKE], ids=["granite_like", "gdn_like"])
def test_hybrid_packed_row_equals_documents_alone(overrides):
    m = tiny(**overrides)
    module = model.create(m, seed=2)
    rng = np.random.default_rng(3)
    doc_a, doc_b = rng.integers(0, V, 6), rng.integers(0, V, 9)  # 9: longer than the chunk of 4, not a multiple
    packed = jnp.asarray(np.concatenate([doc_a, doc_b])[None], jnp.int32)
    positions = jnp.asarray(np.concatenate([np.arange(6), np.arange(9)])[None], jnp.int32)
    segments = jnp.asarray(np.array([1] * 6 + [2] * 9)[None], jnp.int32)
    together = module(packed, positions=positions, segment_ids=segments)
    alone_a, alone_b = module(jnp.asarray(doc_a[None], jnp.int32)), module(jnp.asarray(doc_b[None], jnp.int32))
    np.testing.assert_allclose(together[:, :6], alone_a, atol=1e-5, rtol=0)
    np.testing.assert_allclose(together[:, 6:], alone_b, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(GRANITE_LIKE, no_rope_layers=(1, 0, 0, 0, 0, 0, 0)), "model.no_rope_layers"),  # a Mamba2 layer with RoPE
        (dict(GRANITE_LIKE, mamba_groups=3), "model.mamba_groups"),  # 4 heads in groups of 3
        (dict(GRANITE_LIKE, mamba_chunk_size=0), "model.mamba_chunk_size"),
        (dict(layer_types=("mlp", "full_attention"), ffn_types=("none", "dense")), "model.ffn_types"),  # empty layer
        (dict(layer_types=("full_attention",) * 2, ffn_types=("dense", "moe")), "model.ffn_types"),  # no experts
        (dict(GRANITE_LIKE, block="parallel"), "model.block"),
        (dict(GRANITE_LIKE, mamba_time_step_limit=(1.0, 0.5)), "model.mamba_time_step_limit"),
        (dict(layer_types=("full_attention",) * 2, mamba_num_heads=4), "model.mamba_num_heads"),  # no Mamba2 layer
        (dict(GRANITE_LIKE, residual_scale=0.0), "model.residual_scale"),
        (dict(GDN_LIKE, gdn_value_heads=3), "model.gdn_value_heads"),  # 3 value heads over 2 key heads
        (dict(GDN_LIKE, gdn_key_heads=0), "model.gdn_key_heads"),
    ],
)
def test_hybrid_config_errors_name_the_field(overrides, field):
    with pytest.raises(config.ConfigError) as err:
        tiny(**overrides)
    assert err.value.field == field
    assert "\n" not in str(err.value)


def test_mamba2_conv_longer_than_a_context_chunk_is_refused_before_compiling():
    """Under context parallelism a chunk's conv reads K - 1 inputs from one neighbour's chunk."""
    cfg = config.base_config()
    cfg.model.update(
        num_layers=2, layer_types=("mamba2", "full_attention"), mamba_num_heads=3, no_rope_layer_interval=1
    )
    cfg.mesh.update(data=1, context=4)
    cfg.train.seq_len = 16  # zig-zag chunks of 2 rows; the conv reads 3
    with pytest.raises(config.ConfigError) as err:
        validation.validate(cfg)
    assert err.value.field == "train.seq_len" and "reads the 3 inputs" in str(err.value)
    cfg.train.seq_len = 24
    validation.validate(cfg)


def test_switch_plan_carries_moe_statistics():
    """An irregular MoE hybrid (Mamba2 / attention layers with MoE, dense or no
    FFN in no short period): the switch plan's loss with the MoE losses, its per-layer load
    statistics and its gradients equal the unrolled stack's."""
    kinds = ("mamba2", "full_attention", "mamba2", "mamba2", "full_attention", "mamba2", "full_attention")
    ffns = ("dense", "dense", "moe", "dense", "moe", "moe", "none")
    m = tiny(layer_types=kinds, ffn_types=ffns, num_experts=4, experts_per_token=2, expert_d_ff=6,
             remat="full", scan_plan="switch")  # fmt: skip
    assert layers.scan_plan(layers.layer_specs(m), m) == "switch"
    tokens = jnp.asarray(np.random.default_rng(4).integers(0, V, (2, 9)), jnp.int32)

    @nnx.jit
    def loss_aux_and_grads(module):
        def loss(mod):
            x, aux = mod.hidden_and_aux(tokens)
            return jnp.mean(mod.logits(x) ** 2) + moe.aux_loss(aux, m), aux

        (value, aux), grads = nnx.value_and_grad(loss, has_aux=True)(module)
        return value, aux, grads

    value1, aux1, g1 = loss_aux_and_grads(model.create(m, seed=5))
    m.scan_layers = False
    value2, aux2, g2 = loss_aux_and_grads(model.create(m, seed=5))
    assert aux1["load"].shape == (3, 4)  # the three MoE layers, four experts
    np.testing.assert_array_equal(aux1["load"], aux2["load"])
    np.testing.assert_allclose(value1, value2, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-4),
                 nnx.to_pure_dict(g1), nnx.to_pure_dict(g2))  # fmt: skip
