"""`nopejax eval-length` on tiny trained checkpoints: files, rows, and numbers recomputed directly."""

import csv
import json
import re
import shutil

import configs_loader
import numpy as np
import pytest

from experiments.length_generalization import report
from nopejax import checkpoint, cli, config, data, eval_length, layers, train, validation
from nopejax.data.corpus import default_corpus_path
from nopejax.data.pipeline import split_indices
from nopejax.data.sources import JsonlSource

TRAIN_LEN, LENGTHS, BUCKET = 24, (24, 56), 24  # 56 = 2 buckets + a partial third (48-55)


def tiny_cfg(**data_fields):
    cfg = config.base_config()
    cfg.model.update(d_model=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, d_ff=96)
    cfg.model.update(dtype="float32", no_rope_layers=(1, 0))  # one RoPE and one NoPE layer
    cfg.train.update(steps=3, global_batch_size=8, seq_len=TRAIN_LEN, log_every=1, eval_every=0)
    cfg.optim.update(warmup_steps=1, decay_steps=1)
    cfg.checkpoint.async_save = False
    cfg.data.update(**data_fields)
    return validation.validate(cfg)


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("text_run"))
    train.run(tiny_cfg(), workdir, progress=False)
    return workdir


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def eval_stream(cfg) -> tuple[np.ndarray, int]:
    """The eval split as one token stream, rebuilt from the documents without the packer."""
    source = JsonlSource([default_corpus_path()], "text")
    tok = data.make_tokenizer(cfg.data)
    docs = [source[int(i)] for i in split_indices(len(source), cfg.data.eval_fraction, "eval")]
    return np.concatenate([[tok.bos_id, *tok.encode(d), tok.eos_id] for d in docs]).astype(np.int32), tok.eos_id


def test_text_run_writes_csv_table_and_plot(text_run):
    rc = cli.main(["eval-length", "--workdir", text_run, "--lengths", "56,24", "--batches", "1"])
    assert rc == 0
    out = f"{text_run}/eval_length"
    rows = read_csv(f"{out}/loss_by_position.csv")
    got = [(int(r["length"]), r["positions"]) for r in rows]
    assert got == [(24, "0-23"), (24, "all"), (56, "0-23"), (56, "24-47"), (56, "48-55"), (56, "all")]
    assert {r["run"] for r in rows} == {"text_run0"} and {r["step"] for r in rows} == {"3"}
    assert all(np.isfinite(float(r["loss"])) and int(r["tokens"]) > 0 for r in rows)
    with open(f"{out}/loss_by_position.md") as f:
        table = f.read()
    assert "| text_run0 | 24 |" in table and "| text_run0 | 56 |" in table and "pos 48-55" in table
    with open(f"{out}/loss_by_position.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_loss_per_bucket_equals_direct_computation(text_run):
    """Windows of the continuous eval stream, positions 0..L-1, no segments, EOS targets unscored."""
    res = eval_length.evaluate([text_run], list(LENGTHS), batches=1, bucket=BUCKET, progress=False)
    result = res["results"][0]
    module = checkpoint.load_model(text_run)
    cfg = checkpoint.read_config(*checkpoint.find_checkpoint(text_run))
    stream, eos = eval_stream(cfg)
    L = 56
    budget = 1 * cfg.train.global_batch_size * max(LENGTHS)  # batches * B * longest: the text of every length
    windows = -(-budget // L)
    inputs_BS = stream[: windows * L].reshape(windows, L)
    targets_BS = stream[1 : windows * L + 1].reshape(windows, L)
    logits_BSV = np.asarray(module(inputs_BS), np.float64)
    log_z_BS = np.log(np.exp(logits_BSV - logits_BSV.max(-1, keepdims=True)).sum(-1)) + logits_BSV.max(-1)
    loss_BS = log_z_BS - np.take_along_axis(logits_BSV, targets_BS[..., None], -1)[..., 0]
    mask_BS = inputs_BS != eos  # a document's last token has no next token of its own
    for start, end in [(0, 24), (24, 48), (48, 56), (0, 56)]:
        want = loss_BS[:, start:end][mask_BS[:, start:end]].mean()
        got, tokens = result.mean(L, start, end)
        assert tokens == mask_BS[:, start:end].sum()
        np.testing.assert_allclose(got, want, rtol=1e-5)


def test_compare_puts_both_runs_in_one_set_of_files(text_run, tmp_path):
    other = str(tmp_path / "same_weights")
    shutil.copytree(f"{text_run}/checkpoints", f"{other}/checkpoints")
    rc = cli.main(["eval-length", "--workdir", text_run, "--lengths", "24", "--batches", "1", "--compare", other])
    assert rc == 0
    rows = read_csv(f"{text_run}/eval_length/loss_by_position.csv")
    by_run = {r["run"]: r["loss"] for r in rows if r["positions"] == "all"}
    assert set(by_run) == {"text_run0", "same_weights"}
    assert by_run["text_run0"] == by_run["same_weights"]


def test_rope_scaling_option_changes_only_what_rope_layers_see(text_run):
    plain = eval_length.evaluate([text_run], [56], batches=1, progress=False)["results"][0]
    yarn = {"rope_type": "yarn", "factor": 4.0}  # original_max_position_embeddings: the run's seq_len
    scaled = eval_length.evaluate([text_run], [56], batches=1, rope_scaling=yarn, progress=False)["results"][0]
    assert scaled.label == "text_run0 (yarn x4.0)"
    assert abs(plain.mean(56)[0] - scaled.mean(56)[0]) > 1e-6  # layer 0 is a RoPE layer
    cfg = eval_length.eval_config(checkpoint.read_config(*checkpoint.find_checkpoint(text_run)), yarn)
    assert cfg.model.rope_scaling["original_max_position_embeddings"] == TRAIN_LEN
    assert cfg.model.dtype == "float32" and cfg.model.attention_impl == "xla"


def test_user_mistakes_are_one_line_errors(text_run, capsys):
    assert cli.main(["eval-length", "--workdir", text_run, "--lengths", "12,x"]) == 2
    assert "--lengths" in capsys.readouterr().err
    assert cli.main(["eval-length", "--workdir", text_run, "--rope-scaling", "{yarn"]) == 2
    assert "--rope-scaling" in capsys.readouterr().err
    assert cli.main(["eval-length", "--workdir", text_run, "--rope-scaling", '{"rope_type": "ntk", "factor": 2}']) == 2
    assert "rope_scaling" in capsys.readouterr().err


def test_copy_task_reports_exact_match_per_input_length(tmp_path):
    workdir = str(tmp_path / "copy_run")
    lengths = dict(task_train_min_len=1, task_train_max_len=3, task_test_min_len=4, task_test_max_len=6)
    cfg = tiny_cfg(source="copy", **lengths)
    cfg.train.seq_len = 15  # 6 + 6 + BOS, '=', EOS
    train.run(cfg, workdir, progress=False)
    assert cli.main(["eval-length", "--workdir", workdir, "--batches", "1"]) == 0
    rows = read_csv(f"{workdir}/eval_length/loss_by_position.csv")
    assert [int(r["input_length"]) for r in rows] == [1, 2, 3, 4, 5, 6]
    assert all(r["task"] == "copy" and r["train_max_length"] == "3" and r["examples"] == "8" for r in rows)
    assert all(0 <= float(r["exact_match"]) <= 1 and float(r["answer_loss"]) > 0 for r in rows)
    with open(f"{workdir}/eval_length/loss_by_position.md") as f:
        assert "exact match, lengths > 3" in f.read()
    # exact match and token accuracy from the definition: argmax of the logits at every answer position
    run_cfg = checkpoint.read_config(*checkpoint.find_checkpoint(workdir))
    batch = eval_length.task_batch(run_cfg, 5, 8)
    predicted_BS = np.argmax(np.asarray(checkpoint.load_model(workdir)(batch["inputs"])), axis=-1)
    answer_BS = batch["loss_mask"] > 0
    right_BS = predicted_BS == batch["targets"]
    assert answer_BS.any(axis=1).all()
    want = np.mean([right_BS[b][answer_BS[b]].all() for b in range(len(right_BS))])
    assert float(rows[4]["exact_match"]) == pytest.approx(want)
    assert float(rows[4]["token_accuracy"]) == pytest.approx(right_BS[answer_BS].mean())


# The study's arms of a task differ in the layer pattern alone: the layers each pattern names
# (README), as (mixer, attention, rotates q and k) for the 4 layers of the recipe.
ATTN, NOPE, RECURRENT = ("attention", "full", True), ("attention", "full", False), ("full", False)
PATTERN_LAYERS = {
    "rope": [ATTN] * 4,
    "hybrid": [ATTN] * 3 + [NOPE],
    "nope": [NOPE] * 4,
    "local_global": [("attention", "sliding", True)] * 3 + [NOPE],
    "mamba2_hybrid": [("mamba2", *RECURRENT)] * 3 + [NOPE],
    "gdn_hybrid": [("gated_deltanet", *RECURRENT)] * 3 + [NOPE],
}
# the layer pattern, and the HF family its export follows from it
PATTERN_FIELDS = ("no_rope_layer_interval", "global_attention_interval", "sliding_window", "layer_types", "hf_family")
MIXER_PREFIXES = ("mamba_", "gdn_")  # the recurrent mixers' own sizes, set only by the arms that have them


def experiment_path(task, pattern):
    return configs_loader.ROOT / "experiments" / "length_generalization" / task / f"{pattern}.py"


@pytest.mark.parametrize("task", ["copy", "reverse", "passkey"])
def test_study_arms_differ_only_in_the_layer_pattern(task):
    """All 18 arm configs, without training: each validates, has its pattern's layers, and shares every
    other field with its task's other arms. Training and evaluating every arm (30 steps each) is the
    study runner's smoke run, `python -m experiments.length_generalization.run --quick`; the suite trains
    one arm per task below, and the recurrent hybrids (HYBRID_ARMS)."""
    assert set(PATTERN_LAYERS) == set(report.PATTERNS) == set(report.LABELS)
    cfgs = {pattern: config.load_config(str(experiment_path(task, pattern))) for pattern in PATTERN_LAYERS}
    for pattern, cfg in cfgs.items():
        specs = layers.layer_specs(validation.validate(cfg).model)
        assert [(s.mixer, s.attention, s.use_rope) for s in specs] == PATTERN_LAYERS[pattern], pattern
        if pattern == "local_global":  # shorter than the trained rows: only the global NoPE layer sees all of one
            assert 0 < specs[0].window < cfg.train.seq_len
        assert cfg.data.source == task
    rest = []
    for cfg in cfgs.values():
        d = cfg.to_dict()
        model = {k: v for k, v in d["model"].items() if k not in PATTERN_FIELDS and not k.startswith(MIXER_PREFIXES)}
        rest.append({**d, "model": model})
    assert all(r == rest[0] for r in rest[1:])


# One arm per task, each a different pattern, at the recipe's shapes.
EXPERIMENTS = [("copy", "hybrid"), ("reverse", "local_global"), ("passkey", "nope")]
# The recurrent hybrids, cut smaller (a recurrent layer compiles slowly on
# CPU): d_ff 32, copy inputs of 1-3 letters tested on 1-6, passkey rows at 128 only; the layers stay the arm's.
TINY = ["train.steps=3", "model.d_ff=32"]
TINY_TASK = {
    "copy": ["data.task_train_max_len=3", "data.task_test_min_len=4", "data.task_test_max_len=6", "train.seq_len=15"],
    "passkey": [],
}
# Each recurrent mixer on one task: the arms' configs differ only in the pattern (checked above for all).
HYBRID_ARMS = [("copy", "mamba2_hybrid"), ("passkey", "gdn_hybrid")]


@pytest.mark.parametrize("task,pattern", EXPERIMENTS + HYBRID_ARMS)
def test_experiment_config_trains_and_reports_per_length(task, pattern, tmp_path):
    """10 steps of the real recipe (batch cut to one row per device and microbatch), then `eval-length`
    reports every length; the recurrent hybrids train 3 steps at the smaller shapes above."""
    path = experiment_path(task, pattern)
    workdir = str(tmp_path / f"{task}_{pattern}")
    batch_rows = 8 * config.load_config(str(path)).train.grad_accum  # each microbatch split over the 8 test devices
    overrides = ["train.steps=10", f"train.global_batch_size={batch_rows}", "checkpoint.async_save=False"]
    tiny = (task, pattern) in HYBRID_ARMS
    if tiny:
        overrides += TINY + TINY_TASK[task]
    args = ["train", "--config", str(path), "--workdir", workdir, *(f"--config.{o}" for o in overrides)]
    assert cli.main(args) == 0
    passkey_lengths = (128,) if tiny else (128, 256)
    lengths = ",".join(map(str, passkey_lengths)) if task == "passkey" else "1"  # copy/reverse: the config's own
    assert cli.main(["eval-length", "--workdir", workdir, "--batches", "1", "--lengths", lengths]) == 0
    rows = read_csv(f"{workdir}/eval_length/loss_by_position.csv")
    if task == "passkey":
        assert [(int(r["length"]), float(r["depth"])) for r in rows] == [
            (n, d) for n in passkey_lengths for d in eval_length.PASSKEY_DEPTHS
        ]
        assert all(0 <= float(r["accuracy"]) <= 1 for r in rows)
    else:
        assert [int(r["input_length"]) for r in rows] == list(range(1, 7 if tiny else 41))
        assert all(0 <= float(r["exact_match"]) <= 1 and 0 <= float(r["token_accuracy"]) <= 1 for r in rows)


def fake_result(task, pattern, seed, score, **numbers):
    """A finished run's result.json as the study runner writes it, numbers chosen by the test."""
    return {"task": task, "pattern": pattern, "seed": seed, "steps": 30, "recipe_steps": 30, "train_seconds": 60,
            "eval_seconds": 5, "final_loss": 0.5, "in_distribution": score, "machine": "2 CPU cores (test)",
            "versions": "JAX test", **numbers}  # fmt: skip


def test_study_report_from_finished_runs_names_command_date_machine_versions(tmp_path, monkeypatch):
    """The report writer alone (no training): tables over seeds from the runs' result.json files, each
    section with its command, date, machine and versions, and nothing about which invocation ran what."""

    def copy_numbers(short, long):  # exact match `short` on input lengths 1-20, `long` on 21-40
        em = {str(n): short if n <= 20 else long for n in range(1, 41)}
        return {"exact_match": em, "token_accuracy": em, "answer_loss": {n: 0.1 for n in em}}

    passkey = [[n, d, 1.0 if n == 128 else 0.5] for n in (128, 256, 512, 1024) for d in (0.0, 0.5, 1.0)]
    text_numbers = {"mean": {"128": 2.0, "256": 2.5, "512": 3.0, "1024": 3.5}, "first": 2.0, "last": 4.0, "ratio": 2.0}
    runs = {
        "copy_rope_s0": fake_result("copy", "rope", 0, 1.0, **copy_numbers(1.0, 0.5)),
        "copy_rope_s1": fake_result("copy", "rope", 1, 0.96, **copy_numbers(0.96, 0.25)),
        "copy_nope_s0": fake_result("copy", "nope", 0, 0.5, **copy_numbers(0.5, 0.0)),  # not learned
        "passkey_nope_s0": fake_result("passkey", "nope", 0, 1.0, accuracy=passkey),
        "text_rope_s0": fake_result("text", "rope", 0, None, text=text_numbers),
    }
    runs["copy_rope_s1"].pop("machine")  # a run that did not record its machine
    for name, result in runs.items():
        (tmp_path / "runs" / name).mkdir(parents=True)
        (tmp_path / "runs" / name / "result.json").write_text(json.dumps(result))
    docs = tmp_path / "docs"
    monkeypatch.setattr("sys.argv", ["report", "--runs-dir", str(tmp_path / "runs"), "--docs", str(docs)])
    assert report.main() == 0
    text = (docs / "report.md").read_text()
    assert "invocation" not in text and "reused" not in text
    sections = text.split("\n## ")[1:]
    assert [s.split(" ")[0] for s in sections] == ["Copy", "Passkey", "Text", "Every"]
    command = "python -m experiments.length_generalization.run --seeds 0,1 --tasks copy,passkey,text"
    command += " --patterns rope,nope"
    for section in sections:
        assert f"- Command: `{command}`" in section
        assert re.search(r"^- Date: \d{4}-\d\d-\d\d \(the report; the runs finished \d{4}-\d\d-\d\d\)$", section, re.M)
        assert "- Machine: 2 CPU cores (test); not recorded, each run on one CPU core" in section
        assert "- Versions: JAX test\n" in section
    # all RoPE: 2 of 2 seeds learned; exact match 1-20 mean of 1.0 and 0.96, 21-25 of 0.5 and 0.25
    assert "| all RoPE | 2 of 2 | 0.980 [0.960-1.000] | 0.375 [0.250-0.500] | 0.375 [0.250-0.500] |" in text
    assert "| all NoPE | 0 of 1 | 0.500 | not meaningful (not learned) |" in text
    assert "| all NoPE | 1 of 1 | 1.000 | 0.500 | 0.500 | 0.500 |" in text  # passkey, by row length
    assert "| all RoPE | 1 | 2.000 | 2.500 | 3.000 | 3.500 | 2.000 | 4.000 | 2.00 |" in text
    for png in ("copy.png", "passkey.png", "text.png"):
        assert f"]({png})" in text and (docs / png).stat().st_size > 0
