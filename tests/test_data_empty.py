"""Data with no text fails in one line, quickly, and no loop spins on empty documents."""

import json
import os
import pathlib
import subprocess
import sys
import threading

import grain
import numpy as np
import pytest

from nopejax.config import ConfigError, base_config
from nopejax.data import make_iterator
from nopejax.data.packing import PackedBatchIterDataset
from nopejax.data.pipeline import EpochShuffle, _max_empty_run
from nopejax.validation import validate

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("content", ["", "\n\n   \n\t\n"], ids=["empty", "blank-lines"])
def test_train_on_a_file_without_text_fails_in_one_line(tmp_path, content):
    path = tmp_path / "corpus.txt"
    path.write_text(content)
    env = {**os.environ, "XLA_FLAGS": os.environ["NOPEJAX_TEST_XLA_FLAGS"], "JAX_PLATFORMS": "cpu"}
    cmd = [sys.executable, "-m", "nopejax.cli", "train", "--config", "configs/tiny.py", "--no-progress",
           "--workdir", str(tmp_path / "run"), "--config.data.source=text", f"--config.data.path={path}"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "`data.path`" in lines[0] and str(path) in lines[0] and "Fix: point data.path at files with text" in lines[0]


def next_within(it, seconds=60):
    """next(it) on a watchdog thread: a spinning iterator fails the test instead of hanging it."""
    out = {}

    def read():
        try:
            out["batch"] = next(it)
        except Exception as e:  # handed to the test
            out["error"] = e

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"next() did not return in {seconds} s: the iterator spins"
    return out


def documents(texts):
    """An endless stream of tokenized documents, as the pipeline feeds the packer."""
    tokens = [np.frombuffer(t.encode(), np.uint8).astype(np.int32) for t in texts]
    ds = grain.MapDataset.range(len(tokens)).repeat(None).map_with_index(EpochShuffle(np.arange(len(tokens)), 0, 0, 0))
    return ds.map(lambda i: {"tokens": tokens[i]}).to_iter_dataset()


def test_packer_fed_only_empty_documents_raises():
    it = iter(PackedBatchIterDataset(documents([""] * 5), 2, 16, 0, max_empty_run=_max_empty_run([5], None)))
    error = next_within(it)["error"]
    assert isinstance(error, ConfigError) and error.field == "data.path" and "empty documents in a row" in str(error)
    assert it.stats["empty_documents"] == 11  # 2 x 5 + 1: bounded, not spinning


@pytest.mark.parametrize("n", [2, 5, 9])
def test_packer_bound_never_fires_while_one_document_has_text(n):
    """One text among n - 1 empty documents, reshuffled every epoch: the longest run of empty
    ones (at worst the text first in one epoch and last in the next: 2n - 2) stays under the bound."""
    shuffle = EpochShuffle(np.arange(n), 0, 0, 0)
    order = np.array([shuffle.map_with_index(i, None) for i in range(3000 * n)])
    longest = np.diff(np.flatnonzero(order == n - 1)).max() - 1
    assert 2 * n - 2 >= longest >= n - 1 and longest < _max_empty_run([n], None)
    texts = [""] * (n - 1) + ["x"]
    it = iter(PackedBatchIterDataset(documents(texts), 1, 3, 0, max_empty_run=_max_empty_run([n], None)))
    for _ in range(30):
        next(it)
    assert it.stats["documents"] >= 30


def test_mixture_bound_covers_a_whole_epoch_of_every_component():
    # weights 1 : 9: component 0 (3 documents) is drawn once in 10; 2 x 3 + 1 draws of it take <= 71
    assert _max_empty_run([3, 4], [1.0, 9.0]) >= 70 + 10


def test_data_shard_with_only_empty_documents_raises(tmp_path):
    path = tmp_path / "c.jsonl"
    with open(path, "w") as f:  # odd documents empty: data shard 1 of 2 gets nothing but those
        for i in range(12):
            f.write(json.dumps({"text": "" if i % 2 else f"document {i}"}) + "\n")
    cfg = base_config()
    cfg.data.update(source="jsonl", path=str(path), eval_fraction=0.0, shuffle=False, num_shards=2)
    cfg.train.update(global_batch_size=2, seq_len=16, eval_every=0)
    error = next_within(make_iterator(validate(cfg), "train"))["error"]
    assert isinstance(error, ConfigError) and "data shard 1 of 2" in str(error)
