"""Staged long-context training (SmolLM3's 4k -> 32k): init_from with or without the optimizer
state and schedule, resuming a workdir with another seq_len / rope_theta / mesh, the history in
config.json, refused changes, the data stream across a seq_len change, eval-length on a mesh."""

import json
import os
import shutil

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from configs_loader import load

from nopejax import checkpoint, config, data, eval_length, optimizer, restore, stages, train, validation
from nopejax.config import ConfigError

SEQ, STEPS = 24, 6


def tiny(**changes):
    """2 layers (RoPE, NoPE), odd sizes where they can be; fp32 so CPU runs are exact."""
    cfg = config.base_config()
    cfg.model.update(d_model=48, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=12, d_ff=80)
    cfg.model.update(dtype="float32", no_rope_layers=(1, 0), scan_layers=False)
    cfg.train.update(steps=STEPS, global_batch_size=8, seq_len=SEQ, log_every=1, eval_every=0)
    cfg.optim.update(lr=3e-3, warmup_steps=2, decay_steps=2)
    cfg.checkpoint.update(async_save=False, every_steps=3)
    for key, value in changes.items():
        section, name = key.split("__") if "__" in key else (None, key)
        (cfg[section] if section else cfg)[name] = value
    return validation.validate(cfg)


def losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return {r["step"]: r for r in map(json.loads, f) if "loss" in r}


def history(workdir):
    with open(os.path.join(workdir, "config.json")) as f:
        return json.load(f)["history"]


def raw_state(workdir, step):
    """A checkpoint's arrays read with plain orbax, not through nopejax: the reference."""
    return ocp.PyTreeCheckpointer().restore(os.path.join(workdir, "checkpoints", str(step), "state"))


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("stage1"))
    train.run(tiny(), workdir, progress=False)
    return workdir


def adam(opt_state):
    """(count, mu, nu, schedule count) of the one AdamW in the chain, whatever its nesting."""
    kinds = (optax.ScaleByAdamState, optax.ScaleByScheduleState)
    leaves = jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, kinds))
    state = next(x for x in leaves if isinstance(x, optax.ScaleByAdamState))
    sched = next(x for x in leaves if isinstance(x, optax.ScaleByScheduleState))
    return int(state.count), state.mu, state.nu, int(sched.count)


@pytest.mark.parametrize("keep_optimizer, schedule", [(True, "reset"), (False, "continue")])
def test_init_from_keeps_or_resets_optimizer_and_schedule(stage1, keep_optimizer, schedule):
    cfg = tiny(init_from=stage1, init_from_optimizer=keep_optimizer, init_from_schedule=schedule,
               train__seq_len=2 * SEQ, train__steps=STEPS + 4, model__rope_theta=40000.0)  # fmt: skip
    s = train.setup(cfg, jax.devices()[:2])
    state, entry = train.state_from(s, *checkpoint.find_checkpoint(stage1))
    source = raw_state(stage1, STEPS)
    count, mu, nu, sched = adam(state["opt_state"])
    source_mu = source["opt_state"][1][0]["mu"]
    if keep_optimizer:  # the source's moments and bias-correction count, bit for bit
        np.testing.assert_array_equal(np.asarray(mu["embed"]), source_mu["embed"])
        np.testing.assert_array_equal(np.asarray(nu["layers"]["wq"]), source["opt_state"][1][0]["nu"]["layers"]["wq"])
        assert count == STEPS
    else:  # fresh moments
        assert count == 0 and not np.any(np.asarray(mu["embed"])) and np.any(source_mu["embed"])
    step = STEPS if schedule == "continue" else 0
    assert int(state["step"]) == step and sched == step  # the LR schedule reads its own count
    np.testing.assert_array_equal(np.asarray(state["params"]["embed"]), source["params"]["embed"])
    assert entry["optimizer"] == ("kept" if keep_optimizer else "fresh")
    assert entry["changes"]["train.seq_len"] == [SEQ, 2 * SEQ]
    assert entry["changes"]["model.rope_theta"] == [10000.0, 40000.0]


def test_continued_stage_with_longer_sequences_and_new_theta_trains(stage1, tmp_path):
    workdir = str(tmp_path / "stage2")
    cfg = tiny(init_from=stage1, init_from_optimizer=True, train__seq_len=2 * SEQ, model__rope_theta=40000.0,
               train__steps=8, optim__lr=2e-3, optim__warmup_steps=1, optim__decay_steps=0)  # fmt: skip
    cfg.mesh.update(data=4, fsdp=2)  # and another mesh than stage 1's data=8
    train.run(cfg, workdir, progress=False)
    got = losses(workdir)
    first, stage1_last = got[1]["loss"], losses(stage1)[STEPS]["loss"]
    assert sorted(got) == list(range(1, 9)) and all(np.isfinite(r["loss"]) for r in got.values())
    assert np.mean([got[k]["loss"] for k in (7, 8)]) < first  # still learning at 2x the length
    assert first < stage1_last + 0.5  # starts from the trained params, not from scratch (ln 384 = 5.95)
    (entry,) = history(workdir)
    assert entry["stage"] == "init_from" and entry["source_step"] == STEPS and entry["schedule"] == "reset"
    with open(os.path.join(workdir, "config.json")) as f:
        assert json.load(f)["train"]["seq_len"] == 2 * SEQ


def test_resume_same_workdir_with_longer_sequences_records_history(stage1, tmp_path):
    workdir = str(tmp_path / "run")
    shutil.copytree(stage1, workdir)
    cfg = tiny(train__seq_len=2 * SEQ, train__steps=STEPS + 3, model__rope_theta=40000.0)
    cfg.mesh.update(data=2, fsdp=4)
    train.run(cfg, workdir, progress=False)
    got = losses(workdir)
    assert sorted(got) == list(range(1, STEPS + 4)) and all(np.isfinite(r["loss"]) for r in got.values())
    new_run, resumed = history(workdir)
    assert new_run == {"step": 0, "stage": "new run"}
    assert resumed["step"] == STEPS and resumed["stage"] == "resumed" and "data" not in resumed
    assert resumed["changes"] == {"mesh.data": [-1, 2], "mesh.fsdp": [1, 4], "model.rope_theta": [10000.0, 40000.0],
                                  "train.seq_len": [SEQ, 2 * SEQ], "train.steps": [STEPS, STEPS + 3]}  # fmt: skip
    # the data stream went on where it stopped: the saved iterator is the one that read 6 short
    # batches, then 3 long ones (not a fresh stream)
    with open(os.path.join(workdir, "checkpoints", str(STEPS + 3), "data", "process_0-of-1.json")) as f:
        saved = json.load(f)
    short, long = data.make_iterator(tiny(), "train"), data.make_iterator(cfg, "train")
    for _ in range(STEPS):
        next(short)
    long.set_state(short.get_state())
    for _ in range(3):
        next(long)
    assert saved == json.loads(json.dumps(long.get_state()))
    # a changed data stream (another seed) is not continued: it starts at its beginning and says so
    saved_cfg = checkpoint.read_config(workdir, STEPS + 3)
    cfg.train.seed = 1
    assert stages.check_resume(config.to_dict(saved_cfg), cfg, 8)
    assert stages.resume_entry(config.to_dict(saved_cfg), cfg, STEPS + 3, True) == {
        "step": STEPS + 3, "stage": "resumed", "changes": {"train.seed": [0, 1]}, "data": "restarted"}  # fmt: skip


def test_the_restore_plan_prefers_the_workdir_then_init_from_then_a_new_state(stage1, tmp_path):
    """One decision, from the workdir's checkpoints and the config, made before the data iterator exists."""
    cfg = tiny(init_from=stage1)
    new = checkpoint.Checkpointer(str(tmp_path / "new"), cfg)
    assert restore.plan(cfg, new) == restore.Plan(resume=False, restart_data=False, data_shards=None, init_from=stage1)
    assert restore.plan(tiny(), new).init_from is None
    new.close()
    shutil.copytree(stage1, tmp_path / "old")
    old = checkpoint.Checkpointer(str(tmp_path / "old"), cfg)
    same = restore.plan(tiny(train__seq_len=2 * SEQ), old)  # the stream continues: its shards are kept
    assert same.resume and not same.restart_data and same.data_shards == old.data_shards() is not None
    other = restore.plan(tiny(train__seed=7), old)  # another stream starts at its beginning, in this run's shards
    assert other.resume and other.restart_data and other.data_shards is None
    old.close()


def test_data_stream_continues_at_the_next_token_when_seq_len_doubles():
    """Stage 1 reads 3 batches of 24 tokens, stage 2 restores its state and reads 2 of 48: each
    row (data shard) is the same token stream an uninterrupted reader sees, no token lost or
    repeated (concat packing fills every row, so a row's inputs laid end to end are the stream)."""
    short, long = tiny(), tiny(train__seq_len=2 * SEQ)
    it = data.make_iterator(short, "train")
    first = [next(it) for _ in range(3)]
    resumed = data.make_iterator(long, "train")
    resumed.set_state(it.get_state())
    second = [next(resumed) for _ in range(2)]
    reference = data.make_iterator(tiny(train__seq_len=7 * SEQ), "train")  # one long row = 3 x 24 + 2 x 48
    want_BT = next(reference)["inputs"]
    got_BT = np.concatenate([b["inputs"] for b in first + second], axis=1)
    np.testing.assert_array_equal(got_BT, want_BT)


@pytest.mark.parametrize(
    "change, field",
    [
        (dict(model__d_model=56, model__head_dim=14), "model.d_model"),
        (dict(model__no_rope_layers=(1, 1)), "model.no_rope_layers"),
        (dict(optim__clip_norm=0.0), "optim.clip_norm"),
        # 8 saved data shards cannot fill 4 rows
        (dict(train__global_batch_size=4, mesh__data=4, mesh__tensor=2), "train.global_batch_size"),
    ],
)
def test_refused_changes_on_resume_name_the_field_and_keep_the_checkpoint(stage1, tmp_path, change, field):
    workdir = str(tmp_path / "copy")
    shutil.copytree(stage1, workdir)
    with pytest.raises(ConfigError) as err:
        train.run(tiny(train__steps=STEPS + 2, **change), workdir, progress=False)
    assert err.value.field == field
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == sorted(
        os.listdir(os.path.join(stage1, "checkpoints"))
    )  # nothing was set aside as damaged


def test_bad_init_from_input_is_a_clear_error(stage1, tmp_path):
    def error(**changes):
        with pytest.raises(ConfigError) as err:
            train.run(tiny(**changes), str(tmp_path / "new"), progress=False)
        return err.value

    e = error(init_from=str(tmp_path / "nowhere"))
    assert e.field == "init_from" and "does not exist" in e.problem
    os.makedirs(tmp_path / "empty")
    assert error(init_from=str(tmp_path / "empty")).field == "init_from"
    assert error(init_from=stage1, model__d_ff=96).field == "model.d_ff"
    # optimizer state asked for but the source's does not fit (trained with clip_norm > 0)
    e = error(init_from=stage1, init_from_optimizer=True, optim__clip_norm=0.0)
    assert e.field == "init_from_optimizer" and "structure" in e.problem
    assert error(init_from=stage1, init_from_schedule="continue", train__steps=STEPS).field == "train.steps"
    with pytest.raises(ConfigError) as err:
        tiny(init_from_optimizer=True)
    assert err.value.field == "init_from_optimizer"
    with pytest.raises(ConfigError) as err:
        tiny(init_from=stage1, init_from_schedule="keep")
    assert err.value.field == "init_from_schedule"


def test_init_from_a_checkpoint_without_optimizer_state(stage1, tmp_path):
    """A source holding params only (what a converted checkpoint may hold): params can start a run,
    asking for its optimizer state is an error naming init_from_optimizer."""
    source = str(tmp_path / "params_only")
    cfg = tiny()
    state = train.init_state(train.setup(cfg, jax.devices()[:1]))
    ckpt = checkpoint.Checkpointer(source, cfg)
    ckpt.save(2, {k: state[k] for k in ("step", "rng", "params")}, force=True)
    ckpt.close()
    s = train.setup(tiny(init_from=source, init_from_optimizer=True), jax.devices()[:1])
    with pytest.raises(ConfigError) as err:
        train.state_from(s, source, 2)
    assert err.value.field == "init_from_optimizer" and "no optimizer state" in err.value.problem
    fresh, _ = train.state_from(train.setup(tiny(init_from=source), jax.devices()[:1]), source, 2)
    np.testing.assert_array_equal(np.asarray(fresh["params"]["embed"]), np.asarray(state["params"]["embed"]))


def test_schedule_step_moves_only_the_schedule_count():
    cfg = tiny()
    tx = optimizer.make(cfg)
    params = {"w": np.ones((3, 5), np.float32)}
    moved = optimizer.with_schedule_step(tx.init(params), 7)
    count, _, _, sched = adam(moved)
    assert (count, sched) == (0, 7)


def test_eval_length_on_a_sharded_mesh_equals_one_device(stage1, tmp_path):
    """fsdp 8, and data x fsdp x tensor (params sharded, rows spread over the data axes) vs 1 device."""
    lengths = [40]  # past the training length, windows 0..39
    one = eval_length.evaluate([stage1], lengths, batches=1, progress=False, devices=jax.devices()[:1],
                               out_dir=str(tmp_path / "one"))["results"][0]  # fmt: skip
    meshes = (["mesh.data=1", "mesh.fsdp=8"], ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"],
              ["mesh.data=2", "mesh.context=4"])  # the last: each row in zig-zag chunks over 4 devices # fmt: skip
    for mesh in meshes:
        sharded = eval_length.evaluate([stage1], lengths, batches=1, progress=False, mesh_overrides=mesh,
                                       out_dir=str(tmp_path / "sharded"))["results"][0]  # fmt: skip
        for length in lengths:
            np.testing.assert_allclose(sharded.loss_sum[length], one.loss_sum[length], rtol=1e-5)
            np.testing.assert_array_equal(sharded.count[length], one.count[length])
    # a batch whose rows do not fill the data axes is padded, and the padding dropped
    cfg = eval_length.mesh_config(checkpoint.read_config(stage1, STEPS), ["mesh.data=1", "mesh.fsdp=8"])
    batch = next(eval_length.text_windows(cfg, SEQ, 5))
    loss_BS, correct_BS = eval_length.stats_fn(stage1, STEPS, cfg)(batch)
    cfg.mesh.fsdp = 1
    want_loss_BS, want_correct_BS = eval_length.stats_fn(stage1, STEPS, cfg, jax.devices()[:1])(batch)
    assert loss_BS.shape == (5, SEQ)
    np.testing.assert_allclose(loss_BS, want_loss_BS, rtol=1e-5)
    np.testing.assert_array_equal(correct_BS, want_correct_BS)
    with pytest.raises(ConfigError) as err:
        eval_length.evaluate([stage1], lengths, progress=False, mesh_overrides=["train.seq_len=8"])
    assert err.value.field == "train.seq_len"
    with pytest.raises(ConfigError) as err:  # a window the zig-zag cannot cut in 2 x context chunks
        eval_length.evaluate([stage1], [36], progress=False, mesh_overrides=["mesh.data=2", "mesh.context=4"])
    assert err.value.field == "--lengths"


def test_staged_configs_validate():
    long = validation.validate(load("tiny_long"))
    assert long.train.seq_len == 2 * load("tiny").train.seq_len and long.init_from
    big = validation.validate(load("smollm3_3b_long"))
    assert (big.train.seq_len, big.model.rope_theta, big.init_from_optimizer, big.mesh.context) == (32768, 2e6, True, 4)
    assert big.train.global_batch_size * big.train.seq_len == 72 * 32768  # 2.36M tokens per step, as SmolLM3
