"""Packing: token documents -> fixed [B, S] batches with segment ids, positions and a loss mask.

Documents are laid end to end into rows of S tokens (letters: B rows, S = seq_len). Within a row
each document piece gets its own segment id (1, 2, ...; 0 is padding) and positions that restart
at 0, so attention masked by segment id never crosses a document and RoPE/NoPE layers see each
piece as starting fresh. Two modes (`data.packing`):

  concat  fill every row; a document that reaches the end of a row continues in the next row
          (as a new segment at position 0). No padding except at the end of a finite stream.
  pad     a document that does not fit in the rest of the row starts a fresh row and the rest
          is padding; only documents longer than S are split. Wastes some tokens, keeps every
          document that fits whole (position 0 is its true start).

`targets[r, s]` is the document's next token, also when that token lies in the next row (the
piece's last position still has a real next token); `loss_mask` is 1 exactly there, so there
is no loss on padding or from one document into the next. Every document token appears in
`inputs` exactly once, in order. Work is numpy slices per document piece, never per token.

`PackedBatchIterator` is the checkpointable grain iterator around this: its state is the
upstream state from before the document being split plus an offset into it (JSON-able ints),
so no token buffer is ever stored. Empty documents are skipped; an endless stream of nothing
but empty ones (a data shard with no text) would never fill a batch, so after `max_empty_run`
of them in a row the iterator raises instead of spinning.
"""

from __future__ import annotations

import copy
from typing import Any

import grain
import numpy as np

from nopejax.config import ConfigError

BATCH_KEYS = ("inputs", "targets", "segment_ids", "positions", "loss_mask")


class BatchPacker:
    """Fills one [rows, seq_len] batch from document pieces."""

    def __init__(self, rows: int, seq_len: int, pad_id: int, split_documents: bool = True):
        self.rows, self.seq_len, self.pad_id, self.split_documents = rows, seq_len, pad_id, split_documents
        self._arange = np.arange(seq_len, dtype=np.int32)
        self._reset()

    def _reset(self) -> None:
        shape = (self.rows, self.seq_len)
        self.inputs_BxS = np.full(shape, self.pad_id, np.int32)
        self.targets_BxS = np.full(shape, self.pad_id, np.int32)
        self.segment_ids_BxS = np.zeros(shape, np.int32)
        self.positions_BxS = np.zeros(shape, np.int32)
        self.loss_mask_BxS = np.zeros(shape, np.float32)
        self.row, self.col, self.segment = 0, 0, 0

    @property
    def full(self) -> bool:
        return self.row == self.rows

    @property
    def empty(self) -> bool:
        return self.row == 0 and self.col == 0

    def _next_row(self) -> None:
        self.row, self.col, self.segment = self.row + 1, 0, 0

    def add(self, doc: np.ndarray, start: int = 0) -> int:
        """Place the tokens doc[start:] until the document ends or the batch is full; return the new start."""
        length, S = len(doc), self.seq_len
        while start < length and self.row < self.rows:
            room, rest = S - self.col, length - start
            if not self.split_documents and self.col > 0 and room < rest <= S:
                self._next_row()  # fits a fresh row whole: pad this one rather than split it
                continue
            n = min(rest, room)
            r, c = self.row, self.col
            self.inputs_BxS[r, c : c + n] = doc[start : start + n]
            k = min(start + n + 1, length) - (start + 1)  # real next tokens: n, or n - 1 at the doc end
            self.targets_BxS[r, c : c + k] = doc[start + 1 : start + 1 + k]
            self.loss_mask_BxS[r, c : c + k] = 1.0
            self.segment += 1
            self.segment_ids_BxS[r, c : c + n] = self.segment
            self.positions_BxS[r, c : c + n] = self._arange[:n]
            start += n
            self.col += n
            if self.col == S:
                self._next_row()
        return start

    def take(self) -> dict[str, np.ndarray]:
        """The batch so far (rest padding), each [rows, seq_len]; starts a new one."""
        batch = {
            "inputs": self.inputs_BxS,
            "targets": self.targets_BxS,
            "segment_ids": self.segment_ids_BxS,
            "positions": self.positions_BxS,
            "loss_mask": self.loss_mask_BxS,
        }
        self._reset()
        return batch


def pack_documents(docs: list[np.ndarray], seq_len: int, pad_id: int, split_documents: bool = True) -> dict:
    """Pack a finite list of documents into as many rows as needed: dict of [R, seq_len]."""
    total = sum(len(d) for d in docs)
    packer = BatchPacker(total // seq_len + len(docs) + 1, seq_len, pad_id, split_documents)
    for doc in docs:
        if len(doc):
            packer.add(np.asarray(doc, np.int32))
    used = packer.row + (packer.col > 0)
    return {k: v[:used] for k, v in packer.take().items()}


class PackedBatchIterDataset(grain.IterDataset):
    """IterDataset of {"tokens": 1-D int32, "invalid_utf8": bool} -> packed [rows, seq_len] batches.

    `max_empty_run`: this many empty documents in a row mean the stream holds no text (the caller
    knows its size: e.g. two passes over a shard's documents); `name` says which stream in the error.
    """

    def __init__(
        self,
        parent: grain.IterDataset,
        rows: int,
        seq_len: int,
        pad_id: int,
        split_documents: bool = True,
        *,
        max_empty_run: int,
        name: str = "the data stream",
    ):
        super().__init__(parent)
        self._args = (rows, seq_len, pad_id, split_documents, max_empty_run, name)

    def __iter__(self) -> PackedBatchIterator:
        return PackedBatchIterator(self._parent.__iter__(), *self._args)

    def __str__(self) -> str:
        return f"PackedBatchIterDataset(rows={self._args[0]}, seq_len={self._args[1]})"


class PackedBatchIterator(grain.DatasetIterator):
    """Checkpointable: state = upstream state before the pending document + offset into it."""

    def __init__(
        self,
        parent: grain.DatasetIterator,
        rows: int,
        seq_len: int,
        pad_id: int,
        split_documents: bool,
        max_empty_run: int,
        name: str,
    ):
        super().__init__(parent)
        if max_empty_run < 1:
            raise ValueError(f"max_empty_run must be >= 1, got {max_empty_run}")
        self._packer = BatchPacker(rows, seq_len, pad_id, split_documents)
        self._max_empty_run, self._name = max_empty_run, name
        self._pending: np.ndarray | None = None  # the document being placed, 1-D int32
        self._pending_state: Any = None  # upstream state from before it was read
        self._offset = 0
        # Counted where documents enter packing, so they survive worker processes and resumes.
        self.stats = {"documents": 0, "tokens": 0, "empty_documents": 0, "invalid_utf8_documents": 0}

    def _read(self) -> bool:
        """Read the next non-empty document into `_pending`; False at the end of the stream."""
        for _ in range(self._max_empty_run + 1):
            state = self._parent.get_state()
            try:
                item = next(self._parent)
            except StopIteration:
                return False
            # a plain copy: from worker processes documents arrive in shared memory, which is then
            # freed at once instead of at interpreter exit (where grain's cleanup fails noisily)
            tokens = np.array(item["tokens"])
            self.stats["invalid_utf8_documents"] += int(item.get("invalid_utf8", False))
            if len(tokens) == 0:
                self.stats["empty_documents"] += 1
                continue
            self.stats["documents"] += 1
            self.stats["tokens"] += len(tokens)
            self._pending, self._pending_state, self._offset = tokens, state, 0
            return True
        raise ConfigError(
            "data.path", f"{self._name} gave {self._max_empty_run + 1} empty documents in a row (no text after "
            "tokenization), more than a full pass over its documents, so it holds no text to train on",
            "remove the empty documents, check data.text_field, or use fewer data shards (data.num_shards)",
        )  # fmt: skip

    def __next__(self) -> dict[str, np.ndarray]:
        while not self._packer.full:
            if self._pending is None and not self._read():
                if self._packer.empty:
                    raise StopIteration
                break  # a finite stream ends in a partly padded batch
            self._offset = self._packer.add(self._pending, self._offset)
            if self._offset == len(self._pending):
                self._pending = None
        return self._packer.take()

    def get_state(self) -> dict[str, Any]:
        pending = self._pending is not None
        return {
            "upstream": copy.deepcopy(self._pending_state if pending else self._parent.get_state()),
            "pending": pending,
            "offset": self._offset if pending else 0,
            "stats": dict(self.stats),
        }

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["upstream"])
        self.stats = dict(state["stats"])
        self._pending, self._offset = None, 0
        if state["pending"]:  # re-read the split document; it was counted before the save
            self._pending_state = state["upstream"]
            self._pending = np.array(next(self._parent)["tokens"])
            self._offset = int(state["offset"])
