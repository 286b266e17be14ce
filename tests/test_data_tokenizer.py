"""Tokenizers (byte, tokenizer.json, BPE training) and prepared ArrayRecord shards."""

import json

import numpy as np
import pytest

from nopejax.config import ConfigError, base_config
from nopejax.data import make_iterator, make_tokenizer, prepare, prepare_main, tokenizer_main, train_tokenizer
from nopejax.data.sources import read_manifest
from nopejax.validation import validate

TEXT = "Hello, wörld! NoPE layers see no positions; the causal mask alone carries order. ✓\n"


def data_cfg(tokenizer="byte"):
    cfg = base_config()
    cfg.data.tokenizer = tokenizer
    return cfg.data


def test_byte_tokenizer_round_trip_and_specials():
    tok = make_tokenizer(data_cfg())
    ids = tok.encode(TEXT)
    assert ids.dtype == np.int32 and ids.max() < 256 and len(ids) == len(TEXT.encode())
    assert tok.decode(ids) == TEXT
    assert tok.decode(np.concatenate([[tok.bos_id], ids, [tok.eos_id, tok.pad_id]])) == TEXT
    assert len({tok.pad_id, tok.bos_id, tok.eos_id}) == 3 and max(tok.pad_id, tok.bos_id, tok.eos_id) < tok.vocab_size
    assert tok.vocab_size <= 384 and tok.fingerprint == make_tokenizer(data_cfg()).fingerprint


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    rng = np.random.default_rng(0)
    words = [*TEXT.split(), "rotary", "embedding", "attention", "sequence", "length", "generalization"]
    for i in range(6):
        (root / f"doc{i}.txt").write_text("\n".join(" ".join(rng.choice(words, size=12)) for _ in range(40)))
    path = train_tokenizer(str(root / "doc*.txt"), 320, str(root / "out"))
    return root, path


def test_trained_bpe_round_trips_and_compresses(trained):
    _, path = trained
    tok = make_tokenizer(data_cfg(path))
    assert tok.vocab_size == 320
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    for text in (TEXT, "unseen bytes: \x00\x7f 漢字 🙂", ""):
        assert tok.decode(tok.encode(text)) == text
    assert len(tok.encode("attention sequence length")) < len(b"attention sequence length")
    assert tok.fingerprint.startswith("hf-")


def test_tokenizer_json_specials_from_file(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    tok.add_special_tokens(["<|endoftext|>"])  # GPT-2 style: one token serves as bos, eos and pad
    tok.save(str(tmp_path / "tokenizer.json"))
    t = make_tokenizer(data_cfg(str(tmp_path)))  # a directory holding tokenizer.json works too
    assert t.bos_id == t.eos_id == t.pad_id == 0
    bare = Tokenizer(models.BPE())
    bare.save(str(tmp_path / "bare.json"))
    with pytest.raises(ConfigError, match="no BOS/EOS"):
        make_tokenizer(data_cfg(str(tmp_path / "bare.json")))
    with pytest.raises(ConfigError, match="does not exist"):
        make_tokenizer(data_cfg(str(tmp_path / "missing.json")))


def test_tokenizer_cli(tmp_path, capsys, trained):
    root, _ = trained
    assert (
        tokenizer_main(["train", "--input", str(root / "doc*.txt"), "--vocab-size", "300", "--out", str(tmp_path)]) == 0
    )
    assert "vocab_size 300" in capsys.readouterr().out
    assert tokenizer_main(["train", "--input", str(tmp_path / "none*.txt"), "--vocab-size", "300", "--out", "x"]) == 2
    assert tokenizer_main(["train", "--input", str(root / "doc*.txt"), "--vocab-size", "100", "--out", "x"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 2 and "matches no files" in err and "Traceback" not in err


def corpus_cfg(tmp_path, n=40):
    path = tmp_path / "c.jsonl"
    with open(path, "wb") as f:
        for i in range(n):
            f.write(json.dumps({"text": f"document {i} " + "words " * (i % 7)}).encode() + b"\n")
        f.write(b'{"text": ""}\n{"text": "bad \xff"}\n')
    cfg = base_config()
    cfg.data.source, cfg.data.path, cfg.data.eval_fraction = "jsonl", str(path), 0.1
    cfg.train.global_batch_size, cfg.train.seq_len = 4, 23
    return validate(cfg)


@pytest.mark.parametrize("workers", [1, 2])
def test_prepare_then_train_reads_the_same_tokens(tmp_path, workers):
    cfg = corpus_cfg(tmp_path)
    out = tmp_path / "prepared"
    m = prepare(cfg, str(out), num_workers=workers, progress=False)
    assert m["num_documents"] == 41 and m["empty_documents"] == 1 and m["invalid_utf8_documents"] == 1
    assert m["tokenizer"] == "byte-v1" and m == read_manifest(str(out)) and len(m["shards"]) == workers
    assert m["num_tokens"] == sum(s["num_tokens"] for s in m["shards"])
    raw = make_iterator(cfg, "eval", process_index=0, process_count=1)  # raw text, unshuffled
    prep_cfg = base_config()
    prep_cfg.update_from_flattened_dict({"data.source": "prepared", "data.path": str(out), "data.eval_fraction": 0.1})
    prep_cfg.train.global_batch_size, prep_cfg.train.seq_len = 4, 23
    prepared = make_iterator(validate(prep_cfg), "eval", process_index=0, process_count=1)
    # The empty document is skipped in the shards, so the hash split is over other indices;
    # compare the train streams' token multiset over one epoch instead of batch by batch.
    assert next(raw)["inputs"].shape == next(prepared)["inputs"].shape == (4, 23)
    prep_cfg.data.eval_fraction = cfg.data.eval_fraction = 0.0
    prep_cfg.data.shuffle = cfg.data.shuffle = False
    a = next(make_iterator(cfg, process_index=0, process_count=1))
    b = next(make_iterator(prep_cfg, process_index=0, process_count=1))
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


def test_prepared_shards_refuse_another_tokenizer(tmp_path, trained):
    cfg = corpus_cfg(tmp_path)
    prepare(cfg, str(tmp_path / "p"), num_workers=1, progress=False)
    cfg.data.source, cfg.data.path, cfg.data.tokenizer = "prepared", str(tmp_path / "p"), trained[1]
    with pytest.raises(ConfigError, match="prepared with tokenizer"):
        make_iterator(cfg, process_index=0, process_count=1)


def test_prepare_cli(tmp_path, capsys):
    cfg_file = tmp_path / "cfg.py"
    cfg_file.write_text("from nopejax.config import base_config\n\ndef get_config():\n    return base_config()\n")
    corpus_cfg(tmp_path)
    args = ["--config", str(cfg_file), "--config.data.source=jsonl", f"--config.data.path={tmp_path / 'c.jsonl'}"]
    assert prepare_main([*args, "--out", str(tmp_path / "o"), "--no-progress", "--workers", "1"]) == 0
    assert "41 documents" in capsys.readouterr().out
    assert prepare_main([*args, "--out", str(tmp_path / "o")]) == 2  # not empty
    assert prepare_main(["--config.data.source=jsonl", "--config.data.path=/nonexistent/*.jsonl", "--out", "x"]) == 2
    assert prepare_main(["--config.data.nope=1", "--out", "x"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 3 and "Traceback" not in err and "nonexistent" in err
