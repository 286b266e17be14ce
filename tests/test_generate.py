"""KV-cache decoding: equal to transformers' generate, to full recomputation, reproducible sampling, CLI."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import nopejax
from nopejax import checkpoint, config, model, train, validation
from nopejax.config import ConfigError
from nopejax.data.tokenizer import BYTE_BOS, BYTE_EOS, ByteTokenizer
from nopejax.decode import SAMPLE_PROMPT, Sampling, encode_prompt, generate_ids, sample

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}
TEXT = (
    "The interpreter reads a line, runs it, and prints the result. A module is a file of definitions: "
    "import it to use them. Classes bundle data and functionality; each instance has its own attributes. "
    "Exceptions stop the normal flow; try and except catch them. Generators yield values one at a time. "
)
TEXT_IDS = encode_prompt(ByteTokenizer(), TEXT, add_bos=True)
B, S = 4, 64  # the training batch: TEXT cut into 4 rows of 64 tokens, each row at positions 0..63


def small_model_cfg(**kw):
    m = config.base_config().model
    # R R N R R: NoPE every 3rd layer, odd sizes, GQA 6:2, yarn-scaled RoPE layers
    m.update(vocab_size=384, d_model=60, num_layers=5, num_heads=6, num_kv_heads=2, head_dim=10, d_ff=70,
             no_rope_layer_interval=3, rope_theta=500.0, rope_scaling=YARN, max_position_embeddings=256,
             dtype="float32", scan_layers=False)  # fmt: skip
    m.update(**kw)
    return m


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A real (short) training: 150 steps on one batch of text, memorized, so greedy decoding
    writes varied text with clear argmax margins; saved as a run's checkpoint for the CLI."""
    cfg = config.base_config()
    cfg.model = small_model_cfg()
    cfg.train.update(steps=150, global_batch_size=B, seq_len=S)
    cfg.optim.update(lr=1e-2, warmup_steps=4, decay_steps=10)
    rows = np.stack([TEXT_IDS[i * S : i * S + S + 1] for i in range(B)])
    ones = np.ones((B, S), np.int32)
    batch = dict(inputs=rows[:, :-1], targets=rows[:, 1:], segment_ids=ones, positions=np.cumsum(ones, 1) - 1,
                 loss_mask=ones.astype(np.float32))  # fmt: skip
    s = train.setup(cfg, jax.devices()[:1])
    state = train.init_state(s)
    step, _ = train.compile_fns(s)
    with jax.set_mesh(s.mesh):
        batch = {k: jax.device_put(batch[k], s.batch_sharding) for k in train.BATCH_KEYS}
        for _ in range(cfg.train.steps):
            state, out = step(state, batch)
    assert float(out["loss"]) < 0.3  # memorized: the model is sure of its next token
    workdir = str(tmp_path_factory.mktemp("gen") / "run")
    checkpoint.write_run_config(workdir, s.cfg)
    ckpt = checkpoint.Checkpointer(workdir, s.cfg)
    ckpt.save(cfg.train.steps, state, force=True)
    ckpt.close()
    return workdir


@pytest.fixture(scope="module")
def trained(run_dir):
    return nopejax.load_model(run_dir)


N = 40  # new tokens in every test on the trained model, and prompts of <= 16 tokens: one compile serves many


def prompt_ids(text="The interp"):
    return encode_prompt(ByteTokenizer(), text, add_bos=True)


def test_training_logs_greedy_samples(tmp_path):
    """train.sample_every: text records in metrics.jsonl, from params sharded over fsdp."""
    cfg = config.base_config()
    cfg.model = small_model_cfg(num_layers=2, no_rope_layer_interval=2, rope_scaling=None)
    cfg.mesh.update(fsdp=2)
    cfg.train.update(steps=2, global_batch_size=8, seq_len=32, eval_every=0, log_every=1, sample_every=1)
    cfg.optim.update(warmup_steps=1, decay_steps=1)
    train.run(validation.validate(cfg), str(tmp_path), progress=False)
    with open(tmp_path / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    samples = [r for r in records if "sample" in r]
    assert [r["step"] for r in samples] == [1, 2]
    assert all(r["sample"].startswith(SAMPLE_PROMPT) for r in samples)
    assert [r["step"] for r in records if "loss" in r] == [1, 2]
    assert os.listdir(tmp_path / "tensorboard")


def test_greedy_equals_transformers_generate(trained, tmp_path):
    nopejax.to_hf(trained, str(tmp_path / "hf"))
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).float().eval()
    prompt = prompt_ids()
    ours = nopejax.generate(trained, prompt, max_new_tokens=N)
    with torch.no_grad():
        theirs = hf_model.generate(torch.tensor([prompt.tolist()]), attention_mask=torch.ones(1, len(prompt)),
                                   max_new_tokens=N, do_sample=False, pad_token_id=0)  # fmt: skip
    assert ours.shape == (N,)
    np.testing.assert_array_equal(ours, theirs[0, len(prompt) :].numpy())
    assert len(set(ours.tolist())) > 5  # a trained model writes text, not one repeated token

    # a batch of different lengths: left-padded, positions restart at each row's first token
    prompts = [TEXT_IDS[S : S + 9], prompt_ids("The interpre")]
    ours = nopejax.generate(trained, prompts, max_new_tokens=N, pad_id=0)
    L = max(map(len, prompts))
    padded = torch.tensor([[0] * (L - len(p)) + p.tolist() for p in prompts])
    mask = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        theirs = hf_model.generate(padded, attention_mask=mask, max_new_tokens=N, do_sample=False, pad_token_id=0)
    np.testing.assert_array_equal(ours, theirs[:, L:].numpy())


def random_model(**kw):
    return model.create(small_model_cfg(init_std=0.2, **kw), seed=3)


@pytest.mark.parametrize(
    "variant",
    ["trained", "scanned_linear", "unrolled_no_scaling", "all_nope_mha", "sliding_partial_local", "chunked_l2_temp"],
)
def test_kv_cache_equals_full_recomputation(trained, variant):
    module = {
        "trained": lambda: trained,
        "scanned_linear": lambda: random_model(scan_layers=True, rope_scaling={"rope_type": "linear", "factor": 2.0}),
        "unrolled_no_scaling": lambda: random_model(scan_layers=False, rope_scaling=None, no_rope_layer_interval=4),
        "all_nope_mha": lambda: random_model(no_rope_layers=(0,) * 5, num_kv_heads=6),
        # RoPE layers local (window 7 < prompt + new tokens), partial interleaved RoPE with its own
        # base, RMS QK-norm; NoPE layers global
        "sliding_partial_local": lambda: random_model(
            scan_layers=True,
            global_attention_interval=3,
            sliding_window=7,
            partial_rotary_factor=0.4,
            rope_layout="interleaved",
            rope_theta_local=50.0,
            qk_norm="rms",
        ),
        # Llama 4's recipe: chunked RoPE layers with L2 QK-norm, global NoPE layers with a query temperature
        "chunked_l2_temp": lambda: random_model(
            global_attention_interval=3, attention_chunk_size=8, qk_norm="l2", nope_temperature=(4.0, 0.3)
        ),
    }[variant]()
    prompt = prompt_ids("Classes ")
    ids, logits = nopejax.generate(module, prompt, max_new_tokens=N, return_logits=True)
    tokens = np.concatenate([prompt, ids])
    full = np.asarray(module(jnp.asarray(tokens[None])))[0]
    # the logits that chose token i are those of position len(prompt) - 1 + i, recomputed from scratch
    expected = full[len(prompt) - 1 : -1]
    scale = np.abs(expected).max()
    np.testing.assert_allclose(logits, expected, atol=1e-5 * scale, rtol=0)
    np.testing.assert_array_equal(ids, expected.argmax(-1))


def test_chunked_prefill_equals_full_recomputation():
    """A prompt longer than the prefill chunk (70 tokens, chunks of 32): left-padded to 96, 3 chunks."""
    module = random_model(scan_layers=True)
    prompt = TEXT_IDS[:70]
    graphdef, params = model.split(module)
    ids, logits = generate_ids(graphdef, params, [prompt], 12, return_logits=True, prefill_chunk=32)
    full = np.asarray(module(jnp.asarray(np.concatenate([prompt, ids[0]])[None])))[0]
    expected = full[len(prompt) - 1 : -1]
    np.testing.assert_allclose(logits[0], expected, atol=1e-5 * np.abs(expected).max(), rtol=0)
    np.testing.assert_array_equal(ids[0], expected.argmax(-1))


def test_stops_at_eos_and_pads_finished_rows(trained):
    prompts = [prompt_ids(), TEXT_IDS[2 * S : 2 * S + 5]]
    free = [nopejax.generate(trained, p, max_new_tokens=N) for p in prompts]
    eos = int(free[0][7])  # some token the first row writes: call it EOS

    def until_eos(ids):
        hits = np.flatnonzero(ids == eos)
        return ids[: hits[0] + 1] if len(hits) else ids

    np.testing.assert_array_equal(nopejax.generate(trained, prompts[0], N, eos_id=eos), until_eos(free[0]))
    batch = nopejax.generate(trained, prompts, max_new_tokens=N, eos_id=eos, pad_id=BYTE_EOS)
    rows = [until_eos(ids) for ids in free]
    assert batch.shape == (2, max(map(len, rows)))  # the loop ran until the last row stopped
    for row, expected in zip(batch, rows):
        np.testing.assert_array_equal(row[: len(expected)], expected)
        assert (row[len(expected) :] == BYTE_EOS).all()


def test_sampling_is_reproducible_and_seeded(trained):
    prompt = prompt_ids()
    kw = dict(max_new_tokens=N, temperature=3.0, top_k=40, top_p=0.98)  # flat enough to differ by seed
    a = nopejax.generate(trained, prompt, seed=0, **kw)
    np.testing.assert_array_equal(a, nopejax.generate(trained, prompt, seed=0, **kw))
    assert not np.array_equal(a, nopejax.generate(trained, prompt, seed=1, **kw))
    greedy = nopejax.generate(trained, prompt, max_new_tokens=N)
    assert not np.array_equal(a, greedy)
    # a filter that leaves one candidate is greedy, whatever the seed and temperature
    np.testing.assert_array_equal(nopejax.generate(trained, prompt, N, temperature=2.0, top_k=1, seed=5), greedy)
    np.testing.assert_array_equal(nopejax.generate(trained, prompt, N, temperature=2.0, top_p=1e-6, seed=5), greedy)


def test_top_k_and_top_p_keep_the_right_tokens():
    probs = np.array([0.05, 0.5, 0.0, 0.3, 0.15], np.float32)
    logits = jnp.asarray(np.log(np.maximum(probs, 1e-9))[None].repeat(4000, 0))
    key = jax.random.key(0)
    # top-p 0.7: 0.5 alone is short of 0.7, so token 3 (0.3) joins; token 4 (0.15) does not
    seen = set(np.asarray(sample(logits, key, Sampling(1.0, 0, 0.7), greedy=False)).tolist())
    assert seen == {1, 3}
    seen = set(np.asarray(sample(logits, key, Sampling(1.0, 3, 1.0), greedy=False)).tolist())
    assert seen == {1, 3, 4}
    # top-p applies to what top-k kept: of {1: 0.5, 3: 0.3} (renormalised 0.625, 0.375), 0.6 keeps token 1
    seen = set(np.asarray(sample(logits, key, Sampling(1.0, 2, 0.6), greedy=False)).tolist())
    assert seen == {1}
    freq = np.bincount(np.asarray(sample(logits, key, Sampling(1.0, 0, 1.0), greedy=False)), minlength=5) / 4000
    np.testing.assert_allclose(freq, probs, atol=0.03)


def test_bad_settings_are_config_errors():
    with pytest.raises(ConfigError, match="--top-p"):
        nopejax.generate(random_model(), prompt_ids(), top_p=1.5)
    with pytest.raises(ConfigError, match="--max-new-tokens"):
        nopejax.generate(random_model(), prompt_ids(), max_new_tokens=0)
    cfg = config.base_config()
    cfg.train.sample_every = -1
    with pytest.raises(ConfigError, match=r"train\.sample_every"):
        validation.validate(cfg)


def nopejax_cli(*args):
    env = {**os.environ, "XLA_FLAGS": os.environ["NOPEJAX_TEST_XLA_FLAGS"], "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-m", "nopejax.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)  # fmt: skip


def test_cli_generate_json(run_dir, trained):
    proc = nopejax_cli("generate", "--workdir", run_dir, "--prompt", "The interp", "--max-new-tokens", str(N),
                       "--json")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["prompt"] == "The interp"
    assert out["prompt_ids"] == prompt_ids().tolist() and out["prompt_ids"][0] == BYTE_BOS
    expected = nopejax.generate(trained, prompt_ids(), N, eos_id=BYTE_EOS)
    assert out["completion_ids"] == expected.tolist()
    assert out["completion"] == ByteTokenizer().decode(expected)
    assert proc.stdout.startswith(out["completion"])  # the plain print comes first

    bad = nopejax_cli("generate", "--workdir", run_dir, "--prompt", "x", "--top-p", "1.5")
    assert bad.returncode == 2 and "--top-p" in bad.stderr and "Traceback" not in bad.stderr
