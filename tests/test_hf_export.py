"""HF-ready export: tokenizer files beside the weights, AutoTokenizer and pipeline on the export,
and import-hf reading the tokenizer back, for a byte-tokenizer run and a BPE-tokenizer run."""

import json
import pathlib

import numpy as np
import pytest
import transformers
from configs_loader import ROOT
from tokenizers import Tokenizer

from nopejax import cli
from nopejax.data import train_tokenizer

# ASCII, accents, CJK, emoji (a ZWJ sequence and a skin tone), controls, and a special's spelling
MIXED = "Hello, wörld! Ça va? naïve façade — 日本語のテキスト, 한국어 😀👩‍💻👍🏽 \t\n<|bos|> end"
TINY = ["--config", f"{ROOT}/configs/tiny.py", "--config.model.num_layers=2", "--config.train.steps=2",
        "--config.train.global_batch_size=8", "--config.train.seq_len=32", "--config.train.eval_every=0",
        "--no-progress"]  # fmt: skip


@pytest.fixture(scope="module", params=["byte", "bpe"])
def export(request, tmp_path_factory):
    """(kind, nopejax ids of MIXED by an independent route, tokenizer.json used, export dir, workdir)."""
    root = tmp_path_factory.mktemp(request.param)
    overrides = []
    if request.param == "bpe":
        for i in range(4):
            (root / f"doc{i}.txt").write_text(f"rotary attention layers {i} " * 50 + MIXED)
        tokenizer_json = train_tokenizer(str(root / "doc*.txt"), 300, str(root / "tok"))
        overrides = [f"--config.data.tokenizer={tokenizer_json}", "--config.data.source=text",
                     f"--config.data.path={root}/doc*.txt", "--config.data.eval_fraction=0"]  # fmt: skip
        ids = Tokenizer.from_file(tokenizer_json).encode(MIXED, add_special_tokens=False).ids
    else:
        tokenizer_json, ids = None, list(MIXED.encode("utf-8"))
    assert cli.main(["train", "--workdir", str(root / "run"), *TINY, *overrides]) == 0
    assert cli.main(["export", "--workdir", str(root / "run"), "--out", str(root / "hf")]) == 0
    return request.param, ids, tokenizer_json, root / "hf", root


def test_auto_tokenizer_encodes_and_decodes_as_nopejax(export):
    kind, ids, tokenizer_json, out, _ = export
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / name).is_file()
    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    assert tok(MIXED)["input_ids"] == ids
    assert tok.decode(ids) == MIXED
    if kind == "byte":
        assert max(ids) < 256 and len(ids) == len(MIXED.encode())  # one id per byte, the byte itself
        assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (256, 257, 258)
        assert tok.decode([257, *ids, 258, 256], skip_special_tokens=True) == MIXED
    else:
        assert (out / "tokenizer.json").read_bytes() == pathlib.Path(tokenizer_json).read_bytes()  # copied as is
        assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    hf_config = json.loads((out / "config.json").read_text())
    generation = json.loads((out / "generation_config.json").read_text())
    for key, value in (("bos_token_id", tok.bos_token_id), ("eos_token_id", tok.eos_token_id),
                       ("pad_token_id", tok.pad_token_id)):  # fmt: skip
        assert hf_config[key] == generation[key] == value


def test_text_generation_pipeline_runs_on_the_export(export):
    _, _, _, out, _ = export
    generate = transformers.pipeline("text-generation", model=str(out), device="cpu")
    result = generate("The causal mask", max_new_tokens=6, do_sample=False)[0]["generated_text"]
    assert result.startswith("The causal mask") and len(result) > len("The causal mask")
    # the same greedy continuation straight from the model, through the tokenizer: the pipeline adds nothing
    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    model = transformers.AutoModelForCausalLM.from_pretrained(str(out))
    prompt = tok("The causal mask", return_tensors="pt")
    ids = model.generate(**prompt, max_new_tokens=6, do_sample=False)[0]
    assert result == tok.decode(ids, skip_special_tokens=True)
    assert np.all(ids.numpy()[: prompt["input_ids"].shape[1]] == prompt["input_ids"][0].numpy())


def test_import_hf_reads_the_tokenizer_into_the_run_config(export):
    kind, _, tokenizer_json, out, root = export
    workdir = root / "imported"
    assert cli.main(["import-hf", str(out), "--workdir", str(workdir)]) == 0
    spec = json.loads((workdir / "config.json").read_text())["data"]["tokenizer"]
    if kind == "byte":
        assert spec == "byte"  # recognised as nopejax's byte serialization
    else:  # a copy inside the workdir, identical to the run's tokenizer
        assert spec.startswith(str(workdir))
        assert pathlib.Path(spec).read_bytes() == pathlib.Path(tokenizer_json).read_bytes()
