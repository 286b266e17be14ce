"""Training on 8 fake CPU devices: sharded runs against a 1-device run, accumulation, the CLI."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from nopejax import config, context, train
from nopejax.config import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def small_cfg(**mesh):
    cfg = config.base_config()
    cfg.model.update(vocab_size=384, d_model=64, num_layers=5, num_heads=4, num_kv_heads=2, head_dim=16, d_ff=96)
    cfg.model.dtype = "float32"
    cfg.train.update(global_batch_size=16, seq_len=32, steps=20)
    cfg.optim.update(lr=1e-2, warmup_steps=2, decay_steps=5)
    cfg.mesh.update(data=1, fsdp=1, tensor=1)
    cfg.mesh.update(**mesh)
    return cfg


def random_batches(cfg, n, seed=0):
    """Packed-looking batches: two documents per row, positions restarting, padding at the end."""
    rng = np.random.default_rng(seed)
    B, S = cfg.train.global_batch_size, cfg.train.seq_len
    out = []
    for _ in range(n):
        cut = rng.integers(4, S - 8, B)
        seg = np.where(np.arange(S)[None] < cut[:, None], 1, 2).astype(np.int32)
        seg[:, -3:] = 0
        pos = np.where(seg == 1, np.arange(S)[None], np.arange(S)[None] - cut[:, None]).astype(np.int32)
        tokens = rng.integers(0, 259, (B, S + 1)).astype(np.int32)
        mask = ((seg != 0) & (np.roll(seg, -1, axis=1) == seg)).astype(np.float32)
        mask[:, -1] = 0
        out.append(dict(inputs=tokens[:, :-1], targets=tokens[:, 1:], segment_ids=seg, positions=pos, loss_mask=mask))
    return out


def run_steps(cfg, batches, devices, outs=None):
    """-> (losses, final state); each step's metrics appended to `outs` when given."""
    s = train.setup(cfg, devices)
    state = train.init_state(s)
    step, _ = train.compile_fns(s)
    losses = []
    with jax.set_mesh(s.mesh):
        for b in batches:
            b = {k: jax.device_put(v, s.batch_sharding) for k, v in b.items()}
            state, out = step(state, b)
            losses.append(float(out["loss"]))
            if outs is not None:
                outs.append(jax.device_get(out))
    return losses, state


@pytest.fixture(scope="module")
def one_device_losses():
    cfg = small_cfg()
    return run_steps(cfg, random_batches(cfg, 5), jax.devices()[:1])[0]


@pytest.mark.parametrize("mesh", [dict(data=8), dict(fsdp=8), dict(data=2, fsdp=2, tensor=2)])
def test_sharded_losses_equal_one_device(mesh, one_device_losses):
    cfg = small_cfg(**mesh)
    losses, _ = run_steps(cfg, random_batches(cfg, 5), jax.devices())
    np.testing.assert_allclose(losses, one_device_losses, rtol=1e-5)
    assert losses[-1] < losses[0]


def test_params_and_optimizer_state_are_sharded_by_the_rules():
    cfg = small_cfg(data=2, fsdp=2, tensor=2)
    s = train.setup(cfg, jax.devices())
    state = train.init_state(s)
    wq = state["params"]["layers"]["wq"]  # [layers, embed, heads, head_dim]
    assert tuple(wq.sharding.spec) == (None, "fsdp", "tensor", None)
    assert wq.addressable_shards[0].data.shape == (5, 32, 2, 16)
    assert tuple(state["params"]["embed"].sharding.spec) == ("tensor", "fsdp")
    assert tuple(state["params"]["layers"]["w_down"].sharding.spec) == (None, "tensor", "fsdp")
    adam = state["opt_state"][1][0]  # chain(clip, adamw) -> adamw's ScaleByAdamState
    assert adam.mu["layers"]["wq"].sharding == wq.sharding
    assert adam.nu["layers"]["w_gate"].sharding == state["params"]["layers"]["w_gate"].sharding


def test_chunked_loss_equals_whole_sequence_loss():
    cfg = small_cfg()
    cfg.train.z_loss = 1e-3
    s = train.setup(cfg, jax.devices()[:1])
    params = train.init_state(s)["params"]
    batch = {k: jax.numpy.asarray(v) for k, v in random_batches(cfg, 1, seed=7)[0].items()}

    def total(params, chunk_len):
        return train.loss_sums(s.graphdef, params, batch, cfg.train.z_loss, chunk_len)[0]

    # jitted: one compile per chunking beats the eager op-by-op dispatch of a grad on CPU
    value_and_grad = jax.jit(jax.value_and_grad(total), static_argnums=1)
    whole, g_whole = value_and_grad(params, 0)
    chunked, g_chunked = value_and_grad(params, 8)
    np.testing.assert_allclose(chunked, whole, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), g_chunked, g_whole)


@pytest.mark.parametrize(
    "mesh, moe",
    [(dict(data=2, fsdp=2), False), (dict(data=2, context=2, expert=2), True)],
    ids=["data2xfsdp2", "data2xcontext2xexpert2-moe"],
)
def test_grad_accumulation_equals_full_batch(mesh, moe):
    """4 microbatches (each data replica summing its own, inside shard_map over `data`, with the
    context-parallel attention and the expert dispatch nested in it) update the params as one batch."""
    cfg = small_cfg(**mesh)
    cfg.model.num_layers = 2  # accumulation is over the batch, not the layers: one scanned run compiles fastest
    if moe:
        cfg.model.update(ffn_types=("moe", "moe"), num_experts=4, experts_per_token=2, expert_d_ff=32)
    n = int(np.prod(list(mesh.values())))
    cfg.train.global_batch_size = 4 * n // mesh.get("context", 1)  # 4 microbatches, each split over the batch axes
    batches = random_batches(cfg, 2, seed=3)
    full_outs, acc_outs = [], []
    full_losses, full = run_steps(cfg, batches, jax.devices()[:n], full_outs)
    cfg.train.grad_accum = 4
    acc_losses, acc = run_steps(cfg, batches, jax.devices()[:n], acc_outs)
    np.testing.assert_allclose(acc_losses, full_losses, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), acc["params"], full["params"])
    if moe:  # the loads add up; the balance and z losses are means over the groups of rows
        for a, f in zip(acc_outs, full_outs):
            np.testing.assert_allclose(a["moe_load_max"], f["moe_load_max"], rtol=1e-6)
            np.testing.assert_allclose(a["moe_z_loss"], f["moe_z_loss"], rtol=1e-5)  # a mean of equal groups' means
            # per group of rows, not over the batch: measured 0.4-0.7% above the global figure
            np.testing.assert_allclose(a["moe_balance_loss"], f["moe_balance_loss"], rtol=0.02)


def test_grad_accumulation_reduces_over_data_once():
    """Across `data` the microbatches' gradients are summed per replica and all-reduced once per step:
    the step with 4 microbatches moves what the step with one does (the partitioner, left to itself,
    all-reduced every microbatch's whole gradient: 4x)."""
    from benchmarks.hlo_collectives import collective_bytes

    moved = {}
    for accum in (1, 4):
        cfg = small_cfg(data=4)
        cfg.model.num_layers = 2
        cfg.train.update(global_batch_size=16, grad_accum=accum)
        s = train.setup(cfg, jax.devices()[:4])
        step, _ = train.compile_fns(s)
        with jax.set_mesh(s.mesh):
            hlo = step.lower(s.abstract_state, train.abstract_batch(s)).compile().as_text()
        moved[accum] = collective_bytes(hlo)["all-reduce"]["moved_bytes"]
    params_bytes = 4 * sum(x.size for x in jax.tree.leaves(s.abstract_state["params"]))
    assert moved[1] >= params_bytes  # one all-reduce of the whole gradient (2 (n - 1) / n of it)
    assert moved[4] < 1.1 * moved[1], f"4 microbatches all-reduce {moved[4]} bytes, one {moved[1]}"


@pytest.mark.parametrize(
    "changes, field, words",
    [
        (dict(mesh=dict(data=3)), "mesh.data", "devices per slice"),
        (
            dict(mesh=dict(data=1, fsdp=8), model=dict(d_model=60, num_heads=6, head_dim=10)),
            "mesh",
            "dimension `embed` = 60",
        ),
        (dict(mesh=dict(data=8), train=dict(global_batch_size=12)), "train.global_batch_size", "not divisible"),
        (dict(mesh=dict(dcn_data=3)), "mesh.dcn_data", "does not divide"),
    ],
)
def test_bad_mesh_is_a_clear_error_before_compiling(changes, field, words):
    cfg = small_cfg()
    for section, values in changes.items():
        cfg[section].update(values)
    with pytest.raises(ConfigError) as err:
        train.setup(cfg, jax.devices())
    assert err.value.field == field and words in str(err.value)


def nopejax(*args, env=None, check=True, timeout=600):
    env = {**os.environ, "XLA_FLAGS": os.environ["NOPEJAX_TEST_XLA_FLAGS"], "JAX_PLATFORMS": "cpu", **(env or {})}
    cmd = [sys.executable, "-m", "nopejax.cli", *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.slow  # 20 training steps
def test_cli_trains_tiny_on_the_offline_corpus(tmp_path):
    """README's first command, cut to 20 steps (as .ci/run's smoke run): `train.steps` is the only
    override that changes training (warmup and decay are fractions of it); the others only say
    when to log, evaluate and save."""
    wd = tmp_path / "run"
    nopejax("train", "--config", "configs/tiny.py", "--workdir", str(wd), "--config.train.steps=20",
            "--config.train.log_every=5", "--config.train.eval_every=10", "--config.checkpoint.every_steps=10",
            "--no-progress")  # fmt: skip
    records = [json.loads(line) for line in (wd / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [5, 10, 15, 20]
    for r in records:
        assert {"step", "loss", "lr", "grad_norm", "tokens_per_sec", "mfu"} <= set(r)
    assert [r["step"] for r in records if "eval_loss" in r] == [10, 20]
    # byte-level loss starts near ln(384) = 5.95 (the first 5 steps average 4.3 - 4.8); after 20 steps on
    # real text the held-out loss is 3.24 (measured; a model that learned nothing stays above 5)
    assert records[0]["loss"] > 4.0 and records[-1]["eval_loss"] < 3.5
    assert json.loads((wd / "config.json").read_text())["model"]["d_model"] == 192
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(wd / "tensorboard"))
    assert sorted(os.listdir(wd / "checkpoints")) == ["10", "20"]


def test_metric_writer_starts_without_importing_torch(tmp_path):
    """tensorboardX imports torch where installed (as here, for the tests), 2-6 s of every start."""
    script = (
        "import sys; from nopejax import metrics; w = metrics.Writer(sys.argv[1], True); "
        "assert 'torch' not in sys.modules; w.write(1, {'loss': 2.0}); w.close(); "
        "import importlib.machinery as m; m.PathFinder.find_spec('torch') and __import__('torch')"  # importable after
    )
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path / "tensorboard"))


def test_cli_user_errors_are_one_line(tmp_path):
    proc = nopejax("train", "--config", "configs/tiny.py", "--workdir", str(tmp_path), "--config.model.num_kv_heads=4",
                   check=False)  # fmt: skip
    assert proc.returncode == 2
    assert "model.num_kv_heads" in proc.stderr and "Traceback" not in proc.stderr
    proc = nopejax("train", "--config", "configs/tiny.py", "--config.optim.lrr=1", check=False)
    assert proc.returncode == 2 and "no such config key" in proc.stderr


def test_dry_run_on_cpu_prints_json_last():
    proc = nopejax("train", "--config", "configs/tiny.py", "--dry-run")
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(report) == {"compile_seconds", "param_count", "memory_per_device_gib", "flops_per_device"}
    assert report["param_count"] == 2_435_520 and report["memory_per_device_gib"] > 0


def _libtpu():
    try:
        import libtpu  # noqa: F401

        return True
    except ImportError:
        return False


@pytest.mark.skipif(not _libtpu(), reason="libtpu not installed (pip install -e '.[tpu]')")
def test_dry_run_for_a_tpu_topology():
    proc = nopejax("train", "--config", "configs/tiny.py", "--dry-run", "--topology", "v5p:2x2x1",
                   "--config.mesh.data=1", "--config.mesh.fsdp=-1")  # fmt: skip
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["memory_per_device_gib"] > 0 and "TPU v5" in proc.stdout


@pytest.mark.skipif(not _libtpu(), reason="libtpu not installed (pip install -e '.[tpu]')")
def test_dry_run_for_tpu_with_the_pallas_kernel_under_shard_map():
    """The whole train step with the fused-RoPE kernel compiles for TPU through Mosaic."""
    proc = nopejax("train", "--config", "configs/tiny.py", "--dry-run", "--topology", "v5p:2x2x1",
                   "--config.mesh.data=2", "--config.mesh.tensor=2", "--config.model.d_model=256",
                   "--config.model.num_heads=4", "--config.model.head_dim=64", "--config.model.attention_impl=pallas",
                   "--config.model.dtype=bfloat16")  # fmt: skip
    assert json.loads(proc.stdout.strip().splitlines()[-1])["memory_per_device_gib"] > 0


@pytest.mark.skipif(not _libtpu(), reason="libtpu not installed (pip install -e '.[tpu]')")
def test_tied_table_is_updated_in_its_own_layout_on_tpu():
    """A tied table gets two gradients, D-split from the lookup and vocabulary-split from the loss head.
    Summed in the table's layout, the update moves nothing more; left to the partitioner (on TPU; XLA:CPU
    chooses otherwise), AdamW ran vocabulary-split and the new table and both moments were moved back: 9
    all-to-alls, 0.72x the fp32 table received per chip, against 4 and 0.17x (measured)."""
    from jax.experimental import topologies

    from benchmarks.hlo_collectives import collective_bytes

    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    cfg = small_cfg(fsdp=8)
    cfg.model.update(num_layers=1, vocab_size=4096, tie_embeddings=True, dtype="bfloat16", d_model=128,
                     num_heads=4, num_kv_heads=4, head_dim=32)  # fmt: skip
    cfg.train.update(global_batch_size=8, loss_chunk_len=8)
    s = train.setup(cfg, topologies.get_topology_desc(topology_name="v5p:2x2x2", platform="tpu").devices)
    step, _ = train.compile_fns(s)
    with jax.set_mesh(s.mesh):
        hlo = step.lower(s.abstract_state, train.abstract_batch(s)).compile().as_text()
    table_bytes = 4096 * 128 * 4
    moved = collective_bytes(hlo).get("all-to-all", {"moved_bytes": 0})["moved_bytes"]
    assert moved < table_bytes / 2, f"all-to-alls move {moved} bytes per chip; the fp32 table is {table_bytes}"


@pytest.mark.skipif(not _libtpu(), reason="libtpu not installed (pip install -e '.[tpu]')")
def test_loss_chunks_gather_only_their_own_hidden_states_on_tpu():
    """Each loss chunk gathers its own rows' hidden states (forward, and again in the rematerialized
    backward), so 4 chunks move one more gather of them than an unchunked loss. Left to the
    partitioner (on TPU; XLA:CPU chooses otherwise), the gather of all chunks was sunk into the chunk
    loop: every chunk gathered the whole sequence (SmolLM3-3B on v5p-16: 1.9 GiB per chip and step,
    8x its share)."""
    from jax.experimental import topologies

    from benchmarks.hlo_collectives import collective_bytes

    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    devices = topologies.get_topology_desc(topology_name="v5p:2x2x2", platform="tpu").devices
    moved = {}
    for chunk_len in (256, 64):
        cfg = small_cfg(fsdp=8)
        cfg.model.update(num_layers=1, dtype="bfloat16", d_model=256, num_heads=2, num_kv_heads=2, head_dim=128,
                         d_ff=256)  # fmt: skip
        cfg.train.update(global_batch_size=16, seq_len=256, loss_chunk_len=chunk_len)
        s = train.setup(cfg, devices)
        step, _ = train.compile_fns(s)
        with jax.set_mesh(s.mesh):
            hlo = step.lower(s.abstract_state, train.abstract_batch(s)).compile().as_text()
        moved[chunk_len] = collective_bytes(hlo)["all-gather"]["moved_bytes"]
    hidden = 16 * 256 * 256 * 2  # the batch's hidden states, bf16
    # the chunks' rematerialized backward gathers them once more: 0.88x `hidden` more than one unchunked
    # loss (measured), against 3.5x when every chunk gathered the whole sequence
    assert moved[64] - moved[256] < 1.5 * hidden, f"4 chunks gather {moved[64]} bytes, 1 chunk {moved[256]}"


@pytest.mark.parametrize("mesh", [dict(fsdp=4), dict(fsdp=2, context=2), dict(data=2, fsdp=2, tensor=2)])
def test_chunked_loss_under_a_mesh_keeps_the_head_gradient_on_its_devices(mesh):
    """The loss over sequence chunks on a sharded model (train.loss_sums, model.loss_head) equals one
    device's, value and gradients; and a chunk moves no copy of the LM head or its [D, V] gradient
    between devices: the head's vocabulary is split over the weight-sharding axes for the loss, so
    each device's columns get their gradient whole. (Gathered over D inside the chunk loop instead,
    every chunk all-reduced the whole fp32 gradient: 12 GiB per step for SmolLM3-3B on v5p-16.)"""
    from benchmarks.hlo_collectives import collective_bytes

    def cfg_on(chunk_len=8, **mesh):
        cfg = small_cfg(**mesh)
        cfg.model.update(num_layers=1, vocab_size=4096)
        cfg.train.update(global_batch_size=8, loss_chunk_len=chunk_len)  # 4 chunks of a 32-token row
        return cfg

    cfg = cfg_on(**mesh)
    batch = {k: jax.numpy.asarray(v) for k, v in random_batches(cfg, 1, seed=5)[0].items()}
    one = train.setup(cfg_on(), jax.devices()[:1])
    params = jax.device_get(train.init_state(one)["params"])

    def total(s):
        chunk_len = s.cfg.train.loss_chunk_len
        return jax.jit(jax.value_and_grad(lambda p, b: train.loss_sums(s.graphdef, p, b, 0.0, chunk_len)[0]))

    want, want_grads = total(one)(params, batch)
    # under context parallelism a row's tokens are in zig-zag order (the loss sums are order-free)
    order = context.zigzag_order(cfg.train.seq_len, mesh.get("context", 1))
    batch = {k: v[:, order] for k, v in batch.items()}
    moved = {}
    for chunk_len in (8, 32):
        s = train.setup(cfg_on(chunk_len, **mesh), jax.devices()[: np.prod(list(mesh.values()))])
        with jax.set_mesh(s.mesh):
            sharded = jax.device_put(params, s.state_shardings["params"])
            hlo = total(s).lower(sharded, batch).compile().as_text()
            moved[chunk_len] = sum(row["operand_bytes"] for row in collective_bytes(hlo).values())
            if chunk_len == 8:
                got, grads = total(s)(sharded, batch)
    np.testing.assert_allclose(got, want, rtol=1e-6)  # measured 1e-7

    def close(a, b):  # fp32 sums in another order: error relative to the largest entry, measured <= 5e-7
        assert np.abs(a - b).max() <= 5e-6 * np.abs(b).max()

    jax.tree.map(close, jax.device_get(grads), want_grads)
    # what the 3 extra chunks move: their hidden states and per-token sums, a small part of the head
    head_grad = cfg.model.vocab_size * cfg.model.d_model * 4
    extra = moved[8] - moved[32]
    assert extra < head_grad / 4, f"3 more chunks move {extra} bytes; the V x D fp32 gradient is {head_grad}"
