"""Quiet, honest output: a quick train and an export print nothing to stderr on this machine
(no TPU-runtime probing without a TPU, no orbax read-only chatter, no grain noise at exit),
while errors and warnings that matter still get through."""

import logging
import os
import subprocess
import sys

import pytest
from configs_loader import ROOT

from nopejax import quiet

RUN = ["--config", "configs/tiny.py", "--config.model.num_layers=2", "--config.train.steps=2",
       "--config.train.global_batch_size=8", "--config.train.seq_len=32", "--config.train.eval_every=1",
       "--no-progress"]  # fmt: skip


def nopejax(*args):
    env = dict(os.environ)
    if not quiet.accelerator_present():
        env.pop("JAX_PLATFORMS", None)  # as a user runs it: JAX would probe libtpu (the tpu extra)
    return subprocess.run([sys.executable, "-m", "nopejax.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)  # fmt: skip


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    wd = tmp_path_factory.mktemp("quiet")
    proc = nopejax("train", "--workdir", str(wd / "run"), *RUN)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return wd, proc


def test_train_and_export_write_nothing_to_stderr(run):
    wd, train = run
    assert train.stderr == ""
    assert "finished step 2" in train.stdout
    export = nopejax("export", "--workdir", str(wd / "run"), "--out", str(wd / "hf"))
    assert export.returncode == 0 and export.stderr == "", export.stderr[-3000:]


def test_errors_still_reach_stderr(run):
    wd, _ = run
    proc = nopejax("export", "--workdir", str(wd / "run"), "--step", "7", "--out", str(wd / "other"))
    assert proc.returncode != 0 and proc.stderr.strip()


def test_only_the_known_benign_absl_messages_are_dropped(caplog):
    quiet.setup()
    absl = logging.getLogger("absl")
    with caplog.at_level(logging.WARNING, logger="absl"):
        absl.warning("CheckpointManagerOptions.read_only=True, setting save_interval_steps=0.")
        absl.warning("Given directory is read only=/some/run/checkpoints")
        absl.warning("Checkpoint at step 3 is corrupt")
    assert [r.getMessage() for r in caplog.records] == ["Checkpoint at step 3 is corrupt"]
