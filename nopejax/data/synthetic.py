"""Synthetic length-generalization tasks (copy, reverse, parity), after Kazemnejad et al. 2023.

"The Impact of Positional Encoding on Length Generalization in Transformers" trains on short
instances and tests on longer ones; NoPE generalizes better than RoPE there. Each example is
one row, in byte-tokenizer ids (readable with `ByteTokenizer().decode`):

    BOS  x_1 .. x_n  '='  y_1 .. y_m  EOS  PAD ...
    copy:    x in a..z, y = x              "abc=abc"
    reverse: x in a..z, y = reversed x     "abc=cba"
    parity:  x in 0/1,  y = '0' or '1', the parity of the count of 1s

n is uniform in data.task_train_min_len..task_train_max_len for the train split and in
task_test_min_len..task_test_max_len for eval. `loss_mask` is 1 only where the target is an
answer token y_j (teacher forcing), so `exact_match` over those positions equals greedy
decoding being exactly right. Example i of a split is a pure function of (train.seed, split,
i): deterministic, resumable by index, and sharded across processes by index.
"""

from __future__ import annotations

import grain
import jax.numpy as jnp
import numpy as np

from nopejax.config import ConfigError
from nopejax.data.tokenizer import BYTE_BOS, BYTE_EOS, BYTE_PAD, ByteTokenizer

TASKS = ("copy", "reverse", "parity")
SEP = ord("=")
_LETTERS = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz", np.uint8).astype(np.int32)
_BITS = np.frombuffer(b"01", np.uint8).astype(np.int32)
_NUM_EXAMPLES = 2**62  # "infinite": examples are generated from their index on demand


def answer_length(task: str, n: int) -> int:
    return 1 if task == "parity" else n


def make_example(task: str, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symbols x (int32 [n], byte ids) -> (answer y int32 [m], full token row int32 [n + m + 3])."""
    if task == "copy":
        y = x.copy()
    elif task == "reverse":
        y = x[::-1].copy()
    elif task == "parity":
        y = _BITS[[int(np.sum(x == _BITS[1]) % 2)]]
    else:
        raise ValueError(f"unknown task {task!r}")
    row = np.concatenate([[BYTE_BOS], x, [SEP], y, [BYTE_EOS]]).astype(np.int32)
    return y, row


class TaskExample(grain.transforms.Map):
    """Global example index -> one padded row: dict of [S] arrays."""

    def __init__(self, task: str, seed: int, split: str, min_len: int, max_len: int, seq_len: int):
        self.task, self.seed, self.split_code = task, seed, 0 if split == "train" else 1
        self.min_len, self.max_len, self.seq_len = min_len, max_len, seq_len

    def map(self, index) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([self.seed, self.split_code, int(index)])
        n = int(rng.integers(self.min_len, self.max_len + 1))
        alphabet = _BITS if self.task == "parity" else _LETTERS
        x = alphabet[rng.integers(0, len(alphabet), size=n)]
        y, row = make_example(self.task, x)
        S, T = self.seq_len, len(row)
        inputs_S = np.full(S, BYTE_PAD, np.int32)
        targets_S = np.full(S, BYTE_PAD, np.int32)
        inputs_S[:T] = row
        targets_S[: T - 1] = row[1:]
        answer_start = n + 2  # row index of y_1 (after BOS, x, SEP)
        loss_mask_S = np.zeros(S, np.float32)
        loss_mask_S[answer_start - 1 : answer_start - 1 + len(y)] = 1.0  # positions whose target is y_j
        segment_ids_S = np.zeros(S, np.int32)
        segment_ids_S[:T] = 1
        positions_S = np.zeros(S, np.int32)
        positions_S[:T] = np.arange(T, dtype=np.int32)
        return {
            "inputs": inputs_S,
            "targets": targets_S,
            "segment_ids": segment_ids_S,
            "positions": positions_S,
            "loss_mask": loss_mask_S,
        }


def make_task_iterator(cfg, split: str, process_index: int, process_count: int):
    """Checkpointable iterator of [B_local, S] task batches; both splits are endless."""
    d, seq_len = cfg.data, cfg.train.seq_len
    if d.tokenizer != "byte":
        raise ConfigError(
            "data.tokenizer", f"synthetic tasks use the byte tokenizer, got {d.tokenizer!r}", "set it to byte"
        )
    if ByteTokenizer.vocab_size > cfg.model.vocab_size:
        raise ConfigError(
            "model.vocab_size", f"must be >= {ByteTokenizer.vocab_size} for the byte tokenizer", "raise it"
        )
    lo, hi = (
        (d.task_train_min_len, d.task_train_max_len) if split == "train" else (d.task_test_min_len, d.task_test_max_len)
    )
    if lo < 1:
        raise ConfigError("data.task_train_min_len", f"task lengths must be >= 1, got {lo}", "use 1 or more")
    longest = hi + answer_length(d.source, hi) + 3
    if longest > seq_len:
        raise ConfigError(
            "train.seq_len",
            f"{d.source} examples of length {hi} ({split} split) need {longest} tokens but seq_len is {seq_len}",
            f"set train.seq_len >= {longest} or shorten the task lengths",
        )
    rows = cfg.train.global_batch_size // process_count
    ds = grain.MapDataset.range(_NUM_EXAMPLES)[process_index::process_count]
    ds = ds.map(TaskExample(d.source, cfg.train.seed, split, lo, hi, seq_len)).batch(rows)
    return iter(ds.to_iter_dataset())


def exact_match(logits_or_predictions, batch) -> jnp.ndarray:
    """Per example (bool [B]): the argmax at every answer position equals the target.

    Takes logits [B, S, V] or predicted ids [B, S]; answer positions are `loss_mask > 0`.
    Under teacher forcing this equals exactness of greedy decoding: the first wrong answer
    token is a wrong argmax given a correct prefix. Works inside jit.
    """
    x = jnp.asarray(logits_or_predictions)
    predictions_BxS = jnp.argmax(x, axis=-1) if x.ndim == 3 else x
    answer_BxS = jnp.asarray(batch["loss_mask"]) > 0
    right_BxS = (predictions_BxS == jnp.asarray(batch["targets"])) | ~answer_BxS
    return jnp.all(right_BxS, axis=-1) & jnp.any(answer_BxS, axis=-1)
