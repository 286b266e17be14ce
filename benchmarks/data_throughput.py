"""Input pipeline throughput: tokens per second per core, on the offline default corpus.

    python3 benchmarks/data_throughput.py [--tokens 8_000_000] [--seq-len 2048] [--batch 32] [--num-shards K]

Measures, for the in-process pipeline (no worker processes):
  pack only                 BatchPacker on in-memory token arrays (the floor of the rest)
  tokenize+pack, byte       raw JSONL text -> byte tokenizer -> packed batches
  tokenize+pack, HF BPE     the same with a byte-level BPE tokenizer.json (trained here first)
  prepared shards + pack    `nopejax data prepare` output -> packed batches
Per core = tokens / CPU seconds of this process (all its threads), so the figure does not
depend on how many cores the machine lends; wall-clock tokens/s is printed too.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np

from nopejax.config import base_config
from nopejax.data import make_iterator, prepare, train_tokenizer
from nopejax.data.corpus import default_corpus_path
from nopejax.data.packing import BatchPacker
from nopejax.validation import validate


def measure(name: str, batches, tokens_per_batch: int, total_tokens: int) -> None:
    n = max(1, total_tokens // tokens_per_batch)
    next(batches)  # warm up: threads, file handles, first reads
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(n):
        next(batches)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    tokens = n * tokens_per_batch
    print(f"{name:28s} {tokens / cpu / 1e6:8.2f} M tokens/s/core   {tokens / wall / 1e6:8.2f} M tokens/s wall")


def pack_only(docs: list[np.ndarray], rows: int, seq_len: int):
    packer, k, start = BatchPacker(rows, seq_len, pad_id=256), 0, 0
    while True:
        doc = docs[k % len(docs)]
        start = packer.add(doc, start)
        if start == len(doc):
            k, start = k + 1, 0
        if packer.full:
            yield packer.take()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=8_000_000, help="tokens per measurement")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--num-shards", type=int, default=0, help="data.num_shards (0: one per row, the default)")
    args = parser.parse_args()
    per_batch = args.batch * args.seq_len

    def cfg_for(**data):
        cfg = base_config()
        cfg.train.global_batch_size, cfg.train.seq_len = args.batch, args.seq_len
        cfg.model.vocab_size = 4096
        cfg.data.eval_fraction = 0.0
        cfg.data.num_shards = args.num_shards
        for k, v in data.items():
            cfg.data[k] = v
        return validate(cfg)

    corpus = default_corpus_path()
    print(f"corpus {corpus}: {os.path.getsize(corpus) / 1e6:.2f} MB, {os.cpu_count()} cores visible")
    raw = cfg_for(source="jsonl", path=corpus)

    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 256, size=int(n), dtype=np.int32) for n in rng.integers(100, 6000, size=1000)]
    measure("pack only (mean doc 3k)", pack_only(docs, args.batch, args.seq_len), per_batch, args.tokens)

    measure("tokenize+pack, byte", make_iterator(raw, process_index=0, process_count=1), per_batch, args.tokens)

    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        tok_path = train_tokenizer(corpus, 2048, os.path.join(tmp, "tok"))
        print(f"(trained a 2048-token BPE on the corpus in {time.perf_counter() - t:.1f} s)")
        hf = cfg_for(source="jsonl", path=corpus, tokenizer=tok_path)
        measure(
            "tokenize+pack, HF BPE 2048", make_iterator(hf, process_index=0, process_count=1), per_batch, args.tokens
        )

        t = time.perf_counter()
        m = prepare(raw, os.path.join(tmp, "prepared"), progress=False)
        print(f"(prepared {m['num_tokens'] / 1e6:.2f} M tokens in {time.perf_counter() - t:.1f} s)")
        prepared = cfg_for(source="prepared", path=os.path.join(tmp, "prepared"))
        it = make_iterator(prepared, process_index=0, process_count=1)
        measure("prepared shards + pack", it, per_batch, args.tokens)


if __name__ == "__main__":
    main()
