"""HF-ready export: tokenizer files beside the weights, AutoTokenizer and pipeline on the export,
and import-hf reading the tokenizer back, for a byte-tokenizer run and a BPE-tokenizer run."""

import json
import pathlib

import numpy as np
import pytest
import transformers
from configs_loader import ROOT
from tokenizers import Tokenizer

from nopejax import cli, config, hf, validation
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
    assert tok(MIXED)["input_ids"] == [tok.bos_token_id, *ids]  # BOS first, as the run trained (data.add_bos)
    assert tok(MIXED, add_special_tokens=False)["input_ids"] == ids
    assert tok.decode(ids) == MIXED
    if kind == "byte":
        assert max(ids) < 256 and len(ids) == len(MIXED.encode())  # one id per byte, the byte itself
        assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (256, 257, 258)
        assert tok.decode([257, *ids, 258, 256], skip_special_tokens=True) == MIXED
    else:
        exported, original = (json.loads(pathlib.Path(p).read_text()) for p in (out / "tokenizer.json", tokenizer_json))
        assert {**exported, "post_processor": None} == {**original, "post_processor": None}  # only the BOS rule added
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
        copied, trained = (json.loads(pathlib.Path(p).read_text()) for p in (spec, tokenizer_json))
        assert {**copied, "post_processor": None} == {**trained, "post_processor": None}  # the export's BOS rule


@pytest.mark.parametrize("prompt", ["The causal mask", MIXED])
def test_pipeline_greedy_reproduces_nopejax_generate_token_for_token(export, prompt, capsys):
    """pipeline("text-generation") on the export, with nothing prepended by hand, feeds the model the ids
    `nopejax generate` feeds it (BOS first, as the run trained) and continues them with the same tokens."""
    _, _, _, out, root = export
    capsys.readouterr()
    assert cli.main(["generate", "--workdir", str(root / "run"), "--prompt", prompt, "--max-new-tokens", "12",
                     "--json"]) == 0  # fmt: skip
    ours = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    generate = transformers.pipeline("text-generation", model=str(out), device="cpu")
    theirs = generate(prompt, max_new_tokens=12, do_sample=False, return_tensors=True)[0]["generated_token_ids"]
    theirs = [int(i) for i in theirs]
    assert ours["prompt_ids"][0] == json.loads((out / "config.json").read_text())["bos_token_id"]
    assert theirs == ours["prompt_ids"] + ours["completion_ids"]


def test_export_and_generate_refuse_overrides_they_do_not_use(export, capsys):
    _, _, _, _, root = export
    run = str(root / "run")
    for argv in (["export", "--workdir", run, "--out", str(root / "unused"), "--config.model.d_model=64"],
                 ["generate", "--workdir", run, "--prompt", "x", "--config.model.hf_family=llama"]):  # fmt: skip
        capsys.readouterr()
        assert cli.main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "--config.model." in err and "checkpoint" in err, err
    assert not (root / "unused").exists()


def test_export_to_another_family_is_used_or_refused_with_the_reason(export, tmp_path, capsys):
    """--config.model.hf_family picks the format: the 2-layer tiny run has no NoPE layer, so Llama holds
    it and is written; Cohere2's blocks are parallel, so it is refused naming that, before anything is written."""
    _, _, _, _, root = export
    run = str(root / "run")
    assert (
        cli.main(["export", "--workdir", run, "--out", str(tmp_path / "llama"), "--config.model.hf_family=llama"]) == 0
    )
    assert json.loads((tmp_path / "llama" / "config.json").read_text())["model_type"] == "llama"
    capsys.readouterr()
    argv = ["export", "--workdir", run, "--out", str(tmp_path / "cohere2"), "--config.model.hf_family=cohere2"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "model.block" in err and "Cohere2" in err and not (tmp_path / "cohere2").exists()


def test_train_continues_an_import_with_only_the_workdir(export, capsys):
    """import-hf writes the imported config with its step-0 checkpoint; `nopejax train --workdir` then
    trains that model from those weights (no --config, whose shape would not match), overrides applying."""
    _, _, _, out, root = export
    workdir = root / "continued"
    assert cli.main(["import-hf", str(out), "--workdir", str(workdir)]) == 0
    imported = json.loads((workdir / "config.json").read_text())
    assert cli.main(["train", "--workdir", str(workdir), "--config.train.steps=2", "--config.train.global_batch_size=8",
                     "--config.train.seq_len=32", "--config.train.eval_every=0", "--no-progress"]) == 0  # fmt: skip
    saved = json.loads((workdir / "config.json").read_text())
    assert saved["model"] == imported["model"] and saved["train"]["steps"] == 2
    # step 0 was restored: a checkpoint that cannot be read is renamed to 0.damaged-* and training starts fresh
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["0", "2"]


SHIPPED = sorted(
    str(p.relative_to(ROOT))
    for p in [*(ROOT / "configs").glob("*.py"), *(ROOT / "experiments").rglob("*.py")]
    if "def get_config" in p.read_text()  # experiments/*/recipes.py is a helper the experiment configs import
)


# Shipped configs whose model no HF family holds, and the field export names when it refuses them: Gated
# DeltaNet beside plain pre-norm attention without QK-norm (OLMo Hybrid's attention has post-norms and a
# whole-projection QK-norm, Qwen3-Next's an output gate and 1 + w norms). The length study's GDN arms keep
# the other arms' attention, so they train a model of their own; export names the GDN layer and the families.
NO_FAMILY = {
    path: "model.layer_types"
    for path in SHIPPED
    if path.endswith("gdn_hybrid.py") or path.endswith("gdn_hybrid_3b_long.py")
}


@pytest.mark.parametrize("path", SHIPPED)
def test_every_shipped_config_exports_to_its_family(path):
    """Every config the project ships trains a model its model.hf_family can hold, so `nopejax export`
    works on every run made from one (the check export runs before reading any weight); those of
    NO_FAMILY are refused by export in one line naming the field, before any weight is read."""
    m = validation.validate(config.load_config(str(ROOT / path))).model
    if path in NO_FAMILY:
        with pytest.raises(config.ConfigError, match=NO_FAMILY[path].replace(".", r"\.")):
            hf.check_exportable(m)
        return
    hf.check_exportable(m)
    assert hf.hf_config(m)["model_type"] == hf.FAMILIES[m.hf_family].model_type
