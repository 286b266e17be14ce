"""Decode speed: `nopejax.generate` vs transformers' `generate` on the same exported model.

    python benchmarks/generate.py [--prompts 64,1024] [--new-tokens 64] [--rounds 3] [--workdir RUN]

The model is configs/tiny.py's (2.4M parameters, RoPE/NoPE mix, float32), randomly initialised
unless --workdir names a run; it is exported with `nopejax.to_hf` and loaded with
`AutoModelForCausalLM`. Both sides decode greedily from the same prompt ids, with no EOS, so
both write exactly N tokens. Prefill (prompt -> first token) and decode (the other N - 1
tokens) are timed apart: for nopejax around its two jitted programs (`prefill`, then `decode`,
each waited for), for transformers with a streamer that stamps each token as `generate` emits
it. Calls alternate between the two and the median of --rounds is reported. Goal: nopejax >=
transformers, and decode speed flat in the prompt length.
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import numpy as np
import torch
import transformers

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from configs_loader import load

import nopejax
from nopejax import model
from nopejax.decode import PREFILL_CHUNK, Sampling, decode, left_pad, prefill


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", default="64,1024", help="prompt lengths, comma-separated")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workdir", help="a run to load (default: configs/tiny.py, random init)")
    args = parser.parse_args()

    if args.workdir:
        module = nopejax.load_model(args.workdir)
    else:
        m = load("tiny").model
        m.dtype = "float32"
        module = model.create(m, seed=0)
    m = module.cfg
    out_dir = tempfile.mkdtemp()
    nopejax.to_hf(module, out_dir)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(out_dir).float().eval()
    N = args.new_tokens
    print(f"model: {model.param_count(m) / 1e6:.1f}M params, {m.num_layers} layers, dtype {m.dtype}; "
          f"{N} new tokens; {jax.devices()[0].platform}, torch threads {torch.get_num_threads()}")  # fmt: skip

    graphdef, params = model.split(module)
    settings = Sampling(np.float32(0), np.int32(0), np.float32(1))  # greedy
    key, no_eos, pad = jax.random.key(0), np.int32(-1), np.int32(0)

    def ours(prompt):
        """-> (tokens, prefill seconds, decode seconds), the same two calls as nopejax.generate."""
        tokens, pos, seg = left_pad([prompt], 0)
        t0 = time.perf_counter()
        cache, first, first_logits = jax.block_until_ready(
            prefill(graphdef, params, tokens, pos, seg, key, settings, total_len=tokens.shape[1] + N,
                    chunk=PREFILL_CHUNK, greedy=True)
        )  # fmt: skip
        t1 = time.perf_counter()
        out, _, _ = jax.block_until_ready(
            decode(graphdef, params, cache, first, first_logits, key, settings, no_eos, pad,
                   max_new_tokens=N, greedy=True, keep_logits=False)
        )  # fmt: skip
        return np.asarray(out[0]), t1 - t0, time.perf_counter() - t1

    class Stamps:  # transformers calls put() with the prompt, then with each new token
        def __init__(self):
            self.times = []

        def put(self, value):
            self.times.append(time.perf_counter())

        def end(self):
            pass

    def theirs(prompt):
        ids = torch.tensor([prompt.tolist()])
        stamps = Stamps()
        t0 = time.perf_counter()
        with torch.no_grad():
            out = hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=N, min_new_tokens=N,
                                    do_sample=False, pad_token_id=0, eos_token_id=None, streamer=stamps)  # fmt: skip
        return out[0, len(prompt) :].numpy(), stamps.times[1] - t0, stamps.times[-1] - stamps.times[1]

    rows = []
    for S in (int(x) for x in args.prompts.split(",")):
        prompt = np.random.default_rng(S).integers(0, 256, S).astype(np.int32)
        same = np.array_equal(ours(prompt)[0], theirs(prompt)[0])  # the first call also compiles nopejax's programs
        runs = {"ours": [], "theirs": []}
        for _ in range(args.rounds):
            runs["ours"].append(ours(prompt)[1:])
            runs["theirs"].append(theirs(prompt)[1:])
        med = {k: [statistics.median(r[i] for r in v) for i in (0, 1)] for k, v in runs.items()}
        rows.append((S, (N - 1) / med["ours"][1], (N - 1) / med["theirs"][1], med["ours"][0], med["theirs"][0], same))

    print("\n| prompt | nopejax decode tok/s | transformers decode tok/s | ratio | nopejax prefill ms "
          "| transformers prefill ms | same tokens |")  # fmt: skip
    print("|---:|---:|---:|---:|---:|---:|:---:|")
    for S, ours_tps, theirs_tps, ours_pre, theirs_pre, same in rows:
        print(f"| {S} | {ours_tps:,.0f} | {theirs_tps:,.0f} | {ours_tps / theirs_tps:.1f}x | {1e3 * ours_pre:.1f} "
              f"| {1e3 * theirs_pre:.1f} | {'yes' if same else 'NO'} |")  # fmt: skip
    if len(rows) > 1:
        first, last = rows[0], rows[-1]
        print(f"\ndecode speed at prompt {last[0]} / at prompt {first[0]}: nopejax {last[1] / first[1]:.2f}, "
              f"transformers {last[2] / first[2]:.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
