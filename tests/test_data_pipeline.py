"""make_iterator / global_batch: determinism, resume, host sharding, splits, counts, errors."""

import json

import jax
import numpy as np
import pytest
from jax.sharding import Mesh

from nopejax.config import ConfigError, base_config
from nopejax.data import global_batch, make_iterator, split_indices
from nopejax.data.pipeline import document_indices, shard_states
from nopejax.data.tokenizer import BYTE_BOS, BYTE_EOS
from nopejax.validation import validate

WORDS = ["the", "of", "a", "rope", "nope", "layer", "token", "attention", "position", "length", "model", "data"]


def write_corpus(path, n=60, seed=0):
    """JSONL of n documents, each starting with a unique marker `<d17>`; returns the texts."""
    rng = np.random.default_rng(seed)
    texts = [f"<d{i}> " + " ".join(rng.choice(WORDS, size=int(rng.integers(1, 40)))) for i in range(n)]
    with open(path, "w") as f:
        for t in texts:
            f.write(json.dumps({"text": t}) + "\n")
    return texts


def make_cfg(path, **data):
    cfg = base_config()
    cfg.data.source, cfg.data.path, cfg.data.eval_fraction = "jsonl", str(path), 0.2
    for k, v in data.items():
        cfg.data[k] = v
    cfg.train.global_batch_size, cfg.train.seq_len = 12, 29  # odd sizes on purpose
    return validate(cfg)


def take(it, n):
    return [next(it) for _ in range(n)]


def assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


def texts_of(batches, row=None):
    """Documents seen in a stream (all rows in order, or one row's stream over the batches),
    decoded back from the byte tokens (BOS ... EOS)."""
    rows = (lambda b: b) if row is None else (lambda b: {k: v[row : row + 1] for k, v in b.items()})
    flat = np.concatenate([rows(b)["inputs"][rows(b)["segment_ids"] > 0] for b in batches])
    out, cur = [], None
    for t in flat.tolist():
        if t == BYTE_BOS:
            cur = []
        elif t == BYTE_EOS:
            if cur is not None:
                out.append(bytes(cur).decode())
            cur = None
        elif cur is not None:
            cur.append(t)
    return out


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "docs.jsonl"
    return path, write_corpus(path)


def test_batch_shapes_and_types(corpus):
    batch = next(make_iterator(make_cfg(corpus[0]), process_index=0, process_count=1))
    assert sorted(batch) == ["inputs", "loss_mask", "positions", "segment_ids", "targets"]
    for k, v in batch.items():
        assert v.shape == (12, 29)
        assert v.dtype == (np.float32 if k == "loss_mask" else np.int32)


def test_same_seed_same_batches_other_seed_differs(corpus):
    cfg = make_cfg(corpus[0])
    a = take(make_iterator(cfg, process_index=0, process_count=1), 5)
    b = take(make_iterator(cfg, process_index=0, process_count=1), 5)
    assert_same(a, b)
    cfg.train.seed = 1
    c = take(make_iterator(cfg, process_index=0, process_count=1), 5)
    assert not all(np.array_equal(x["inputs"], y["inputs"]) for x, y in zip(a, c))


@pytest.mark.parametrize("packing", ["concat", "pad"])
def test_resume_equals_uninterrupted(corpus, packing):
    cfg = make_cfg(corpus[0], packing=packing)
    reference = take(make_iterator(cfg, process_index=0, process_count=1), 11)
    for n in (0, 3, 7):  # including inside a split document and across an epoch boundary
        it = make_iterator(cfg, process_index=0, process_count=1)
        take(it, n)
        state = json.loads(json.dumps(it.get_state()))  # what a checkpoint stores
        fresh = make_iterator(cfg, process_index=0, process_count=1)
        fresh.set_state(state)
        assert_same(take(fresh, 11 - n), reference[n:])


def test_resume_with_worker_processes(corpus):
    cfg = make_cfg(corpus[0], num_workers=2, num_shards=1)  # worker processes need one shard per process
    it = make_iterator(cfg, process_index=0, process_count=1)
    take(it, 2)
    state = json.loads(json.dumps(it.get_state()))
    reference = take(it, 4)
    it.close()
    fresh = make_iterator(cfg, process_index=0, process_count=1)
    fresh.set_state(state)
    assert_same(take(fresh, 4), reference)
    fresh.close()


def test_epochs_reshuffle_and_cover_all_train_documents(corpus):
    path, texts = corpus
    cfg = make_cfg(path, num_shards=1)  # one stream: epochs are visible in its document order
    train = {texts[i] for i in split_indices(len(texts), 0.2, "train")}
    seen = texts_of(take(make_iterator(cfg, process_index=0, process_count=1), 60))
    first = seen[: len(train)]
    assert set(first) == train  # epoch 1 is a permutation of the train split
    second = seen[len(train) : 2 * len(train)]
    assert set(second) == train and second != first  # epoch 2: reshuffled


def test_eval_split_is_held_out_deterministic_and_unshuffled(corpus):
    path, texts = corpus
    cfg = make_cfg(path)
    ev = split_indices(len(texts), 0.2, "eval")
    tr = split_indices(len(texts), 0.2, "train")
    assert len(ev) > 0 and not set(ev) & set(tr) and len(ev) + len(tr) == len(texts)
    a = take(make_iterator(cfg, "eval", process_index=0, process_count=1), 8)
    assert_same(a, take(make_iterator(cfg, "eval", process_index=0, process_count=1), 8))
    seen = texts_of(a)
    assert seen[: len(ev)] == [texts[i] for i in ev]  # in corpus order, then repeating


@pytest.mark.parametrize("count", [2, 4])
def test_host_shards_are_disjoint_and_cover_the_data(corpus, count):
    path, texts = corpus
    cfg = make_cfg(path, eval_fraction=0.0)
    B = cfg.train.global_batch_size  # default: one data shard per row of the global batch
    shards = [set(document_indices(len(texts), cfg.data, "train", r, B).tolist()) for r in range(B)]
    assert sum(len(s) for s in shards) == len(texts) and set().union(*shards) == set(range(len(texts)))
    # End to end: each process's stream holds exactly the documents of its consecutive shards.
    for p in range(count):
        it = make_iterator(cfg, process_index=p, process_count=count)
        batch = next(it)
        assert batch["inputs"].shape == (B // count, 29)
        batches = [batch, *take(it, 60)]
        for j in range(B // count):  # each row is the stream of one shard
            assert set(texts_of(batches, row=j)) == {texts[i] for i in shards[p * B // count + j]}


@pytest.mark.parametrize("split", ["train", "eval"])
def test_global_batches_do_not_depend_on_the_process_count(corpus, split):
    # default data settings: nothing fixed in advance for the process count
    cfg = make_cfg(corpus[0])
    one = take(make_iterator(cfg, split, process_index=0, process_count=1), 4)
    for count in (2, 3, 4):
        parts = [take(make_iterator(cfg, split, process_index=p, process_count=count), 4) for p in range(count)]
        joined = [{k: np.concatenate([part[i][k] for part in parts]) for k in one[0]} for i in range(4)]
        assert_same(joined, one)


def test_resume_on_another_process_count_continues_the_order(corpus):
    cfg = make_cfg(corpus[0])
    one = make_iterator(cfg, process_index=0, process_count=1)
    take(one, 3)
    saved = shard_states(one.get_state())  # 12 shards, one per row
    expected = take(one, 2)
    parts = []
    for p in range(3):  # the same shards, 4 per process
        it = make_iterator(cfg, process_index=p, process_count=3, num_shards=len(saved))
        it.set_state({"shards": saved[4 * p : 4 * (p + 1)]})
        parts.append(take(it, 2))
    assert_same([{k: np.concatenate([part[i][k] for part in parts]) for k in expected[0]} for i in range(2)], expected)


def test_counts_empty_and_invalid_utf8_documents(tmp_path):
    path = tmp_path / "bad.jsonl"
    with open(path, "wb") as f:
        f.write(b'{"text": "good one"}\n{"text": ""}\n{"text": "   "}\n{"text": "bad \xff\xfe bytes"}\n')
        f.write(b'{"text": null}\n{"text": "lone \\ud800 surrogate"}\n')
    cfg = make_cfg(path, eval_fraction=0.0, shuffle=False)
    # One row of exactly the epoch's 46 tokens (3 documents + BOS/EOS), so stats cover one epoch.
    cfg.train.global_batch_size, cfg.train.seq_len = 1, 46
    it = make_iterator(cfg, process_index=0, process_count=1)
    batch = next(it)
    stats = it.get_state()["stats"]
    assert stats["empty_documents"] == 3 and stats["invalid_utf8_documents"] == 2 and stats["documents"] == 3
    texts = texts_of([batch])
    assert texts[:3] == ["good one", "bad \ufffd\ufffd bytes", "lone ? surrogate"]


def test_global_batch_on_a_mesh(corpus):
    devices = np.array(jax.devices()[:8]).reshape(4, 2)
    mesh = Mesh(devices, ("data", "fsdp"))
    cfg = make_cfg(corpus[0])
    cfg.train.global_batch_size = 16
    local = next(make_iterator(cfg, process_index=0, process_count=1))
    arrays = global_batch(local, mesh)
    for k, v in arrays.items():
        assert v.shape == (16, 29)
        assert v.sharding.spec[0] == ("data", "fsdp")
        np.testing.assert_array_equal(np.asarray(v), local[k])
    only_data = global_batch(local, Mesh(devices.reshape(8), ("data",)), batch_axes=("dcn_data", "data", "fsdp"))
    assert only_data["inputs"].sharding.spec[0] in ("data", ("data",))


def test_config_errors(corpus):
    cfg = make_cfg(corpus[0])
    with pytest.raises(ConfigError, match="global_batch_size"):
        make_iterator(cfg, process_index=0, process_count=5)
    with pytest.raises(ConfigError, match="num_workers"):
        make_iterator(make_cfg(corpus[0], num_workers=2), process_index=0, process_count=1)
    cfg.model.vocab_size = 200
    with pytest.raises(ConfigError, match="vocab_size"):
        make_iterator(cfg, process_index=0, process_count=1)
    cfg = make_cfg(corpus[0], eval_fraction=0.0)
    with pytest.raises(ConfigError, match="eval_fraction"):
        make_iterator(cfg, "eval", process_index=0, process_count=1)


def test_mixture_of_sources_follows_weights(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    for path, letter in ((a, "a"), (b, "b")):
        with open(path, "w") as f:
            for i in range(30):
                f.write(json.dumps({"text": f"{letter}{i} " * 3}) + "\n")
    cfg = make_cfg(f"{a},{b}", mixture_weights=(3.0, 1.0), eval_fraction=0.0)
    docs = texts_of(take(make_iterator(cfg, process_index=0, process_count=1), 20))
    share_a = sum(d.startswith("a") for d in docs) / len(docs)
    assert 0.65 < share_a < 0.85
    cfg.data.mixture_weights = (1.0,)
    with pytest.raises(ConfigError, match="mixture_weights"):
        make_iterator(cfg, process_index=0, process_count=1)


def test_a_corpus_smaller_than_the_batch_still_trains(tmp_path):
    # 3 documents, 12 rows: every row's shard is the whole corpus, starting at another document
    texts = write_corpus(tmp_path / "few.jsonl", n=3)
    cfg = make_cfg(tmp_path / "few.jsonl", eval_fraction=0.0, shuffle=False)
    batches = take(make_iterator(cfg, process_index=0, process_count=1), 30)
    for row in range(12):
        seen = texts_of(batches, row=row)
        assert set(seen) == set(texts) and seen[0] == texts[row % 3]
