"""Checkpoints: kill -9 and SIGTERM resume bit-exactly, Ctrl-C saves, one trainer per workdir,
restore onto other meshes, damaged files set aside and other read errors not, layout mismatches,
and export to transformers from a checkpoint."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from test_train import ROOT, nopejax, random_batches, small_cfg

from nopejax import checkpoint, checkpoint_faults, cli, train
from nopejax.config import ConfigError, RunError

RUN = ["--config", os.path.join(ROOT, "configs", "tiny.py"), "--config.train.steps=24", "--config.train.log_every=1",
       "--config.train.eval_every=0", "--config.checkpoint.every_steps=4", "--config.optim.warmup_steps=4",
       "--config.optim.decay_steps=4", "--config.model.num_layers=3", "--config.train.global_batch_size=8",
       "--config.train.seq_len=64", "--no-progress"]  # fmt: skip


def read_lines(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return f.readlines()


def losses(workdir):
    return {r["step"]: r["loss"] for r in map(json.loads, read_lines(workdir))}


@pytest.fixture(scope="module")
def uninterrupted_run(tmp_path_factory):
    wd = tmp_path_factory.mktemp("full")
    nopejax("train", "--workdir", str(wd), *RUN)
    return wd


@pytest.fixture(scope="module")
def uninterrupted(uninterrupted_run):
    return losses(uninterrupted_run)


def start(workdir, *extra):
    env = {**os.environ, "XLA_FLAGS": os.environ["NOPEJAX_TEST_XLA_FLAGS"], "JAX_PLATFORMS": "cpu"}
    return subprocess.Popen([sys.executable, "-m", "nopejax.cli", "train", "--workdir", str(workdir), *RUN, *extra],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip


def wait_for_step(workdir, step, proc, timeout=300):
    t0 = time.time()
    while time.time() - t0 < timeout:
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        if os.path.exists(os.path.join(workdir, "metrics.jsonl")) and any(
            json.loads(line)["step"] >= step for line in read_lines(workdir) if line.strip()
        ):
            return
        time.sleep(0.05)
    raise TimeoutError(f"step {step} not reached")


def test_kill_9_then_resume_gives_the_uninterrupted_trace(tmp_path, uninterrupted):
    proc = start(tmp_path)
    wait_for_step(tmp_path, 11, proc)  # past the second checkpoint (steps 4 and 8)
    proc.kill()
    proc.wait()
    killed_at = max(losses(tmp_path))
    assert 11 <= killed_at < 24
    nopejax("train", "--workdir", str(tmp_path), *RUN)
    assert losses(tmp_path) == uninterrupted  # bit for bit, every step


def test_sigterm_saves_exits_0_and_resumes_exactly(tmp_path, uninterrupted):
    proc = start(tmp_path)
    wait_for_step(tmp_path, 6, proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    assert "stopped by SIGTERM" in out
    stopped = int(out.split("stopped by SIGTERM at step ")[1].split()[0])
    assert stopped < 24 and stopped in checkpoint.Checkpointer(str(tmp_path), small_cfg()).steps()
    # resumed with evaluation every 5 steps, which 24 is not a multiple of: the end is evaluated too
    proc = nopejax("train", "--workdir", str(tmp_path), *RUN, "--config.train.eval_every=5")
    assert f"resuming from step {stopped} ({tmp_path}/checkpoints/{stopped})" in proc.stdout
    assert losses(tmp_path) == uninterrupted  # evaluating changes nothing in training
    last = json.loads(read_lines(tmp_path)[-1])
    assert last["step"] == 24 and "eval_loss" in last
    summary = next(line for line in proc.stdout.splitlines() if line.startswith("finished step 24 "))
    assert summary.endswith(f"eval loss {last['eval_loss']:.4f}"), summary


def test_ctrl_c_saves_and_a_second_trainer_is_refused_until_the_first_exits(tmp_path):
    proc = start(tmp_path, "--config.train.steps=100000")  # runs until stopped
    try:
        wait_for_step(tmp_path, 1, proc)
        second = nopejax("train", "--workdir", str(tmp_path), *RUN, check=False, timeout=300)
        assert proc.poll() is None  # the first went on training
        assert second.returncode == 1 and len(second.stderr.strip().splitlines()) == 1, second.stderr[-3000:]
        assert f"train.lock is locked by pid {proc.pid} on host {socket.gethostname()}" in second.stderr
        wait_for_step(tmp_path, 5, proc)
        proc.send_signal(signal.SIGINT)  # Ctrl-C: as SIGTERM, then the shell's exit code for an interrupt
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, err[-3000:]
    assert err.strip().splitlines() == ["nopejax train: interrupted: stopping after this step with a checkpoint; "
                                        "Ctrl-C again stops at once, without one"]  # fmt: skip
    stopped = int(out.split("stopped by SIGINT at step ")[1].split()[0])
    assert stopped in checkpoint.Checkpointer(str(tmp_path), small_cfg()).steps() and max(losses(tmp_path)) == stopped
    # the lock went with the first trainer: a third runs, and finds its work done
    third = nopejax("train", "--workdir", str(tmp_path), *RUN, f"--config.train.steps={stopped}", timeout=300)
    assert f"already at step {stopped} of {stopped}: nothing to do" in third.stdout and "finished" not in third.stdout


def mesh_cfg(**mesh):
    """small_cfg at 2 layers: the restore plan is per array, so depth adds compile time and nothing else."""
    cfg = small_cfg(**mesh)
    cfg.model.num_layers = 2
    return cfg


@pytest.mark.slow  # one train-step compile per mesh
def test_restore_on_other_meshes_continues_identically(tmp_path):
    cfg = mesh_cfg(data=1, fsdp=8)
    batches = random_batches(cfg, 5, seed=5)
    s8 = train.setup(cfg, jax.devices())
    step8, _ = train.compile_fns(s8)
    state = train.init_state(s8)
    with jax.set_mesh(s8.mesh):
        for b in batches[:3]:
            state, _ = step8(state, {k: jax.device_put(v, s8.batch_sharding) for k, v in b.items()})
    ckpt = checkpoint.Checkpointer(str(tmp_path), cfg)
    ckpt.save(3, state)
    ckpt.close()

    traces = []
    for mesh, devices in ((dict(data=1, fsdp=8), jax.devices()), (dict(data=2, fsdp=2), jax.devices()[:4]),
                          (dict(data=1, fsdp=1), jax.devices()[:1])):  # fmt: skip
        cfg = mesh_cfg(**mesh)
        s = s8 if len(devices) == 8 else train.setup(cfg, devices)  # 8 devices: the step compiled above
        restored, step = checkpoint.Checkpointer(str(tmp_path), cfg).restore_latest(s.abstract_state)
        assert step == 3 and restored["params"]["embed"].sharding == s.state_shardings["params"]["embed"]
        step_fn = step8 if s is s8 else train.compile_fns(s)[0]
        trace = []
        with jax.set_mesh(s.mesh):
            for b in batches[3:]:
                restored, out = step_fn(restored, {k: jax.device_put(v, s.batch_sharding) for k, v in b.items()})
                trace.append(float(out["loss"]))
        traces.append(trace)
    np.testing.assert_allclose(traces[1], traces[0], rtol=1e-5)
    np.testing.assert_allclose(traces[2], traces[0], rtol=1e-5)


def _save_steps(workdir, cfg, steps):
    s = train.setup(cfg, jax.devices()[:1])
    state = train.init_state(s)
    ckpt = checkpoint.Checkpointer(str(workdir), cfg)
    for step in steps:
        ckpt.save(step, state, force=True)
    ckpt.close()
    return s


def damage(step_dir):
    """Truncate the array data and metadata of a checkpoint's state item to a third."""
    data_files = [os.path.join(r, f) for r, _, fs in os.walk(step_dir / "state") for f in fs
                  if os.path.getsize(os.path.join(r, f)) > 1000]  # fmt: skip
    assert data_files
    for path in data_files:
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 3)


def export(workdir, step, capsys):
    """`nopejax export --step` in this process -> (exit code, stderr)."""
    code = cli.main(["export", "--workdir", str(workdir), "--step", str(step), "--out", str(workdir / "hf")])
    return code, capsys.readouterr().err


def test_damaged_checkpoints_are_set_aside_and_named_by_export(tmp_path, caplog, capsys):
    cfg = small_cfg()
    s = _save_steps(tmp_path, cfg, [1, 2, 3])
    damage(tmp_path / "checkpoints" / "2")
    damage(tmp_path / "checkpoints" / "3")
    # found by export first: a clear error naming the nearest step that reads (3 is damaged too)
    code, err = export(tmp_path, 2, capsys)
    assert code == 2 and "checkpoints/2 is unreadable" in err and "use --step 1," in err, err
    assert not (tmp_path / "hf" / "config.json").exists()

    ckpt = checkpoint.Checkpointer(str(tmp_path), cfg)
    with caplog.at_level("WARNING"):
        restored, step = ckpt.restore_latest(s.abstract_state)
    assert step == 1 and restored is not None and ckpt.steps() == [1]
    aside = sorted(n for n in os.listdir(tmp_path / "checkpoints") if ".damaged-" in n)
    assert [n.split(".")[0] for n in aside] == ["2", "3"]
    for name in aside:  # each warning names the step, the folder it was moved to and the step the run continues from
        step = name.split(".")[0]
        assert f"checkpoint step {step}: {tmp_path}/checkpoints/{step} is damaged (JSONDecodeError: " in caplog.text
        assert f"set aside as {tmp_path}/checkpoints/{name}; continuing from step 1" in caplog.text
    # set aside: never restored again, never counted by retention (keep=3), the steps save anew
    for step in (2, 3, 4):
        ckpt.save(step, restored, force=True)
    ckpt.close()
    names = sorted(os.listdir(tmp_path / "checkpoints"))
    assert [n for n in names if n.isdigit()] == ["2", "3", "4"] and all(n in names for n in aside)
    assert checkpoint.find_checkpoint(str(tmp_path)) == (str(tmp_path), 4)
    # a step that is set aside (and not saved again) is an error pointing to the nearest readable one
    shutil.rmtree(tmp_path / "checkpoints" / "3")
    code, err = export(tmp_path, 3, capsys)
    assert code == 2 and f"set aside as checkpoints/{aside[1]}" in err and "use --step 4," in err, err


def test_damaged_newest_checkpoint_is_retrained_exactly(tmp_path, uninterrupted_run, uninterrupted):
    wd = tmp_path / "run"
    shutil.copytree(uninterrupted_run, wd)
    manifest = wd / "checkpoints" / "24" / "state" / "manifest.ocdbt"  # kept: 16, 20, 24
    os.truncate(manifest, os.path.getsize(manifest) // 2)
    proc = nopejax("train", "--workdir", str(wd), *RUN)
    # one line, not the tracebacks of orbax's abandoned reads: the step, what is wrong, where it went, what next
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr[-4000:]
    (line,) = lines
    assert line.startswith(f"WARNING nopejax: checkpoint step 24: {wd}/checkpoints/24 is damaged (ValueError: "
                           "DATA_LOSS: ") and "manifest.ocdbt" in line, line  # fmt: skip
    assert f"; set aside as {wd}/checkpoints/24.damaged-" in line and line.endswith("; continuing from step 20")
    assert "resuming from step 20 (" in proc.stdout
    names = sorted(os.listdir(wd / "checkpoints"))
    assert [n for n in names if n.isdigit()] == ["16", "20", "24"]  # retention kept 16
    assert len([n for n in names if n.startswith("24.damaged-")]) == 1
    # steps 21-24 were trained again from step 20: the same losses, line for line, as the undamaged run
    assert len(read_lines(wd)) == 24 and losses(wd) == uninterrupted
    # and the new step 24 restores to the undamaged run's params
    jax.tree.map(np.testing.assert_array_equal, checkpoint.restore_params(str(wd), 24),
                 checkpoint.restore_params(str(uninterrupted_run), 24))  # fmt: skip


@pytest.fixture(scope="module")
def two_steps(tmp_path_factory):
    wd = tmp_path_factory.mktemp("two_steps")
    return wd, _save_steps(wd, small_cfg(), [1, 2])


def failing_state_reads(monkeypatch, ckpt, error, times):
    """Make the first `times` reads of a state item raise `error`. -> the steps they were for."""
    restore, failed = ckpt.manager.restore, []

    def flaky(step, args=None):
        if "state" in args and len(failed) < times:
            failed.append(step)
            raise error
        return restore(step, args=args)

    monkeypatch.setattr(ckpt.manager, "restore", flaky)
    return failed


def wrapped(inner):
    """As orbax raises it: a generic error, from tensorstore's precise one."""
    outer = Exception("Encountered error while reading array index: (slice(0, 384, 1), slice(0, 64, 1)).")
    outer.__cause__ = inner
    return outer


UNAVAILABLE = ValueError('UNAVAILABLE: Error reading "params.embed/0.0" in OCDBT database: Connection reset by peer')


def test_a_transient_read_error_is_retried_and_the_checkpoint_kept(tmp_path, two_steps, monkeypatch, caplog):
    source, s = two_steps
    shutil.copytree(source, tmp_path, dirs_exist_ok=True)
    monkeypatch.setattr(checkpoint_faults, "RETRY_SECONDS", (0.0, 0.0))
    ckpt = checkpoint.Checkpointer(str(tmp_path), small_cfg())
    failed = failing_state_reads(monkeypatch, ckpt, wrapped(UNAVAILABLE), times=2)
    with caplog.at_level("WARNING"):
        restored, step = ckpt.restore_latest(s.abstract_state)
    assert failed == [2, 2] and step == 2 and int(restored["step"]) == 0  # the third read of step 2 worked
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["1", "2"] and ckpt.steps() == [1, 2]
    assert caplog.text.count("reading checkpoint step 2 failed (ValueError: UNAVAILABLE: ") == 2
    ckpt.close()


@pytest.mark.parametrize(
    "error, words",
    [
        (PermissionError(13, "Permission denied", "checkpoints/2/state/manifest.ocdbt"), "make it readable"),
        (wrapped(UNAVAILABLE), "failed 3 times (ValueError: UNAVAILABLE: "),  # transient, and it persists
        (RuntimeError("an error that says nothing about the files"), "nothing in the error shows damage"),
    ],
    ids=["permission", "persisting", "unclassified"],
)
def test_a_read_error_without_evidence_of_damage_stops_and_keeps_the_checkpoint(
    tmp_path, two_steps, monkeypatch, error, words
):
    source, s = two_steps
    shutil.copytree(source, tmp_path, dirs_exist_ok=True)
    monkeypatch.setattr(checkpoint_faults, "RETRY_SECONDS", (0.0, 0.0))
    ckpt = checkpoint.Checkpointer(str(tmp_path), small_cfg())
    failing_state_reads(monkeypatch, ckpt, error, times=100)
    with pytest.raises(RunError) as err:
        ckpt.restore_latest(s.abstract_state)
    assert f"checkpoint step 2 at {tmp_path}/checkpoints/2" in str(err.value) and words in str(err.value)
    assert str(err.value).endswith("the checkpoint was left in place")
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["1", "2"]  # nothing set aside, no silent step back
    ckpt.close()


@pytest.mark.parametrize(
    "change, field",
    [
        (dict(d_model=96, head_dim=24), "model.d_model"),
        (dict(no_rope_layer_interval=2), "model.no_rope_layers"),
        (dict(attention_bias=True), "model.attention_bias"),
        (dict(qk_norm="rms"), "model.qk_norm"),
        (dict(block="post_norm"), "model.block"),
        (dict(norm="layernorm"), "model.norm"),
    ],
)
def test_restore_into_an_incompatible_model_names_the_field(tmp_path, change, field):
    _save_steps(tmp_path, small_cfg(), [1])
    cfg = small_cfg()
    cfg.model.update(change)
    s = train.setup(cfg, jax.devices()[:1])
    with pytest.raises(ConfigError) as err:
        checkpoint.Checkpointer(str(tmp_path), cfg).restore_latest(s.abstract_state)
    assert err.value.field == field


@pytest.mark.slow  # three CLI training processes
def test_export_from_checkpoint_matches_transformers_and_import_round_trips(tmp_path, capsys):
    import torch
    import transformers

    wd, out = tmp_path / "run", tmp_path / "hf"
    nopejax("train", "--workdir", str(wd), *RUN[:-1], "--config.train.steps=8", "--no-progress")
    assert cli.main(["export", "--workdir", str(wd), "--out", str(out)]) == 0
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(out).float().eval()
    assert hf_model.config.no_rope_layers == [1, 1, 1]
    ours = checkpoint.load_model(str(wd))
    tokens = np.random.default_rng(0).integers(0, 259, (2, 40))
    with torch.no_grad():
        theirs = hf_model(torch.tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(np.asarray(ours(jax.numpy.asarray(tokens, jax.numpy.int32))), theirs, atol=1e-4)

    # init_from: a new run starts from these params with a fresh optimizer and step count
    wd_b = tmp_path / "from_a"
    nopejax("train", "--workdir", str(wd_b), *RUN[:-1], "--config.train.steps=8", f"--config.init_from={wd}")
    a, b = losses(wd), losses(wd_b)
    assert sorted(b) == list(range(1, 9)) and b[1] < a[1] - 0.5 and abs(b[1] - a[8]) < 0.3
    capsys.readouterr()
    code = cli.main(["train", "--workdir", str(tmp_path / "bad"), *RUN, f"--config.init_from={wd}",
                     "--config.model.num_layers=4"])  # fmt: skip
    assert code == 2 and "model.num_layers" in capsys.readouterr().err

    # import-hf writes a step-0 checkpoint that training continues from
    wd2 = tmp_path / "imported"
    assert cli.main(["import-hf", str(out), "--workdir", str(wd2), "--config", RUN[1]]) == 0
    back = checkpoint.load_model(str(wd2))
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, _params(back)), _params(ours))
    nopejax("train", "--workdir", str(wd2), *RUN[:-1], "--config.train.steps=8", "--no-progress")
    assert sorted(losses(wd2)) == list(range(1, 9))


def _params(module):
    from nopejax import model

    return model.split(module)[1]
