"""Faults inside one process: non-finite losses are skipped, counted and stop the run; a save
that fails stops the run with one line and leaves the earlier checkpoints readable; a step that
never finishes cannot keep a stopping process alive.

NaNs and hung steps are injected through `train.loss_fault`, a hook the step calls at trace time
(production leaves it returning None); the reference for a skipped step is a run that never saw
its batch.
"""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_train import ROOT, nopejax, random_batches, small_cfg

from nopejax import checkpoint, train, validation
from nopejax.config import ConfigError, RunError


def nan_at(steps):
    """A `train.loss_fault` making the loss (and so every gradient) NaN at these state steps."""
    return lambda step: jnp.where(jnp.isin(step, jnp.asarray(steps)), jnp.nan, 1.0)


def run_batches(cfg, batches):
    s = train.setup(cfg, jax.devices()[:1])
    state = train.init_state(s)
    step_fn, _ = train.compile_fns(s)
    outs, params = [], []
    with jax.set_mesh(s.mesh):
        for b in batches:
            state, out = step_fn(state, {k: jax.device_put(v, s.batch_sharding) for k, v in b.items()})
            outs.append({k: float(v) for k, v in out.items()})
            params.append(jax.tree.map(np.asarray, state["params"]))
    return outs, params, state


@pytest.mark.parametrize("value", [0, -1])
def test_max_nonfinite_steps_must_be_a_positive_integer(value):
    cfg = small_cfg()
    cfg.train.max_nonfinite_steps = value
    with pytest.raises(ConfigError) as err:
        validation.validate(cfg)
    assert err.value.field == "train.max_nonfinite_steps"


def test_a_nan_step_applies_no_update_and_is_counted(monkeypatch):
    cfg = small_cfg()
    cfg.model.num_layers = 2  # the skip is in the update, not the layers: one scanned run compiles fastest
    cfg.optim.warmup_steps = 8  # the rate moves every step: lr = 1e-2 * count / 8
    batches = random_batches(cfg, 5, seed=3)
    monkeypatch.setattr(train, "loss_fault", nan_at([2]))
    outs, params, state = run_batches(cfg, batches)
    assert [o["nonfinite"] for o in outs] == [0, 0, 1, 0, 0]
    assert np.isnan(outs[2]["loss"]) and np.isnan(outs[2]["grad_norm"])
    jax.tree.map(np.testing.assert_array_equal, params[2], params[1])  # the NaN step changed nothing
    assert int(state["step"]) == 5  # its batch was consumed all the same
    # the logged rate is the applied one: the skipped step did not advance the schedule
    np.testing.assert_allclose([o["lr"] for o in outs], [1e-2 * c / 8 for c in (0, 1, 2, 2, 3)], rtol=1e-6)

    # independent reference: a clean run that never saw batch 2 ends with the same params
    monkeypatch.setattr(train, "loss_fault", lambda step: None)
    ref_outs, ref_params, _ = run_batches(cfg, batches[:2] + batches[3:])
    np.testing.assert_allclose([o["loss"] for o in outs[:2] + outs[3:]], [o["loss"] for o in ref_outs], rtol=1e-6)
    assert [o["lr"] for o in outs[:2] + outs[3:]] == [o["lr"] for o in ref_outs]
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), params[-1], ref_params[-1])
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))


def test_consecutive_nan_steps_stop_the_run_and_nothing_non_finite_is_saved(tmp_path, monkeypatch):
    cfg = small_cfg(data=-1)
    cfg.model.num_layers = 2
    cfg.train.update(steps=12, log_every=1, eval_every=0, max_nonfinite_steps=3)
    cfg.optim.update(warmup_steps=2, decay_steps=2)
    cfg.checkpoint.every_steps = 2
    # state steps 3 and 5..7 are non-finite (done = 4, 6, 7, 8): one isolated, then three in a row
    monkeypatch.setattr(train, "loss_fault", nan_at([3, 5, 6, 7]))
    with pytest.raises(RunError) as err:
        train.run(cfg, str(tmp_path), progress=False)
    message = str(err.value)
    assert "3 consecutive steps up to step 8" in message and "train.max_nonfinite_steps=3" in message
    assert "step 6, is the last good state" in message

    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    flags = {r["step"]: r["nonfinite_steps"] for r in records}
    assert flags == {1: 0, 2: 0, 3: 0, 4: 1, 5: 0, 6: 1, 7: 1, 8: 1}
    assert all(np.isnan(r["loss"]) == bool(r["nonfinite_steps"]) for r in records)
    # the save at step 8 was refused; what was saved (including step 4, after its skipped update) is finite
    ckpt = checkpoint.Checkpointer(str(tmp_path), cfg)
    assert ckpt.steps() == [2, 4, 6]
    ckpt.close()
    for step in (4, 6):
        params = checkpoint.restore_params(str(tmp_path), step)
        assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))


RUN = ["--config", "configs/tiny.py", "--config.model.num_layers=2", "--config.train.global_batch_size=8",
       "--config.train.seq_len=32", "--config.train.log_every=1", "--config.train.eval_every=0",
       "--config.optim.warmup_steps=1", "--config.optim.decay_steps=1", "--config.checkpoint.every_steps=3",
       "--config.checkpoint.keep=1", "--no-progress"]  # fmt: skip


def read_only(directory):
    """Make `directory` unwritable: by its mode, or, for root (which ignores modes), by a
    read-only bind mount. -> the command that undoes it."""
    if os.geteuid() != 0:
        os.chmod(directory, 0o555)
        return ["chmod", "755", str(directory)]
    for cmd in (["mount", "--bind", directory, directory], ["mount", "-o", "remount,bind,ro", directory]):
        if subprocess.run(cmd, capture_output=True).returncode:
            pytest.skip("root without mount rights: cannot make a directory read-only here")
    return ["umount", str(directory)]


def test_a_read_only_checkpoint_dir_stops_the_run_with_one_line(tmp_path):
    nopejax("train", "--workdir", str(tmp_path), *RUN, "--config.train.steps=3", timeout=300)
    ckpts = tmp_path / "checkpoints"
    undo = read_only(ckpts)
    try:
        proc = nopejax("train", "--workdir", str(tmp_path), *RUN, "--config.train.steps=6", check=False, timeout=300)
    finally:
        subprocess.run(undo, check=True)
    assert proc.returncode == 1, proc.stderr[-3000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("nopejax train: error: saving checkpoint step 6 to ") and str(ckpts) in line, line
    assert "Read-only file system" in line or "Permission denied" in line, line
    assert "checkpoints [3] are intact" in line and "Traceback" not in proc.stderr
    # training got there (steps 4-6 logged) and the earlier checkpoint still restores
    assert max(json.loads(r)["step"] for r in (tmp_path / "metrics.jsonl").read_text().splitlines()) == 6
    assert sorted(os.listdir(ckpts)) == ["3"]
    assert checkpoint.find_checkpoint(str(tmp_path)) == (str(tmp_path), 3)
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(checkpoint.restore_params(str(tmp_path), 3)))


def test_a_full_disk_stops_the_save_with_the_os_reason(tmp_path):
    """ENOSPC in the background write: the error names it, the step before stays readable."""
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a small tmpfs")
    cfg = small_cfg()
    s = train.setup(cfg, jax.devices()[:1])
    state = train.init_state(s)
    probe = checkpoint.Checkpointer(str(tmp_path / "probe"), cfg)
    probe.save(1, state, force=True)
    probe.close()
    size = sum(p.stat().st_size for p in (tmp_path / "probe" / "checkpoints" / "1").rglob("*") if p.is_file())
    ckpts = tmp_path / "run" / "checkpoints"
    ckpts.mkdir(parents=True)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size * 3 // 2}", "tmpfs", ckpts]).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        ckpt = checkpoint.Checkpointer(str(tmp_path / "run"), cfg)
        ckpt.save(1, state, force=True)
        ckpt.wait()
        with pytest.raises(RunError) as err:  # room for one checkpoint and a half
            ckpt.save(2, state, force=True)
            ckpt.close()
        assert f"saving checkpoint step 2 to {ckpts} failed" in str(err.value)
        assert "No space left on device" in str(err.value) and "checkpoints [1] are intact" in str(err.value)
        assert [n for n in os.listdir(ckpts) if n.isdigit()] == ["1"]
        restored = checkpoint.restore_params(str(tmp_path / "run"), 1)
        jax.tree.map(np.testing.assert_array_equal, restored, jax.tree.map(np.asarray, state["params"]))
    finally:
        subprocess.run(["umount", ckpts], check=True)


# `nopejax train` whose step at state step 4 (step 5 in metrics.jsonl) never finishes, as on a hung
# collective: its host callback blocks, and the main thread waits for the step for ever. The callback
# leaves DIR/hanging when it starts, so a test signals only once the process is past any step boundary.
HANGING_STEP = """
import os, sys, threading
import jax, jax.numpy as jnp, numpy as np
from nopejax import cli, train

def factor(step):
    if step >= 4:
        open(os.path.join(sys.argv[sys.argv.index("--workdir") + 1], "hanging"), "w").close()
        threading.Event().wait()
    return np.float32(1.0)

train.loss_fault = lambda step: jax.pure_callback(factor, jax.ShapeDtypeStruct((), jnp.float32), step)
sys.exit(cli.main(sys.argv[1:]))
"""


def start_hanging(workdir, *extra):
    """The hanging trainer, once it hangs with step 3 checkpointed."""
    env = {**os.environ, "XLA_FLAGS": os.environ["NOPEJAX_TEST_XLA_FLAGS"], "JAX_PLATFORMS": "cpu"}
    proc = subprocess.Popen([sys.executable, "-c", HANGING_STEP, "train", "--workdir", str(workdir), *RUN,
                             "--config.train.steps=10", *extra], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    t0 = time.time()
    while not ((workdir / "hanging").exists() and (workdir / "checkpoints" / "3").is_dir()):
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() - t0 < 300, "the step did not start hanging"
        time.sleep(0.05)
    return proc


def test_a_step_that_never_finishes_ends_the_stop_after_the_grace_period(tmp_path):
    proc = start_hanging(tmp_path, "--config.train.stop_grace_seconds=3")
    try:
        t0 = time.time()
        proc.send_signal(signal.SIGTERM)
        err = proc.communicate(timeout=60)[1]
        waited = time.time() - t0
    finally:
        proc.kill()
    assert proc.returncode == 1 and 3 <= waited < 30, (proc.returncode, waited, err[-3000:])
    assert err.splitlines() == [
        "nopejax train: error: the step in progress did not finish within 3 s of SIGTERM; stopped without saving, "
        f"the newest complete checkpoint is step 3 ({tmp_path}/checkpoints/3). If it only needs longer, raise "
        "train.stop_grace_seconds"
    ]


def test_a_second_ctrl_c_stops_at_once(tmp_path):
    proc = start_hanging(tmp_path)  # the grace period is 10 minutes
    try:
        proc.send_signal(signal.SIGINT)
        time.sleep(1)  # the first is taken as "stop after this step", which never comes
        assert proc.poll() is None
        t0 = time.time()
        proc.send_signal(signal.SIGINT)
        err = proc.communicate(timeout=60)[1]
        waited = time.time() - t0
    finally:
        proc.kill()
    assert proc.returncode == 130 and waited < 10, (proc.returncode, waited, err[-3000:])
    assert err.splitlines() == [
        "nopejax train: interrupted: stopping after this step with a checkpoint; Ctrl-C again stops at once, "
        "without one",
        "nopejax train: interrupted again: stopped at once, without saving; the newest complete checkpoint is "
        f"step 3 ({tmp_path}/checkpoints/3)",
    ]
