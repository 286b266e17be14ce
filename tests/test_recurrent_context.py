"""Recurrent layers (Mamba2, Gated DeltaNet) under context parallelism on 8 fake CPU devices: a hybrid
stack's logits, gradients and train steps on zig-zag shards against one device (nopejax/context.py
`recurrence`)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_train import random_batches, small_cfg

from benchmarks.hlo_collectives import collective_bytes
from nopejax import config, context, model, sharding, train
from nopejax.mixers import mamba2 as mamba2_lib

# three Mamba2 layers to one NoPE attention layer, twice; SSD chunks of 4 inside zig-zag chunks of 4 or 8
HYBRID = dict(
    layer_types=("mamba2", "mamba2", "mamba2", "full_attention") * 2, num_layers=8, no_rope_layer_interval=1,
    vocab_size=62, d_model=24, num_heads=2, num_kv_heads=2, head_dim=6, d_ff=14, mamba_num_heads=4,
    mamba_head_dim=5, mamba_groups=2, mamba_state_size=3, mamba_chunk_size=4,
)  # fmt: skip


# three Gated DeltaNet layers (negative eigenvalues) to one NoPE attention layer; rule chunks of 4
GDN_HYBRID = dict(
    layer_types=("gated_deltanet",) * 3 + ("full_attention",), num_layers=4, mamba_num_heads=0, gdn_key_heads=2,
    gdn_value_heads=4, gdn_key_head_dim=3, gdn_value_head_dim=5, gdn_chunk_size=4, gdn_allow_neg_eigval=True,
)  # fmt: skip


def hybrid_cfg(gdn=False, model_fields=None, **mesh):
    cfg = small_cfg(**mesh)
    cfg.model.update(**HYBRID)
    cfg.model.update(**(GDN_HYBRID if gdn else {}), **(model_fields or {}))
    cfg.train.update(global_batch_size=4)
    return cfg


def _rows(S: int):
    """(segment_ids, positions) [4, S]: documents crossing shard boundaries (chunks of S / 8 and S / 4),
    one ending in padding, three short ones, one over the whole row."""
    lens = [[13, S - 13], [S - 5], [5, 10, S - 15], [S]]
    seg = np.stack([np.pad(np.repeat(np.arange(1, len(n) + 1), n), (0, S - sum(n))) for n in lens]).astype(np.int32)
    pos = np.stack([np.pad(np.concatenate([np.arange(x) for x in n]), (0, S - sum(n))) for n in lens]).astype(np.int32)
    return seg, pos


def _logits_and_grads(s, params, tokens, pos, seg, w):
    def loss(params):
        logits = model.apply(s.graphdef, params, tokens, pos, seg)
        return jnp.sum(logits * w), logits

    with jax.set_mesh(s.mesh):
        (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    return jax.device_get(logits), jax.device_get(grads)


def _close(got, want, tol):
    """Max error relative to the largest entry: sums of many fp32 terms differ in their last bits."""
    assert np.all(np.isfinite(got))
    err = np.abs(got - want).max() / np.abs(want).max()
    assert err < tol, f"relative error {err:.2e} >= {tol:.0e}"


def _one_device(gdn: bool):
    S = hybrid_cfg().train.seq_len
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 62, (4, S)).astype(np.int32)
    w = rng.standard_normal((4, S, 62)).astype(np.float32)
    seg, pos = _rows(S)
    s = train.setup(hybrid_cfg(gdn), jax.devices()[:1])
    params = jax.device_get(train.init_state(s)["params"])
    return params, (tokens, pos, seg, w), _logits_and_grads(s, params, tokens, pos, seg, w)


@pytest.fixture(scope="module")
def one_device():
    return _one_device(gdn=False)


@pytest.fixture(scope="module")
def one_device_gdn():
    return _one_device(gdn=True)


@pytest.mark.parametrize("mesh", [dict(data=2, context=2, tensor=2), dict(fsdp=2, context=4)])
def test_hybrid_logits_and_grads_under_context_parallelism_equal_one_device(mesh, one_device):
    _check_logits_and_grads(mesh, one_device, gdn=False, decay="mamba_A_log")


def test_gdn_hybrid_logits_and_grads_under_context_parallelism_equal_one_device(one_device_gdn):
    _check_logits_and_grads(dict(fsdp=2, context=4), one_device_gdn, gdn=True, decay="gdn_A_log")


def test_switch_plan_under_context_parallelism_equals_one_device(one_device):
    """The switch scan plan (collectives of the mixers and attention inside `lax.switch` branches)
    on fsdp 2 x context 4 against the period plan on one device."""
    _check_logits_and_grads(dict(fsdp=2, context=4), one_device, gdn=False, decay="mamba_A_log",
                            model_fields=dict(scan_plan="switch", remat="full"))  # fmt: skip


def _check_logits_and_grads(mesh, one_device, gdn: bool, decay: str, model_fields=None):
    params, inputs, (want_logits, want_grads) = one_device
    n = int(np.prod(list(mesh.values())))
    s = train.setup(hybrid_cfg(gdn, model_fields, **mesh), jax.devices()[:n])
    S, C = inputs[0].shape[1], mesh["context"]
    order, inverse = context.zigzag_order(S, C), np.argsort(context.zigzag_order(S, C))
    sharded = jax.device_put(params, s.state_shardings["params"])
    logits, grads = _logits_and_grads(s, sharded, *(a[:, order] for a in inputs))
    _close(logits[:, inverse], want_logits, 5e-6)  # measured 6e-7
    assert np.abs(want_grads["layers"][decay]).min() > 0  # every recurrent layer's decay gets a gradient
    jax.tree.map(lambda a, b: _close(a, b, 2e-5), grads, want_grads)  # measured 2e-6


def _train(cfg, batches, devices):
    s = train.setup(cfg, devices)
    state = train.init_state(s)
    step, _ = train.compile_fns(s)
    out = []
    with jax.set_mesh(s.mesh):
        for b in batches:
            state, o = step(state, train.to_device_batch(s, b))
            out.append((float(o["loss"]), float(o["grad_norm"])))
    return np.array(out)


def train_cfg(**mesh):  # two layers of each kind; random_batches' tokens are below 259
    cfg = hybrid_cfg(**mesh)
    cfg.model.update(layer_types=("mamba2", "full_attention") * 2, num_layers=4, vocab_size=264)
    return cfg


@pytest.fixture(scope="module")
def one_device_run():
    batches = random_batches(train_cfg(), 5, seed=4)
    return batches, _train(train_cfg(), batches, jax.devices()[:1])


@pytest.mark.parametrize("mesh", [dict(fsdp=2, context=2), dict(fsdp=2, context=4)])
def test_hybrid_train_steps_under_context_parallelism_equal_one_device(mesh, one_device_run):
    """5 AdamW steps on packed rows, documents across shards, padding (train.to_device_batch zig-zags them)."""
    batches, want = one_device_run
    got = _train(train_cfg(**mesh), batches, jax.devices()[: 2 * mesh["context"]])
    assert np.all(np.isfinite(want)) and want[-1, 0] < want[0, 0]  # it trains
    np.testing.assert_allclose(got, want, rtol=5e-6)  # loss and gradient norm over 5 steps; measured 4e-7


@pytest.mark.parametrize("S", [32, 64])
def test_mamba2_context_shards_exchange_only_halos_and_summaries(S):
    """Compiled on context 4, a Mamba2 mixer moves no sequence: per device, its two chunks' conv halos
    (K - 1 = 3 conv inputs and segment ids each, collective-permute) and the all-gather of its two
    chunk summaries (decay [B, H], state [B, H, P, N]), the same bytes at every S."""
    d = mamba2_lib.Mamba2Dims(d_model=8, heads=4, head_dim=5, groups=2, state=3, chunk=4)
    params, B, C, W = mamba2_lib.init_params(d, jax.random.key(0)), 2, 4, 3
    cfg = config.base_config()
    cfg.mesh.update(data=1, fsdp=1, context=C, tensor=1)
    with jax.set_mesh(sharding.make_mesh(cfg.mesh, jax.devices()[:C])):
        mix = jax.jit(lambda p, h, seg: mamba2_lib.mamba2(p, h, d, segment_ids_BS=seg)[0])
        table = collective_bytes(
            mix.lower(params, jnp.ones((B, S, 8)), jnp.ones((B, S), jnp.int32)).compile().as_text()
        )
    assert set(table) == {"collective-permute", "all-gather"}
    assert table["collective-permute"]["operand_bytes"] == 2 * B * W * (d.conv_dim + 1) * 4  # f32 inputs, s32 ids
    assert table["all-gather"]["operand_bytes"] == 2 * B * d.heads * (1 + d.head_dim * d.state) * 4
