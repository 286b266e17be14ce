"""Each source type on small files, the default corpus, and the bad-input errors."""

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from array_record.python.array_record_module import ArrayRecordWriter

from nopejax.config import ConfigError, base_config
from nopejax.data import make_iterator
from nopejax.data.sources import ArrayRecordSource, JsonlSource, ParquetSource, TextSource, expand_paths, open_documents
from nopejax.validation import validate

DOCS = ["first document\nwith two lines", "second: ünïcödé ✓", "third"]


def read_all(source):
    return [x.decode() if isinstance(x, bytes) else x for x in (source[i] for i in range(len(source)))]


def test_text_one_document_per_file(tmp_path):
    for i, d in enumerate(DOCS):
        (tmp_path / f"{i}.txt").write_text(d)
    assert read_all(open_documents("text", str(tmp_path / "*.txt"))) == DOCS


def test_text_blank_line_blocks(tmp_path):
    (tmp_path / "a.txt").write_text("\n\n" + "\n\n  \n".join(DOCS) + "\n\n\n")
    (tmp_path / "b.txt").write_text("one\nblock")
    src = TextSource(expand_paths(str(tmp_path / "*.txt")), unit="block")
    assert [s.strip() for s in read_all(src)] == [*DOCS, "one\nblock"]


def test_jsonl_field_and_glob_over_files(tmp_path):
    for i, part in enumerate((DOCS[:2], DOCS[2:])):
        with open(tmp_path / f"p{i}.jsonl", "w") as f:
            f.write("\n".join(json.dumps({"body": d, "id": k}) for k, d in enumerate(part)) + "\n\n")
    assert read_all(JsonlSource(expand_paths(str(tmp_path / "*.jsonl")), "body")) == DOCS


def test_parquet_across_row_groups(tmp_path):
    table = pa.table({"text": DOCS * 5, "n": list(range(15))})
    pq.write_table(table, tmp_path / "a.parquet", row_group_size=4)
    pq.write_table(pa.table({"text": ["last"]}), tmp_path / "b.parquet")
    src = ParquetSource(expand_paths(str(tmp_path / "*.parquet")))
    assert read_all(src) == [*DOCS * 5, "last"]
    assert src[13] == DOCS[1] and src[2] == DOCS[2]  # random access, out of order


def test_arrayrecord(tmp_path):
    w = ArrayRecordWriter(str(tmp_path / "d.array_record"), "group_size:1")
    for d in DOCS:
        w.write(d.encode())
    w.close()
    assert read_all(ArrayRecordSource(expand_paths(str(tmp_path / "*.array_record")))) == DOCS


@pytest.mark.parametrize("kind", ["text", "jsonl", "parquet", "arrayrecord"])
def test_every_source_feeds_batches_of_its_documents(tmp_path, kind):
    path = tmp_path / "data"
    if kind == "text":
        path.write_text("\n\n".join(DOCS))
    elif kind == "jsonl":
        path.write_text("\n".join(json.dumps({"text": d}) for d in DOCS))
    elif kind == "parquet":
        pq.write_table(pa.table({"text": DOCS}), path)
    else:
        w = ArrayRecordWriter(str(path), "group_size:1")
        for d in DOCS:
            w.write(d.encode())
        w.close()
    cfg = base_config()
    cfg.data.source, cfg.data.path, cfg.data.eval_fraction, cfg.data.text_unit = kind, str(path), 0.0, "block"
    cfg.train.global_batch_size, cfg.train.seq_len = 2, 17
    batch = next(make_iterator(validate(cfg), process_index=0, process_count=1))
    assert batch["inputs"].shape == (2, 17) and batch["loss_mask"].sum() > 0
    # every document piece in the rows is a run of one document's UTF-8 bytes (byte ids are 0-255)
    pieces = [
        bytes(int(t) for t in row[seg_row == s] if t < 256)
        for row, seg_row in zip(batch["inputs"], batch["segment_ids"])
        for s in set(seg_row.tolist()) - {0}
    ]
    assert sum(map(len, pieces)) >= 17
    for piece in pieces:
        assert any(piece in d.encode() for d in DOCS), piece


def test_missing_path_and_empty_glob_name_the_path(tmp_path):
    with pytest.raises(ConfigError, match=r"nothere\.jsonl"):
        expand_paths(str(tmp_path / "nothere.jsonl"))
    with pytest.raises(ConfigError, match=r"matches no files"):
        expand_paths(str(tmp_path / "*.jsonl"))
    os.mkdir(tmp_path / "empty")
    with pytest.raises(ConfigError, match="holds no files"):
        expand_paths(str(tmp_path / "empty"))


def test_missing_text_field_names_field_and_path(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text(json.dumps({"content": "x"}) + "\n")
    with pytest.raises(ConfigError, match=r"a\.jsonl.*no field 'text'.*content"):
        JsonlSource([str(path)], "text")
    pq.write_table(pa.table({"content": ["x"]}), tmp_path / "a.parquet")
    with pytest.raises(ConfigError, match=r"a\.parquet has no column 'text'"):
        ParquetSource([str(tmp_path / "a.parquet")], "text")
    # A later line without the field fails when read, still naming field and file.
    path.write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"other": 1}) + "\n")
    src = JsonlSource([str(path)], "text")
    with pytest.raises(ConfigError, match=r"a\.jsonl.*no field 'text'"):
        src[1]


def test_prepared_dir_without_manifest_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match=r"manifest\.json"):
        open_documents("prepared", str(tmp_path))


def test_default_corpus_is_cached_and_deterministic(tmp_path, monkeypatch):
    from nopejax.data import corpus

    monkeypatch.setenv("NOPEJAX_CACHE", str(tmp_path))
    path = corpus.default_corpus_path()
    assert os.path.dirname(path) == str(tmp_path)
    with open(path) as f:
        docs = [json.loads(line)["text"] for line in f]
    assert len(docs) > 500 and sum(len(d) for d in docs) > 1_500_000
    assert any("Module json" in d for d in docs) and any("for" in d and "statement" in d for d in docs)
    mtime = os.path.getmtime(path)
    assert corpus.default_corpus_path() == path and os.path.getmtime(path) == mtime  # cached, not regathered
    # Same documents in the same order as a fresh gathering (a prefix suffices: it is sorted).
    fresh = corpus.gather_documents()
    assert fresh == docs
    cfg = base_config()
    it = make_iterator(validate(cfg), process_index=0, process_count=1)
    assert next(it)["inputs"].shape == (16, 128)
    assert not np.array_equal(
        next(it)["inputs"], next(make_iterator(cfg, "eval", process_index=0, process_count=1))["inputs"]
    )
