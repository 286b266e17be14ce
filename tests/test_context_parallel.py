"""Context parallelism on 8 fake CPU devices: zig-zag order, attention and whole train steps under
a `context` mesh axis against one device, and a checkpoint moved onto a context mesh."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_train import _libtpu, nopejax, random_batches, small_cfg

from benchmarks.hlo_collectives import collective_bytes
from nopejax import attention, checkpoint, config, context, sharding, train, validation
from nopejax import rope as rope_lib
from nopejax.config import ConfigError
from nopejax.kernels import flash_attention
from nopejax.layers import LayerSpec


def test_zigzag_reorder_then_restore_is_identity():
    S, C = 48, 4
    order = context.zigzag_order(S, C)
    c = S // (2 * C)
    # device i's block of S / C holds chunks i and 2C-1-i
    assert [order[i * 2 * c] // c for i in range(C)] == [0, 1, 2, 3]
    assert [order[i * 2 * c + c] // c for i in range(C)] == [7, 6, 5, 4]
    rng = np.random.default_rng(0)
    batch = {k: rng.integers(0, 100, (3, S)) for k in train.BATCH_KEYS}
    back = context.restore(context.reorder(batch, C), C)
    for k in batch:
        np.testing.assert_array_equal(back[k], batch[k])
    assert context.reorder(batch, 1) is batch


@pytest.mark.parametrize("C", [2, 4, 8])
def test_each_shard_gets_the_same_causal_work(C):
    """Unmasked causal (query, key) pairs per device: equal under zig-zag, not under a plain split."""
    S = 4096
    pairs = lambda idx: int(np.sum(idx + 1))  # query i sees keys 0..i
    zigzag = [pairs(block) for block in context.zigzag_order(S, C).reshape(C, -1)]
    assert max(zigzag) / min(zigzag) - 1 < 0.01
    plain = [pairs(block) for block in np.arange(S).reshape(C, -1)]
    assert max(plain) / min(plain) > 2  # what the reorder is for


# ---------------------------------------------------------------------------------------------
# Attention


def _rows(kind: str, S: int):
    """(segment_ids, positions) [2, S]: documents crossing shard boundaries, trailing padding, one
    document over all shards, or a second row that is all padding (every shard of it)."""
    if kind == "packed":
        lens = [[S // 3 + 1, S - S // 3 - 1], [S // 4 - 1, S // 2, S - S // 4 - S // 2 + 1]]
    else:
        lens = [[S], [S]]
    seg = np.stack([np.repeat(np.arange(1, len(n) + 1), n) for n in lens]).astype(np.int32)
    pos = np.stack([np.concatenate([np.arange(x) for x in n]) for n in lens]).astype(np.int32)
    if kind == "packed":
        seg[1, -5:], pos[1, -5:] = 0, 0
    if kind == "padding_row":
        seg[1], pos[1] = 0, 0
    return seg, pos


def _attend(spec, impl, q, k, v, pos, seg):
    rope = rope_lib.make_rope(q.shape[-1], 10000.0, None, 1.0) if spec.use_rope else None
    cos_sin = rope_lib.cos_sin(pos, rope, "half") if rope else None
    return attention.attend(q, k, v, positions_BS=pos, segment_ids_BS=seg, spec=spec, cos_sin=cos_sin, rope=rope,
                            impl=impl)  # fmt: skip


def _mesh(**axes):
    cfg = config.base_config()
    cfg.mesh.update(data=1, fsdp=1, context=1, tensor=1)
    cfg.mesh.update(**axes)
    return sharding.make_mesh(cfg.mesh, jax.devices()[: int(np.prod(list(axes.values())))])


XLA = dict(impl="xla", S=96, D=16, H=4, K=2)
KERNEL = dict(impl="pallas", S=512, D=64, H=2, K=1)  # interpret mode: as small as the TPU tiles allow
CASES = [  # (mesh, layer, rows, path): each line adds what the others lack
    (dict(context=2), LayerSpec(), "packed", XLA),
    (dict(context=4), LayerSpec(rope="none"), "one_doc", XLA),
    (dict(context=8), LayerSpec("sliding", 5), "packed", XLA),  # halo: W - 1 <= a chunk's 6 rows
    (dict(context=4), LayerSpec("sliding", 40, rope="none"), "padding_row", XLA),  # W past a chunk: gathered
    (dict(context=4), LayerSpec("chunked", 10), "packed", XLA),
    (dict(fsdp=2, context=2, tensor=2), LayerSpec("sliding", 7), "padding_row", XLA),
    (dict(context=2), LayerSpec(), "packed", KERNEL),
    (dict(context=2), LayerSpec("sliding", 100, rope="none"), "padding_row", KERNEL),  # halo of 128
]


@pytest.mark.parametrize("axes, spec, rows, path", CASES)
def test_attention_under_context_parallelism_equals_one_device(axes, spec, rows, path):
    S, D, H, K, impl = path["S"], path["D"], path["H"], path["K"], path["impl"]
    B = 2  # GQA: H = 2K
    kq, kk, kv, kw = jax.random.split(jax.random.key(0), 4)
    q, w = jax.random.normal(kq, (B, S, H, D)), jax.random.normal(kw, (B, S, H, D))
    k, v = jax.random.normal(kk, (B, S, K, D)), jax.random.normal(kv, (B, S, K, D))
    seg, pos = _rows(rows, S)
    f = jax.jit(lambda q, k, v, pos, seg: _attend(spec, impl, q, k, v, pos, seg))
    grad = jax.jit(jax.grad(lambda q, k, v, pos, seg, w: jnp.sum(f(q, k, v, pos, seg) * w), (0, 1, 2)))
    # the reference: one device, natural order, the plain path of the same impl
    want_o, want_g = f(q, k, v, pos, seg), grad(q, k, v, pos, seg, w)

    mesh = _mesh(**axes)
    C = mesh.shape["context"]
    order, inverse = context.zigzag_order(S, C), np.argsort(context.zigzag_order(S, C))
    zz = lambda x: x[:, order]
    with jax.set_mesh(mesh):
        got_o = f(zz(q), zz(k), zz(v), zz(pos), zz(seg))[:, inverse]
        got_g = [g[:, inverse] for g in grad(zz(q), zz(k), zz(v), zz(pos), zz(seg), zz(w))]
    for got, want in zip([got_o, *got_g], [want_o, *want_g]):
        assert np.all(np.isfinite(got))
        np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-4)


def test_kernel_suffix_queries_need_whole_tpu_tiles():
    q, kv = jnp.zeros((1, 64, 2, 64)), jnp.zeros((1, 192, 1, 64))
    with pytest.raises(ValueError, match="multiples of 128"):
        flash_attention(q, kv, kv, interpret=True)
    with pytest.raises(ValueError, match="more rows than q"):
        flash_attention(q, kv, kv, interpret=True, causal=False)


@pytest.mark.slow  # a Mosaic compile of the whole step, ~50 s of CPU
@pytest.mark.skipif(not _libtpu(), reason="libtpu not installed (pip install -e '.[tpu]')")
def test_train_step_with_the_kernel_under_context_parallelism_compiles_for_tpu():
    """Suffix-query kernels (global layers: gathered span; sliding layers: 128-key halo) through Mosaic."""
    proc = nopejax("train", "--config", "configs/tiny_local_global.py", "--dry-run", "--topology", "v5p:2x2x1",
                   "--config.mesh.data=1", "--config.mesh.context=4", "--config.train.seq_len=1024",
                   "--config.train.global_batch_size=2", "--config.model.d_model=256", "--config.model.num_heads=4",
                   "--config.model.head_dim=64", "--config.model.attention_impl=pallas",
                   "--config.model.dtype=bfloat16")  # fmt: skip
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["memory_per_device_gib"] > 0 and "'context': 4" in proc.stdout


def test_context_parallel_sliding_layers_exchange_only_their_halo():
    """Compiled on context 4: a sliding layer whose window fits a chunk (W - 1 = 5 <= 8 rows) only
    passes each chunk's last W - 1 keys to the device holding the next chunk (collective-permute, no
    all-gather): per device two halos of W - 1 tokens of K and V, with their positions and document
    ids. A global layer all-gathers K and V instead, and permutes nothing."""
    S, B, H, K, D, C, W = 64, 2, 6, 3, 8, 4, 6
    x, kv = jnp.ones((B, S, H, D)), jnp.ones((B, S, K, D))
    seg, pos = _rows("packed", S)
    with jax.set_mesh(_mesh(context=C)):
        tables = {
            spec.attention: collective_bytes(
                jax.jit(lambda q, k, v, pos, seg, spec=spec: _attend(spec, "xla", q, k, v, pos, seg))
                .lower(x, kv, kv, pos, seg)
                .compile()
                .as_text()
            )
            for spec in (LayerSpec("sliding", W), LayerSpec())
        }
    halo_bytes = 2 * (W - 1) * B * (2 * K * D * 4 + 2 * 4)  # K, V f32 [B, W-1, K, D]; positions, ids s32 [B, W-1]
    assert set(tables["sliding"]) == {"collective-permute"}
    assert tables["sliding"]["collective-permute"]["operand_bytes"] == halo_bytes
    assert "collective-permute" not in tables["full"]
    assert tables["full"]["all-gather"]["operand_bytes"] >= 2 * B * (S // C) * K * D * 4  # this device's K and V


# ---------------------------------------------------------------------------------------------
# Config


@pytest.mark.parametrize(
    "changes, field, words",
    [
        (dict(mesh=dict(context=4), train=dict(seq_len=36)), "train.seq_len", "2 x context = 8"),
        (dict(mesh=dict(data=4, context=2), train=dict(global_batch_size=6)), "train.global_batch_size", "data x"),
        (dict(mesh=dict(context=-1)), "mesh.context", "cannot be -1"),
    ],
)
def test_bad_context_config_is_a_clear_error(changes, field, words):
    cfg = small_cfg()
    for section, values in changes.items():
        cfg[section].update(values)
    with pytest.raises(ConfigError) as e:
        validation.validate(cfg)
    assert e.value.field == field and words in str(e.value)


def test_parameters_shard_over_fsdp_and_context_together():
    s = train.setup(_cp_cfg(fsdp=2, context=4), jax.devices())
    spec = s.state_shardings["params"]["layers"]["wq"].spec
    assert spec[1] == ("fsdp", "context")  # [layers, embed, heads, head_dim]: embed over 8 devices


# ---------------------------------------------------------------------------------------------
# Whole train steps


def _cp_cfg(**mesh):
    """test_train's tiny model with sliding (W = 3, a halo within a chunk) and global layers, RoPE and NoPE."""
    cfg = small_cfg(**mesh)
    cfg.model.update(global_attention_interval=2, sliding_window=3)
    return cfg


def _run(cfg, batches, devices, state=None):
    s = train.setup(cfg, devices)
    state = train.init_state(s) if state is None else state
    step, _ = train.compile_fns(s)
    out = []
    with jax.set_mesh(s.mesh):
        for b in batches:
            state, o = step(state, train.to_device_batch(s, b))
            out.append((float(o["loss"]), float(o["grad_norm"])))
    return np.array(out), state


@pytest.fixture(scope="module")
def one_device_run():
    cfg = _cp_cfg()
    batches = random_batches(cfg, 5, seed=3)
    trace, state = _run(cfg, batches, jax.devices()[:1])
    return batches, trace, jax.device_get(state["params"])


@pytest.mark.parametrize("mesh", [dict(context=4), dict(fsdp=2, context=4)])
def test_train_steps_under_context_parallelism_equal_one_device(mesh, one_device_run):
    batches, want_trace, want_params = one_device_run
    n = int(np.prod(list(mesh.values())))
    trace, state = _run(_cp_cfg(**mesh), batches, jax.devices()[:n])
    np.testing.assert_allclose(trace, want_trace, rtol=1e-4)  # loss and gradient norm, 5 steps
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), jax.device_get(state["params"]),
                 want_params)  # fmt: skip


def test_checkpoint_from_data_8_continues_on_data_2_context_4(tmp_path, one_device_run):
    batches, want_trace, _ = one_device_run
    cfg8 = _cp_cfg(data=8)
    _, state = _run(cfg8, batches[:3], jax.devices())
    ckpt = checkpoint.Checkpointer(str(tmp_path), cfg8)
    ckpt.save(3, state, force=True)
    ckpt.close()

    cfg = _cp_cfg(data=2, context=4)
    s = train.setup(cfg, jax.devices())
    restored, step = checkpoint.Checkpointer(str(tmp_path), cfg).restore_latest(s.abstract_state)
    assert step == 3 and restored["params"]["embed"].sharding == s.state_shardings["params"]["embed"]
    trace, _ = _run(cfg, batches[3:], jax.devices(), state=restored)
    np.testing.assert_allclose(trace, want_trace[3:], rtol=1e-4)


# The kernel's train step under context parallelism, end to end. In subprocesses with a timeout: a
# deadlock between the devices' threads fails the test instead of hanging the suite (Pallas's TPU
# interpreter deadlocks this step under jax 0.10: its host callbacks block XLA:CPU's device threads).

KERNEL_RUN = ("--config", "configs/tiny_local_global.py", "--config.train.steps=3", "--config.train.seq_len=512",
              "--config.train.global_batch_size=2", "--config.train.log_every=1", "--config.train.eval_every=0",
              "--config.train.sample_every=0", "--config.model.num_layers=2", "--config.model.head_dim=64",
              "--config.model.global_attention_interval=2", "--config.model.no_rope_layer_interval=2",
              "--no-progress")  # fmt: skip  # a sliding RoPE layer (128-key halo) and a global NoPE one (gathered)


def _losses(workdir, *args, devices=1):
    flags = f"{os.environ['NOPEJAX_TEST_XLA_FLAGS']} --xla_force_host_platform_device_count={devices}"
    nopejax("train", "--workdir", str(workdir), *KERNEL_RUN, *args, env={"XLA_FLAGS": flags}, timeout=300)
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return np.array([(r["loss"], r["grad_norm"]) for r in records])


def test_train_steps_with_the_kernel_under_context_parallelism_equal_xla_on_one_device(tmp_path):
    """Zig-zag chunks of 128 rows, one kernel block each (seq 512 over context 2), fsdp beside them."""
    got = _losses(tmp_path / "cp", "--config.model.attention_impl=pallas", "--config.mesh.data=1",
                  "--config.mesh.fsdp=2", "--config.mesh.context=2", devices=4)  # fmt: skip
    want = _losses(tmp_path / "one", "--config.model.attention_impl=xla")
    assert got.shape == (3, 2)
    np.testing.assert_allclose(got, want, rtol=1e-6)  # loss and gradient norm; measured 1.0e-7
