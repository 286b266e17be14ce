"""Packing invariants on random documents, against a plain per-token reference walk."""

import numpy as np
import pytest

from nopejax.data.packing import BatchPacker, pack_documents

PAD = 999


def random_docs(rng, n=37, max_len=61):
    # Odd lengths, some longer than the rows (S=13 below) and a few of length 1.
    return [rng.integers(0, 500, size=int(rng.integers(1, max_len))).astype(np.int32) for _ in range(n)]


def check_packed(docs, out, seq_len, split_documents):
    inputs, targets, seg, pos, mask = (out[k] for k in ("inputs", "targets", "segment_ids", "positions", "loss_mask"))
    R, S = inputs.shape
    assert seq_len == S
    assert inputs.dtype == targets.dtype == seg.dtype == pos.dtype == np.int32 and mask.dtype == np.float32
    # Every token of every document appears exactly once, in order, and nothing else does.
    real = seg > 0
    np.testing.assert_array_equal(inputs[real], np.concatenate(docs))
    assert (inputs[~real] == PAD).all() and (mask[~real] == 0).all() and (pos[~real] == 0).all()
    # Walk the documents token by token: segment ids, positions, targets and mask.
    r, c = 0, 0
    for doc in docs:
        for i, tok in enumerate(doc):
            while seg[r, c] == 0:  # skip row padding (only in pad mode)
                assert not split_documents
                c += 1
                if c == S:
                    r, c = r + 1, 0
            assert inputs[r, c] == tok
            starts_piece = i == 0 or c == 0
            if starts_piece:
                assert pos[r, c] == 0
                assert seg[r, c] == (1 if c == 0 else seg[r, c - 1] + 1)
            else:
                assert pos[r, c] == pos[r, c - 1] + 1 and seg[r, c] == seg[r, c - 1]
            if i + 1 < len(doc):
                assert mask[r, c] == 1 and targets[r, c] == doc[i + 1]
            else:
                assert mask[r, c] == 0  # no loss from a document into the next
            c += 1
            if c == S:
                r, c = r + 1, 0
    # Pad mode splits only documents that cannot fit a row: each shorter one sits in one row.
    if not split_documents:
        rows_of_doc, k = [], 0
        flat_rows = np.repeat(np.arange(R), S)[real.reshape(-1)]
        for doc in docs:
            rows_of_doc.append(set(flat_rows[k : k + len(doc)].tolist()))
            k += len(doc)
        for doc, rows in zip(docs, rows_of_doc):
            if len(doc) <= S:
                assert len(rows) == 1


@pytest.mark.parametrize("split_documents", [True, False])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_packing_invariants(seed, split_documents):
    rng = np.random.default_rng(seed)
    docs = random_docs(rng)
    out = pack_documents(docs, 13, PAD, split_documents)
    check_packed(docs, out, 13, split_documents)
    if split_documents:  # concat mode pads only the last row
        assert (out["segment_ids"][:-1] > 0).all()


def test_batches_continue_documents_across_calls():
    """Filling several fixed [B, S] batches equals packing everything at once."""
    rng = np.random.default_rng(3)
    docs = random_docs(rng, n=23)
    packer, batches, pending = BatchPacker(3, 11, PAD), [], list(docs)
    start = 0
    while pending:
        start = packer.add(pending[0], start)
        if start == len(pending[0]):
            pending.pop(0)
            start = 0
        if packer.full or not pending:
            batches.append(packer.take())
    joined = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
    whole = pack_documents(docs, 11, PAD)
    for k, v in whole.items():
        np.testing.assert_array_equal(joined[k][: len(v)], v)


def test_empty_documents_are_ignored_by_pack_documents():
    out = pack_documents([np.array([1, 2, 3]), np.array([], np.int32), np.array([4])], 5, PAD)
    np.testing.assert_array_equal(out["inputs"], [[1, 2, 3, 4, PAD]])
    np.testing.assert_array_equal(out["segment_ids"], [[1, 1, 1, 2, 0]])
    np.testing.assert_array_equal(out["loss_mask"], [[1, 1, 0, 0, 0]])
