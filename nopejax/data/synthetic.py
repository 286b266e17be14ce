"""Synthetic length-generalization tasks (copy, reverse, parity, passkey), after Kazemnejad et al. 2023.

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

`data.task_packed`: a training row holds several whole examples, each its own segment with
positions from 0 (attention never crosses examples), instead of one example and padding. Row i
is then a pure function of (seed, split, i) too. Short examples waste most of a padded row
(copy of 1-20 symbols: 24 of 43 tokens on average), so packing buys ~1.7x more examples per
step for the same compute. Evaluation (`nopejax eval-length`) always uses one example per row.

Passkey retrieval (Mohtashami & Jaggi 2023, "Landmark Attention"), the standard long-context
probe: a row of exactly L tokens (L = train.seq_len when training; any L at evaluation) of
filler sentences with one needle at a chosen depth, and the question at the end:

    BOS  filler  " The pass key is 40172. Remember it. "  filler  " What is the pass key? The pass key is "  40172  EOS

The key is PASSKEY_DIGITS random digits; the depth d in [0, 1] puts the needle after
round(d * F) of the F filler bytes (uniform for training). Digits occur nowhere else, so the
answer can only come from the needle. `loss_mask` covers exactly the key's digits.
"""

from __future__ import annotations

import grain
import jax.numpy as jnp
import numpy as np

from nopejax.config import ConfigError
from nopejax.data.tokenizer import BYTE_BOS, BYTE_EOS, BYTE_PAD, ByteTokenizer

TASKS = ("copy", "reverse", "parity", "passkey")
SEP = ord("=")
PASSKEY_DIGITS = 5
_NEEDLE = (b" The pass key is ", b". Remember it. ")
_QUESTION = b" What is the pass key? The pass key is "
# Filler sentences (Landmark Attention's, plus a few): drawn at random, so the text is not periodic.
_FILLER = (
    b"The grass is green. ", b"The sky is blue. ", b"The sun is yellow. ", b"Here we go. ",
    b"There and back again. ", b"The river runs to the sea. ", b"Birds sing in the morning. ",
)  # fmt: skip
# BOS, needle, question, key, EOS: the shortest passkey row (no filler).
PASSKEY_MIN_LEN = 2 + len(_NEEDLE[0]) + len(_NEEDLE[1]) + len(_QUESTION) + 2 * PASSKEY_DIGITS
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


def _bytes(b: bytes) -> np.ndarray:
    return np.frombuffer(b, np.uint8).astype(np.int32)


def task_tokens(task: str, rng: np.random.Generator, min_len: int, max_len: int) -> tuple[np.ndarray, int, int]:
    """One copy/reverse/parity example -> (token row int32 [T], index of y_1 in the row, m = len(y))."""
    n = int(rng.integers(min_len, max_len + 1))
    alphabet = _BITS if task == "parity" else _LETTERS
    x = alphabet[rng.integers(0, len(alphabet), size=n)]
    y, row = make_example(task, x)
    return row, n + 2, len(y)  # y_1 follows BOS, x, SEP


def passkey_tokens(rng: np.random.Generator, length: int, depth: float | None = None) -> tuple[np.ndarray, int, int]:
    """One passkey row of exactly `length` tokens -> (row int32 [length], index of the key's first
    digit, PASSKEY_DIGITS). `depth` in [0, 1] places the needle; None draws it uniformly."""
    if length < PASSKEY_MIN_LEN:
        raise ValueError(f"a passkey row needs >= {PASSKEY_MIN_LEN} tokens, got {length}")
    key = _bytes(b"0123456789")[rng.integers(0, 10, size=PASSKEY_DIGITS)]
    depth = float(rng.random()) if depth is None else depth
    filler_len = length - PASSKEY_MIN_LEN
    # enough random sentences to cover the filler, cut to its exact length
    sentences = rng.integers(0, len(_FILLER), size=filler_len // min(map(len, _FILLER)) + 1)
    filler = _bytes(b"".join(_FILLER[i] for i in sentences))[:filler_len]
    cut = round(depth * filler_len)
    needle = [_bytes(_NEEDLE[0]), key, _bytes(_NEEDLE[1])]
    parts = [[BYTE_BOS], filler[:cut], *needle, filler[cut:], _bytes(_QUESTION), key, [BYTE_EOS]]
    row = np.concatenate(parts).astype(np.int32)
    return row, length - 1 - PASSKEY_DIGITS, PASSKEY_DIGITS


def needle_start(length: int, depth: float) -> int:
    """Row index of the needle's key in a passkey row of `length` tokens at `depth`."""
    return 1 + round(depth * (length - PASSKEY_MIN_LEN)) + len(_NEEDLE[0])


def layout(rows: list[tuple[np.ndarray, int, int]], seq_len: int) -> dict[str, np.ndarray]:
    """Whole examples (row, answer start, answer length) laid end to end in one [S] row, each its
    own segment with positions from 0; `loss_mask` marks positions whose target is an answer token."""
    S = seq_len
    out = {
        "inputs": np.full(S, BYTE_PAD, np.int32),
        "targets": np.full(S, BYTE_PAD, np.int32),
        "segment_ids": np.zeros(S, np.int32),
        "positions": np.zeros(S, np.int32),
        "loss_mask": np.zeros(S, np.float32),
    }
    at = 0
    for segment, (row, answer_start, m) in enumerate(rows, start=1):
        T = len(row)
        out["inputs"][at : at + T] = row
        out["targets"][at : at + T - 1] = row[1:]  # the last token predicts padding: masked out
        out["segment_ids"][at : at + T] = segment
        out["positions"][at : at + T] = np.arange(T, dtype=np.int32)
        out["loss_mask"][at + answer_start - 1 : at + answer_start - 1 + m] = 1.0  # targets y_1 .. y_m
        at += T
    return out


class TaskExample(grain.transforms.Map):
    """Global example index -> one padded row: dict of [S] arrays.

    For passkey, min_len = max_len = the row length (a fixed `depth` is for evaluation).
    """

    def __init__(self, task: str, seed: int, split: str, min_len: int, max_len: int, seq_len: int, depth=None):
        self.task, self.seed, self.split_code = task, seed, 0 if split == "train" else 1
        self.min_len, self.max_len, self.seq_len, self.depth = min_len, max_len, seq_len, depth

    def tokens(self, rng: np.random.Generator) -> tuple[np.ndarray, int, int]:
        if self.task == "passkey":
            return passkey_tokens(rng, self.max_len, self.depth)
        return task_tokens(self.task, rng, self.min_len, self.max_len)

    def map(self, index) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([self.seed, self.split_code, int(index)])
        return layout([self.tokens(rng)], self.seq_len)


class PackedTaskRow(TaskExample):
    """Global row index -> one row of whole examples drawn until the next one does not fit."""

    def map(self, index) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([self.seed, self.split_code, 2**32 + int(index)])  # unlike any example's
        rows, used = [], 0
        while True:
            example = self.tokens(rng)
            if used + len(example[0]) > self.seq_len:
                return layout(rows, self.seq_len)
            rows.append(example)
            used += len(example[0])


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
    if d.source == "passkey":  # every row one example of exactly seq_len tokens
        if seq_len < PASSKEY_MIN_LEN:
            raise ConfigError(
                "train.seq_len", f"a passkey row needs >= {PASSKEY_MIN_LEN} tokens, got {seq_len}",
                f"set train.seq_len >= {PASSKEY_MIN_LEN}",
            )  # fmt: skip
        make = TaskExample("passkey", cfg.train.seed, split, seq_len, seq_len, seq_len)
    else:
        lo, hi = (d.task_train_min_len, d.task_train_max_len) if split == "train" else (
            d.task_test_min_len, d.task_test_max_len)  # fmt: skip
        if lo < 1:
            raise ConfigError("data.task_train_min_len", f"task lengths must be >= 1, got {lo}", "use 1 or more")
        longest = hi + answer_length(d.source, hi) + 3
        if longest > seq_len:
            raise ConfigError(
                "train.seq_len",
                f"{d.source} examples of length {hi} ({split} split) need {longest} tokens but seq_len is {seq_len}",
                f"set train.seq_len >= {longest} or shorten the task lengths",
            )
        make = (PackedTaskRow if d.task_packed else TaskExample)(d.source, cfg.train.seed, split, lo, hi, seq_len)
    rows = cfg.train.global_batch_size // process_count
    ds = grain.MapDataset.range(_NUM_EXAMPLES)[process_index::process_count]
    return iter(ds.map(make).batch(rows).to_iter_dataset())


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
