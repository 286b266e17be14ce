"""Layer types: local (sliding / chunked) and global attention, full, partial or no RoPE per layer.

Every fast path is checked against a plain reference written here from the definitions (loops,
dense masks, float64 numpy), not from nopejax's helpers: attention with windows and chunks on
restarting positions, and a whole decoder with each per-layer option.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from jax.sharding import NamedSharding

import nopejax
from nopejax import attention, cli, config, layers, metrics, model, sharding, tensorfile, train, validation
from nopejax.config import ConfigError
from nopejax.layers import LayerSpec
from tests.test_model import assert_scanned_equals_unrolled

# ---------------------------------------------------------------------------------------------
# The reference: dense masked attention and a decoder, from the definitions


def ref_visible(pos, seg, kind, window):
    """[B, S, S] bool by loops: same document, causal, and the window / chunk on positions."""
    B, S = pos.shape
    ok = np.zeros((B, S, S), bool)
    for b in range(B):
        for i in range(S):
            for j in range(i + 1):
                same = seg is None or seg[b, i] == seg[b, j]
                if kind == "sliding":
                    near = pos[b, i] - window < pos[b, j] <= pos[b, i]
                elif kind == "chunked":
                    near = pos[b, i] // window == pos[b, j] // window
                else:
                    near = True
                ok[b, i, j] = same and near
    return ok


def ref_attention(q, k, v, ok):
    """Dense softmax attention in float64; GQA by repeating kv heads."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    G = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, G, axis=2), np.repeat(v, G, axis=2)
    scores = np.einsum("bihd,bjhd->bhij", q, k) / np.sqrt(q.shape[-1])
    scores = np.where(ok[:, None], scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return np.einsum("bhij,bjhd->bihd", probs, v)


def ref_rope(x, pos, theta, fraction, layout):
    """Rotate pairs of the first R dims as complex numbers: pair p turns by pos * theta^(-2p/R)."""
    D = x.shape[-1]
    R = int(D * fraction)
    freq = theta ** (-np.arange(0, R, 2) / R)  # [R/2]
    if layout == "interleaved":
        a, b = x[..., 0:R:2], x[..., 1:R:2]
    else:
        a, b = x[..., : R // 2], x[..., R // 2 : R]
    z = (a + 1j * b) * np.exp(1j * pos[:, :, None, None] * freq)
    out = x.copy()
    if layout == "interleaved":
        out[..., 0:R:2], out[..., 1:R:2] = z.real, z.imag
    else:
        out[..., : R // 2], out[..., R // 2 : R] = z.real, z.imag
    return out


def ref_rms(x, w, eps):
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * w


def ref_decoder(m, params, tokens, pos, seg):
    """The whole decoder, layer by layer, from the config fields (not from LayerSpec)."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    L, eps = m.num_layers, m.rms_norm_eps
    rope_on = [bool(x) for x in m.no_rope_layers] if m.no_rope_layers else [True] * L
    if m.no_rope_layers is None and m.no_rope_layer_interval:
        rope_on = [(i + 1) % m.no_rope_layer_interval != 0 for i in range(L)]
    kinds = list(m.layer_types) if m.layer_types else ["full_attention"] * L
    if m.global_attention_interval:
        local = "sliding_attention" if m.sliding_window else "chunked_attention"
        kinds = ["full_attention" if (i + 1) % m.global_attention_interval == 0 else local for i in range(L)]
    x = p["embed"][tokens]
    for i in range(L):
        lp = {name: a[i] for name, a in p["layers"].items()}
        h = ref_rms(x, lp["attn_norm"], eps)
        q, k, v = (np.einsum("bsd,dhe->bshe", h, lp[w]) for w in ("wq", "wk", "wv"))
        if m.qk_norm == "rms":
            q, k = ref_rms(q, lp["q_norm"], eps), ref_rms(k, lp["k_norm"], eps)
        kind = kinds[i].removesuffix("_attention")
        if rope_on[i]:
            theta = m.rope_theta_local if (kind != "full" and m.rope_theta_local) else m.rope_theta
            q, k = (ref_rope(a, pos, theta, m.partial_rotary_factor, m.rope_layout) for a in (q, k))
            if m.qk_norm == "l2":
                q, k = ref_rms(q, 1.0, eps), ref_rms(k, 1.0, eps)
        elif m.nope_temperature:
            floor_scale, attn_scale = m.nope_temperature
            q = q * (np.log1p(np.floor((pos + 1) / floor_scale)) * attn_scale + 1)[:, :, None, None]
        window = {"sliding": m.sliding_window, "chunked": m.attention_chunk_size}.get(kind)
        o = ref_attention(q, k, v, ref_visible(pos, seg, kind, window))
        x = x + np.einsum("bshe,hed->bsd", o, lp["wo"])
        h = ref_rms(x, lp["mlp_norm"], eps)
        gate, up = h @ lp["w_gate"], h @ lp["w_up"]
        x = x + (gate / (1 + np.exp(-gate)) * up) @ lp["w_down"]
    x = ref_rms(x, p["final_norm"], eps)
    return x @ p["embed"].T


# ---------------------------------------------------------------------------------------------
# Attention alone: the banded XLA path against dense masks


def packed_inputs(rng, B, lengths):
    """Segment ids and per-document restarting positions for documents of `lengths` per row."""
    seg = np.concatenate([np.full(n, d + 1) for d, n in enumerate(lengths)])
    pos = np.concatenate([np.arange(n) for n in lengths])
    return np.tile(seg, (B, 1)).astype(np.int32), np.tile(pos, (B, 1)).astype(np.int32)


@pytest.mark.parametrize(
    "kind, window, lengths",
    [
        ("sliding", 1, (41,)),  # sees only itself
        ("sliding", 5, (41,)),  # band path: 8-row chunks over 12-key bands
        ("sliding", 11, (17, 24)),  # packed: windows restart with each document
        ("sliding", 60, (41,)),  # window longer than the sequence: full causal
        ("chunked", 6, (41,)),
        ("chunked", 7, (13, 28)),
    ],
)
def test_local_xla_attention_matches_dense_reference(kind, window, lengths):
    rng = np.random.default_rng(window)
    B, H, K, D = 2, 6, 2, 8
    S = sum(lengths)
    q, k, v = (rng.normal(size=(B, S, h, D)).astype(np.float32) for h in (H, K, K))
    seg, pos = packed_inputs(rng, B, lengths)
    spec = LayerSpec(kind, window)
    ok = ref_visible(pos, seg, kind, window)

    def ours(q, k, v):
        return attention.xla_attention(q, k, v, jnp.asarray(seg), positions_BS=jnp.asarray(pos), spec=spec)

    np.testing.assert_allclose(ours(q, k, v), ref_attention(q, k, v, ok), atol=1e-5)

    # gradients against dense attention written here in jnp (float32): the reference above, differentiable
    def dense(q, k, v):
        G = q.shape[2] // k.shape[2]
        k, v = jnp.repeat(k, G, axis=2), jnp.repeat(v, G, axis=2)
        scores = jnp.einsum("bihd,bjhd->bhij", q, k) / np.sqrt(q.shape[-1])
        probs = jax.nn.softmax(jnp.where(ok[:, None], scores, -jnp.inf), axis=-1)
        return jnp.einsum("bhij,bjhd->bihd", probs, v)

    for argnum in range(3):
        g = jax.grad(lambda *a: jnp.sum(jnp.sin(ours(*a))), argnums=argnum)(q, k, v)
        g_ref = jax.grad(lambda *a: jnp.sum(jnp.sin(dense(*a))), argnums=argnum)(q, k, v)
        np.testing.assert_allclose(g, g_ref, atol=1e-5)


def test_local_attention_cost_is_a_band():
    """A sliding layer's XLA program holds [c, c + W - 1] score tiles, never [S, S]."""
    S, W = 256, 16
    q = jax.ShapeDtypeStruct((1, S, 2, 8), jnp.float32)
    spec = LayerSpec("sliding", W)
    jaxpr = str(jax.make_jaxpr(lambda q: attention.xla_attention(q, q, q, spec=spec))(q))
    assert f"{W},{2 * W - 1}]" in jaxpr.replace(" ", "") and f"{S},{S}]" not in jaxpr.replace(" ", "")


# ---------------------------------------------------------------------------------------------
# The decoder: each option against the reference decoder


def tiny(**overrides):
    cfg = config.base_config()
    cfg.model.update(vocab_size=67, d_model=30, num_heads=3, num_kv_heads=1, head_dim=10, d_ff=22, dtype="float32")
    cfg.model.update(**overrides)
    return validation.validate(cfg).model


OPTIONS = {
    "sliding_rope_global_nope": dict(num_layers=5, global_attention_interval=4, sliding_window=4),
    "sliding_everywhere_interval3": dict(num_layers=4, global_attention_interval=3, sliding_window=6,
                                         no_rope_layer_interval=0),
    "chunked_explicit": dict(num_layers=3, no_rope_layers=(1, 0, 1), attention_chunk_size=5,
                             layer_types=("chunked_attention", "full_attention", "chunked_attention")),
    "partial_half": dict(num_layers=2, partial_rotary_factor=0.4, no_rope_layer_interval=0),
    "partial_interleaved": dict(num_layers=2, partial_rotary_factor=0.6, rope_layout="interleaved"),
    "interleaved_full": dict(num_layers=2, rope_layout="interleaved", no_rope_layer_interval=0),
    "rope_theta_local": dict(num_layers=4, global_attention_interval=2, sliding_window=7, rope_theta_local=37.0,
                             rope_theta=500.0, no_rope_layer_interval=0),
    "nope_temperature": dict(num_layers=4, no_rope_layer_interval=2, nope_temperature=(3.0, 0.7)),
    "qk_norm_rms": dict(num_layers=4, qk_norm="rms"),
    "qk_norm_l2": dict(num_layers=4, qk_norm="l2"),
    "llama4_like": dict(num_layers=4, global_attention_interval=4, attention_chunk_size=6, rope_layout="interleaved",
                        qk_norm="l2", nope_temperature=(4.0, 0.5)),
}  # fmt: skip


def random_params(m, seed):
    """The model's params with norms randomised too (a swapped or missing norm cannot pass)."""
    graphdef, params = model.split(model.create(m, seed=seed))
    rng = np.random.default_rng(seed)
    for name in params["layers"]:
        if name.endswith("norm"):
            params["layers"][name] = jnp.asarray(rng.uniform(0.5, 1.5, params["layers"][name].shape), jnp.float32)
    return graphdef, params


@pytest.mark.parametrize("name", list(OPTIONS))
def test_each_option_matches_the_reference_decoder(name):
    m = tiny(**OPTIONS[name])
    graphdef, params = random_params(m, seed=len(name))
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 67, (2, 23)).astype(np.int32)
    seg, pos = packed_inputs(rng, 2, (9, 14))
    ours = model.apply(graphdef, params, jnp.asarray(tokens), jnp.asarray(pos), jnp.asarray(seg))
    np.testing.assert_allclose(ours, ref_decoder(m, params, tokens, pos, seg), atol=2e-5, rtol=0)


@pytest.mark.parametrize(
    "overrides",
    [
        dict(num_layers=5, global_attention_interval=2, sliding_window=3),  # 2 blocks of 2 + 1 tail
        dict(num_layers=7, layer_types=("sliding_attention", "full_attention") * 3 + ("chunked_attention",),
             sliding_window=5, attention_chunk_size=4, no_rope_layer_interval=2, remat="full"),
        dict(num_layers=4, global_attention_interval=2, sliding_window=4, rope_theta_local=99.0, qk_norm="rms",
             no_rope_layer_interval=0),  # 2 blocks of 2
    ],
)  # fmt: skip
def test_scanned_equals_unrolled_with_local_layers(overrides):
    m = tiny(**overrides)
    block, reps, tail = layers.block_structure(layers.layer_specs(m))
    assert reps >= 1 and block * reps + tail == layers.layer_specs(m)
    assert_scanned_equals_unrolled(m, seq_len=19)


def test_block_structure_of_a_local_global_stack():
    """3 local RoPE : 1 global NoPE over 36 layers: one block of 4 scanned 9 times, 2 traced runs."""
    m = tiny(num_layers=36, global_attention_interval=4, sliding_window=8)
    specs = layers.layer_specs(m)
    block, reps, tail = layers.block_structure(specs)
    assert (len(block), reps, tail) == (4, 9, ())
    runs = [(n, s.attention, s.use_rope) for _, n, s in layers.runs(block)]
    assert runs == [(3, "sliding", True), (1, "full", False)]


@pytest.mark.parametrize(
    "overrides",
    [
        dict(num_layers=4, global_attention_interval=4, sliding_window=4),
        dict(
            num_layers=3,
            global_attention_interval=3,
            attention_chunk_size=5,
            no_rope_layer_interval=3,
            nope_temperature=(2.0, 0.5),
        ),
    ],
)
def test_packed_documents_equal_documents_alone(overrides):
    module = model.create(tiny(**overrides), seed=2)
    rng = np.random.default_rng(3)
    doc_a, doc_b = rng.integers(0, 67, 9), rng.integers(0, 67, 14)
    packed = jnp.asarray(np.concatenate([doc_a, doc_b])[None], jnp.int32)
    seg, pos = packed_inputs(rng, 1, (9, 14))
    together = module(packed, positions=jnp.asarray(pos), segment_ids=jnp.asarray(seg))
    np.testing.assert_allclose(together[:, :9], module(jnp.asarray(doc_a[None], jnp.int32)), atol=1e-5)
    np.testing.assert_allclose(together[:, 9:], module(jnp.asarray(doc_b[None], jnp.int32)), atol=1e-5)


def test_sharded_equals_one_device_with_local_layers():
    cfg = config.base_config()
    cfg.model.update(vocab_size=96, d_model=32, num_layers=5, num_heads=4, num_kv_heads=2, head_dim=8, d_ff=48)
    cfg.model.update(dtype="float32", global_attention_interval=4, sliding_window=6, no_rope_layer_interval=4)
    cfg.mesh.update(data=2, fsdp=2, tensor=2)
    m = validation.validate(cfg).model
    graphdef, params = model.split(model.create(m, seed=0))
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, 96, (4, 40)), jnp.int32)
    seg, pos = (jnp.asarray(a) for a in packed_inputs(rng, 4, (15, 25)))

    def loss(params):
        logits = model.apply(graphdef, params, tokens, pos, seg)
        return jnp.mean(jax.nn.log_softmax(logits)[..., 0]), logits

    g_one, logits_one = jax.jit(jax.grad(loss, has_aux=True))(params)
    mesh = sharding.make_mesh(cfg.mesh, jax.devices())
    axes = train.param_logical_axes(m)
    shardings = jax.tree.map(
        lambda a: NamedSharding(mesh, sharding.logical_to_spec(a, mesh)), axes, is_leaf=lambda x: isinstance(x, tuple)
    )
    with jax.set_mesh(mesh):
        g_sharded, logits_sharded = jax.jit(jax.grad(loss, has_aux=True))(jax.device_put(params, shardings))
    assert len(g_sharded["layers"]["wq"].sharding.device_set) == 8
    np.testing.assert_allclose(logits_sharded, logits_one, atol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-4), g_sharded, g_one)


# ---------------------------------------------------------------------------------------------
# HF SmolLM3 with sliding layers


def make_hf(tmp_path, **kw):
    torch.manual_seed(7)
    hf_cfg = transformers.SmolLM3Config(
        vocab_size=97, hidden_size=24, intermediate_size=37, num_hidden_layers=6, num_attention_heads=3,
        num_key_value_heads=1, head_dim=8, rope_parameters={"rope_type": "default", "rope_theta": 500.0},
        tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2, **kw,
    )  # fmt: skip
    hf_model = transformers.SmolLM3ForCausalLM(hf_cfg).float().eval()
    with torch.no_grad():
        for name, p in hf_model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    hf_model.save_pretrained(tmp_path / "hf")
    return hf_model, tmp_path / "hf"


HF_CASES = {
    # HF's default placement: the window on the NoPE layers
    "sliding_nope_default": dict(use_sliding_window=True, sliding_window=5, no_rope_layer_interval=3),
    # the local-RoPE / global-NoPE placement
    "sliding_rope_global_nope": dict(use_sliding_window=True, sliding_window=4, no_rope_layer_interval=3,
                                     layer_types=["sliding_attention", "sliding_attention", "full_attention"] * 2),
}  # fmt: skip


@pytest.mark.parametrize("case", list(HF_CASES))
def test_hf_smollm3_sliding_logits_and_round_trip(tmp_path, case):
    hf_model, path = make_hf(tmp_path, **HF_CASES[case])
    ours = nopejax.from_hf(str(path))
    specs = layers.layer_specs(ours.cfg)
    assert [f"{s.attention}_attention" for s in specs] == list(hf_model.config.layer_types)
    assert [s.use_rope for s in specs] == [bool(x) for x in hf_model.config.no_rope_layers]
    tokens = np.random.default_rng(0).integers(0, 97, (2, 29))  # S = 29 > W
    with torch.no_grad():
        want = hf_model(torch.tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(ours(jnp.asarray(tokens, jnp.int32)), want, atol=1e-4, rtol=0)

    out = tmp_path / "back"
    nopejax.to_hf(ours, str(out))
    a, b = tensorfile.Reader(str(path)), tensorfile.Reader(str(out))
    assert sorted(a.names()) == sorted(b.names())
    for name in a.names():
        np.testing.assert_array_equal(a.get(name), b.get(name), err_msg=name)
    again = transformers.AutoModelForCausalLM.from_pretrained(out).float().eval()
    for field in ("layer_types", "sliding_window", "use_sliding_window", "no_rope_layers"):
        assert getattr(again.config, field) == getattr(hf_model.config, field), field
    with torch.no_grad():
        np.testing.assert_array_equal(again(torch.tensor(tokens)).logits.numpy(), want)


@pytest.mark.parametrize(
    "field, overrides",
    [
        ("model.attention_chunk_size", dict(global_attention_interval=2, attention_chunk_size=4)),
        ("model.partial_rotary_factor", dict(partial_rotary_factor=0.4)),
        ("model.rope_layout", dict(rope_layout="interleaved")),
        ("model.rope_theta_local", dict(global_attention_interval=2, sliding_window=4, rope_theta_local=10.0)),
        ("model.nope_temperature", dict(nope_temperature=(4.0, 0.1))),
        ("model.qk_norm", dict(qk_norm="rms")),
    ],
)
def test_export_refuses_what_smollm3_cannot_express(tmp_path, field, overrides):
    module = model.create(tiny(num_layers=4, **overrides))
    with pytest.raises(ConfigError) as err:
        nopejax.to_hf(module, str(tmp_path / "out"))
    assert err.value.field == field and "SmolLM3 format has no" in str(err.value)
    assert not (tmp_path / "out").exists()  # refused before anything was written


@pytest.mark.parametrize(
    "override, field",
    [
        ("--config.model.sliding_window=0", "model.sliding_window"),
        ("--config.model.partial_rotary_factor=0.3", "model.partial_rotary_factor"),
        ("--config.model.nope_temperature=(0.0,0.1)", "model.nope_temperature"),
    ],
)
def test_cli_rejects_a_bad_layer_spec_in_one_line_before_compiling(tmp_path, capsys, monkeypatch, override, field):
    def no_compile(*args, **kwargs):
        raise AssertionError("compiled before the config was checked")

    monkeypatch.setattr(jax, "jit", no_compile)
    config_path = os.path.join(os.path.dirname(__file__), "..", "configs", "tiny_local_global.py")
    argv = ["train", "--config", config_path, "--workdir", str(tmp_path), "--dry-run", override]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"`{field}`" in err and "Fix:" in err


def test_flops_count_only_the_keys_a_local_layer_sees():
    cfg = config.base_config()
    cfg.train.seq_len = 128
    full = metrics.train_flops_per_step(cfg)
    cfg.model.update(global_attention_interval=4, sliding_window=32)
    local = metrics.train_flops_per_step(cfg)
    B, H, E = cfg.train.global_batch_size, cfg.model.num_heads, cfg.model.head_dim
    local_layers = sum(s.local for s in layers.layer_specs(cfg.model))
    saved = local_layers * 3 * 2 * 2 * B * H * E * (128 * 128 / 2 - (32 * 128 - 32 * 32 / 2))
    assert local_layers == 5 and abs((full - local) - saved) < 1e-6 * full
    cfg.model.sliding_window = 128  # a window as long as the row sees everything a causal layer sees
    assert metrics.train_flops_per_step(cfg) == full


def test_flops_follow_each_layers_mixer_and_ffn():
    """A hybrid counts its Mamba2 layers' projections, conv and chunked scan, its attention layers'
    projections and pairs, and no FFN where a layer has none (plain formulas written here)."""
    cfg = config.base_config()
    cfg.train.update(seq_len=64, global_batch_size=2)
    D, V, F = cfg.model.d_model, cfg.model.vocab_size, cfg.model.d_ff
    H, E, K = cfg.model.num_heads, cfg.model.head_dim, cfg.model.num_kv_heads
    cfg.model.update(num_layers=2, layer_types=("mamba2", "full_attention"), ffn_types=("none", "dense"),
                     no_rope_layer_interval=1, mamba_num_heads=4, mamba_head_dim=8, mamba_groups=2,
                     mamba_state_size=16, mamba_chunk_size=16, mamba_conv_kernel=4)  # fmt: skip
    cfg.model.mlp_activation = "relu2"
    T = 2 * 64
    inner, conv_channels = 4 * 8, 4 * 8 + 2 * 2 * 16
    mamba = T * (D * (inner + conv_channels + 4) + inner * D + 4 * conv_channels)
    mamba += T * (16 / 2 * 2 * 16 + 16 / 2 * inner + 2 * inner * 16)
    attention = T * (2 * H + 2 * K) * E * D + 2 * 2 * (64 * 64 / 2) * H * E
    forward = 2 * (mamba + attention + T * 2 * D * F + T * D * V)
    assert abs(metrics.train_flops_per_step(cfg) - 3 * forward) < 1e-9 * forward
