"""Synthetic copy / reverse / parity tasks and exact-match scoring."""

import json

import numpy as np
import pytest

from nopejax.config import ConfigError, base_config
from nopejax.data import exact_match, make_iterator
from nopejax.data.synthetic import SEP
from nopejax.data.tokenizer import BYTE_BOS, BYTE_EOS
from nopejax.validation import validate


def task_cfg(task, seq_len=89):
    cfg = base_config()
    cfg.data.source = task
    cfg.data.task_train_min_len, cfg.data.task_train_max_len = 1, 7
    cfg.data.task_test_min_len, cfg.data.task_test_max_len = 11, 13
    cfg.train.global_batch_size, cfg.train.seq_len = 6, seq_len
    return validate(cfg)


def parse(row_inputs, row_segments):
    tokens = row_inputs[row_segments > 0].tolist()
    assert tokens[0] == BYTE_BOS and tokens[-1] == BYTE_EOS
    sep = tokens.index(SEP)
    return bytes(tokens[1:sep]).decode(), bytes(tokens[sep + 1 : -1]).decode()


@pytest.mark.parametrize("task", ["copy", "reverse", "parity"])
@pytest.mark.parametrize("split", ["train", "eval"])
def test_examples_are_correct(task, split):
    cfg = task_cfg(task)
    lo, hi = (1, 7) if split == "train" else (11, 13)
    for _ in range(3):
        batch = next(make_iterator(cfg, split, process_index=0, process_count=1))
        for r in range(6):
            x, y = parse(batch["inputs"][r], batch["segment_ids"][r])
            assert lo <= len(x) <= hi
            expected = {"copy": x, "reverse": x[::-1], "parity": str(x.count("1") % 2)}[task]
            assert y == expected
            assert set(x) <= (set("01") if task == "parity" else set("abcdefghijklmnopqrstuvwxyz"))
            # The loss covers exactly the answer: targets under the mask spell y.
            mask = batch["loss_mask"][r] > 0
            assert bytes(batch["targets"][r][mask].tolist()).decode() == y
            n = (batch["segment_ids"][r] > 0).sum()
            np.testing.assert_array_equal(batch["positions"][r][:n], np.arange(n))
            np.testing.assert_array_equal(batch["targets"][r][: n - 1], batch["inputs"][r][1:n])


def test_deterministic_per_seed_resumable_and_sharded():
    cfg = task_cfg("copy")
    a = [next(it) for it in [make_iterator(cfg, process_index=0, process_count=1)] for _ in range(3)]
    it = make_iterator(cfg, process_index=0, process_count=1)
    next(it)
    state = json.loads(json.dumps(it.get_state()))
    fresh = make_iterator(cfg, process_index=0, process_count=1)
    fresh.set_state(state)
    for x, y in zip(a[1:], [next(fresh), next(fresh)]):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
    cfg.train.seed = 5
    assert not np.array_equal(next(make_iterator(cfg, process_index=0, process_count=1))["inputs"], a[0]["inputs"])
    cfg.train.seed = 0
    halves = [next(make_iterator(cfg, process_index=p, process_count=2))["inputs"] for p in range(2)]
    np.testing.assert_array_equal(np.concatenate(halves), a[0]["inputs"])  # the same global batch on 2 processes


def test_exact_match_oracle_and_shifted():
    batch = next(make_iterator(task_cfg("reverse"), "eval", process_index=0, process_count=1))
    targets = batch["targets"]
    assert np.asarray(exact_match(targets, batch)).all()
    logits = np.eye(384, dtype=np.float32)[targets]  # [B, S, V], argmax = targets
    assert np.asarray(exact_match(logits, batch)).mean() == 1.0
    shifted = np.roll(targets, 1, axis=1)  # the answer one position late
    assert np.asarray(exact_match(shifted, batch)).mean() == 0.0
    wrong_one = targets.copy()
    first_answer = np.argmax(batch["loss_mask"][0] > 0)
    wrong_one[0, first_answer] += 1
    assert np.asarray(exact_match(wrong_one, batch)).tolist() == [False] + [True] * 5


def test_seq_len_too_short_is_a_config_error():
    with pytest.raises(ConfigError, match="seq_len"):
        make_iterator(task_cfg("copy", seq_len=20), "eval", process_index=0, process_count=1)


@pytest.mark.parametrize("task", ["copy", "reverse"])
def test_packed_rows_hold_whole_correct_examples(task):
    cfg = task_cfg(task, seq_len=53)
    cfg.data.task_packed = True
    batch = next(make_iterator(validate(cfg), process_index=0, process_count=1))
    again = next(make_iterator(validate(cfg), process_index=0, process_count=1))
    for k in batch:
        np.testing.assert_array_equal(batch[k], again[k])  # a pure function of (seed, split, row)
    examples = 0
    for r in range(6):
        seg = batch["segment_ids"][r]
        used = seg > 0
        assert used[: used.sum()].all()  # examples first, padding only at the end
        for s in range(1, seg.max() + 1):
            at = seg == s
            x, y = parse(batch["inputs"][r], at.astype(np.int32))
            assert 1 <= len(x) <= 7 and y == (x if task == "copy" else x[::-1])
            np.testing.assert_array_equal(batch["positions"][r][at], np.arange(at.sum()))
            mask = (batch["loss_mask"][r] > 0) & at
            assert bytes(batch["targets"][r][mask].tolist()).decode() == y  # the answer, nothing else
            examples += 1
        assert (batch["loss_mask"][r][~used] == 0).all()
    assert examples > 2 * 6  # rows of 53 hold several examples of at most 17 tokens
