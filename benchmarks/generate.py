"""Decode speed: `nopejax.generate` vs transformers' `generate` on the same exported model.

    python benchmarks/generate.py [--prompts 64,1024] [--new-tokens 64] [--rounds 3] [--workdir RUN]

The model is configs/tiny.py's (2.4M parameters, RoPE/NoPE mix, float32), randomly initialised
unless --workdir names a run; it is exported with `nopejax.to_hf` and loaded with
`AutoModelForCausalLM`. Both sides decode greedily from the same prompt ids, with no EOS, so
both write exactly N tokens. Each side's time is measured the same way, end to end through its
public call: prefill = generate(max_new_tokens=1), decode = generate(N) - generate(1), so decode
tokens/s = (N - 1) / decode time. Calls alternate between the two and the median of --rounds is
reported. Goal: nopejax >= transformers, and decode speed flat in the prompt length.
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


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


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

    def ours(prompt, n):
        return lambda: nopejax.generate(module, prompt, max_new_tokens=n)

    def theirs(prompt, n):
        ids = torch.tensor([prompt.tolist()])
        kw = dict(attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=0, eos_token_id=None)

        def run():
            with torch.no_grad():
                return hf_model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kw)[0, len(prompt) :].numpy()

        return run

    rows = []
    for S in (int(x) for x in args.prompts.split(",")):
        prompt = np.random.default_rng(S).integers(0, 256, S).astype(np.int32)
        same = np.array_equal(ours(prompt, N)(), theirs(prompt, N)())  # also compiles nopejax's programs
        ours(prompt, 1)()
        times = {k: [] for k in ("ours_1", "ours_N", "theirs_1", "theirs_N")}
        for _ in range(args.rounds):
            times["ours_1"].append(timed(ours(prompt, 1)))
            times["theirs_1"].append(timed(theirs(prompt, 1)))
            times["ours_N"].append(timed(ours(prompt, N)))
            times["theirs_N"].append(timed(theirs(prompt, N)))
        med = {k: statistics.median(v) for k, v in times.items()}
        decode_ours = (N - 1) / max(med["ours_N"] - med["ours_1"], 1e-9)
        decode_theirs = (N - 1) / max(med["theirs_N"] - med["theirs_1"], 1e-9)
        rows.append((S, decode_ours, decode_theirs, med["ours_1"], med["theirs_1"], same))

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
