"""Passkey retrieval: the synthetic source, and `eval-length` at rows longer than training's."""

import csv
import re

import numpy as np
import pytest

from nopejax import checkpoint, cli, config, data, eval_length, train, validation
from nopejax.config import ConfigError
from nopejax.data.synthetic import PASSKEY_DIGITS, PASSKEY_MIN_LEN, TaskExample, needle_start
from nopejax.data.tokenizer import BYTE_BOS, BYTE_EOS

TRAIN_LEN = 97  # odd on purpose


def passkey_cfg(seq_len=TRAIN_LEN, batch=8):
    cfg = config.base_config()
    cfg.model.update(d_model=48, num_layers=2, num_heads=3, num_kv_heads=1, head_dim=16, d_ff=80)
    cfg.model.update(dtype="float32", no_rope_layers=(1, 0))
    cfg.train.update(steps=3, global_batch_size=batch, seq_len=seq_len, log_every=1, eval_every=0)
    cfg.optim.update(warmup_steps=1, decay_steps=1)
    cfg.checkpoint.async_save = False
    cfg.data.source = "passkey"
    return validation.validate(cfg)


def text(row) -> str:
    return bytes(int(t) for t in row if t < 256).decode()


def test_rows_are_deterministic_by_seed_and_index():
    make = TaskExample("passkey", 3, "train", TRAIN_LEN, TRAIN_LEN, TRAIN_LEN)
    a, b = make.map(11), TaskExample("passkey", 3, "train", TRAIN_LEN, TRAIN_LEN, TRAIN_LEN).map(11)
    for k in data.BATCH_KEYS:
        np.testing.assert_array_equal(a[k], b[k])
    others = [make.map(12), TaskExample("passkey", 4, "train", TRAIN_LEN, TRAIN_LEN, TRAIN_LEN).map(11),
              TaskExample("passkey", 3, "eval", TRAIN_LEN, TRAIN_LEN, TRAIN_LEN).map(11)]  # fmt: skip
    assert all(not np.array_equal(o["inputs"], a["inputs"]) for o in others)
    # the pipeline's batches are these rows, by global index
    it = data.make_iterator(passkey_cfg(), "train", process_index=0, process_count=1)
    batch = next(it)
    np.testing.assert_array_equal(
        batch["inputs"][0], TaskExample("passkey", 0, "train", *[TRAIN_LEN] * 3).map(0)["inputs"]
    )


@pytest.mark.parametrize("length", [PASSKEY_MIN_LEN, TRAIN_LEN, 389])
@pytest.mark.parametrize("depth", [0.0, 0.3, 1.0, None])
def test_key_is_where_the_row_says_and_the_mask_covers_exactly_it(length, depth):
    row = TaskExample("passkey", 0, "eval", length, length, length, depth).map(5)
    inputs, targets, mask = row["inputs"], row["targets"], row["loss_mask"] > 0
    assert len(inputs) == length and inputs[0] == BYTE_BOS and inputs[-1] == BYTE_EOS
    assert (row["segment_ids"] == 1).all() and (row["positions"] == np.arange(length)).all()
    s = text(inputs)
    # an independent reading of the text: the needle, the question, and digits nowhere else
    needle = re.search(r"The pass key is (\d+)\. Remember it\.", s)
    assert needle and s.endswith("What is the pass key? The pass key is " + needle.group(1))
    key = needle.group(1)
    assert len(key) == PASSKEY_DIGITS and len(re.findall(r"\d", s)) == 2 * PASSKEY_DIGITS
    if depth is not None:
        start = needle_start(length, depth)
        assert text(inputs[start : start + PASSKEY_DIGITS]) == key
        assert start == 1 + s.index(" The pass key is ") + len(" The pass key is ")  # s drops BOS: + 1
    # the mask: exactly the key digits at the end, as targets
    assert mask.sum() == PASSKEY_DIGITS and text(targets[mask]) == key
    np.testing.assert_array_equal(np.flatnonzero(mask), np.arange(length - 2 - PASSKEY_DIGITS, length - 2))


def test_depth_moves_the_needle_front_to_back():
    starts = [needle_start(400, d) for d in (0.0, 0.5, 1.0)]
    assert starts[0] == 1 + len(" The pass key is ") and starts[0] < starts[1] < starts[2]
    row = TaskExample("passkey", 0, "eval", 400, 400, 400, 1.0).map(0)
    assert text(row["inputs"]).index("Remember it. ") + len("Remember it. ") == text(row["inputs"]).index(
        " What is the pass key?"
    )  # depth 1: the needle sits right before the question


def test_too_short_rows_are_config_errors():
    with pytest.raises(ConfigError, match=r"train\.seq_len"):
        data.make_iterator(passkey_cfg(seq_len=PASSKEY_MIN_LEN - 1), "train", process_index=0, process_count=1)


def test_eval_length_scores_rows_longer_than_training(tmp_path, capsys):
    workdir = str(tmp_path / "passkey_run")
    train.run(passkey_cfg(), workdir, progress=False)
    lengths = [TRAIN_LEN, 2 * TRAIN_LEN]
    assert (
        cli.main(["eval-length", "--workdir", workdir, "--lengths", ",".join(map(str, lengths)), "--batches", "1"]) == 0
    )
    with open(f"{workdir}/eval_length/loss_by_position.csv") as f:
        rows = list(csv.DictReader(f))
    cells = [(int(r["length"]), float(r["depth"])) for r in rows]
    assert cells == [(n, d) for n in lengths for d in eval_length.PASSKEY_DEPTHS]
    assert all(r["examples"] == "8" and r["train_length"] == str(TRAIN_LEN) for r in rows)
    # accuracy agrees with the data package's exact match on the same rows, recomputed here
    run_cfg = checkpoint.read_config(*checkpoint.find_checkpoint(workdir))
    batch = eval_length.passkey_batch(run_cfg, 2 * TRAIN_LEN, 2, 8)
    assert batch["inputs"].shape == (8, 2 * TRAIN_LEN)
    module = checkpoint.load_model(workdir)
    want = float(np.mean(np.asarray(data.exact_match(module(batch["inputs"]), batch))))
    got = next(r for r in rows if int(r["length"]) == 2 * TRAIN_LEN and float(r["depth"]) == 0.5)
    assert float(got["accuracy"]) == pytest.approx(want)
    assert "By needle depth" in capsys.readouterr().out
    assert cli.main(["eval-length", "--workdir", workdir, "--lengths", "20"]) == 2  # shorter than any passkey row
    assert "--lengths" in capsys.readouterr().err
