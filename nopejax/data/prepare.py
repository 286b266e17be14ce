"""Pre-tokenization: tokenize a corpus once into ArrayRecord shards plus a small manifest.

`prepare(cfg, out_dir)` reads the documents of `cfg.data` (every entry of a comma-separated
`data.path`, in order), tokenizes them with `data.tokenizer` (BOS/EOS per `data.add_bos` /
`add_eos`) on all local cores, and writes

  OUT/shard-00000.array_record ...   one record = one document's token ids (uint16 when the
                                     vocabulary fits, else int32), contiguous document ranges
  OUT/manifest.json                  written last, so its presence means "complete": token and
                                     document counts, empty / invalid-UTF-8 counts, tokenizer
                                     fingerprint, dtype, and per-shard counts

Training then reads them with `data.source = "prepared"`, `data.path = OUT`; the train/eval
split is the same hash-by-document split as for raw text, applied at read time.
"""

from __future__ import annotations

import itertools
import json
import math
import multiprocessing
import os
import time

import numpy as np
from array_record.python.array_record_module import ArrayRecordWriter
from tqdm import tqdm

from nopejax.config import ConfigError
from nopejax.data.pipeline import SYNTHETIC_SOURCES, ReadAndTokenize, make_tokenizer_checked, open_sources
from nopejax.data.sources import FORMAT, MANIFEST

_DOCS_PER_SHARD = 50_000

_worker: dict = {}  # per worker process: sources, tokenizer, specials (set by _init_worker)


def _init_worker(srcs, tokenizer, add_bos: bool, add_eos: bool, dtype: str) -> None:
    _worker["readers"] = [ReadAndTokenize(s, tokenizer, add_bos, add_eos) for s in srcs]
    _worker["dtype"] = np.dtype(dtype)


def _write_shard(task: tuple[str, list[tuple[int, int, int]]]) -> dict:
    """Tokenize (source, start, stop) document ranges into one shard file; return its counts."""
    path, ranges = task
    counts = {"file": os.path.basename(path), "num_documents": 0, "num_tokens": 0, "empty_documents": 0}
    counts["invalid_utf8_documents"] = 0
    # group_size:1 makes every record its own chunk: random access without decoding neighbours.
    writer = ArrayRecordWriter(path, "group_size:1")
    try:
        for k, start, stop in ranges:
            reader = _worker["readers"][k]
            for i in range(start, stop):
                item = reader.map(i)
                counts["invalid_utf8_documents"] += int(item["invalid_utf8"])
                tokens = item["tokens"]
                if len(tokens) == 0:
                    counts["empty_documents"] += 1
                    continue
                writer.write(tokens.astype(_worker["dtype"]).tobytes())
                counts["num_documents"] += 1
                counts["num_tokens"] += len(tokens)
    finally:
        writer.close()
    counts["input_documents"] = sum(stop - start for _, start, stop in ranges)
    return counts


def _plan(sizes: list[int], num_shards: int) -> list[list[tuple[int, int, int]]]:
    """Split the concatenated documents of all sources into `num_shards` contiguous ranges."""
    total = sum(sizes)
    bounds = np.linspace(0, total, num_shards + 1).round().astype(np.int64)
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    plan = []
    for a, b in itertools.pairwise(bounds):
        ranges = []
        for k in range(len(sizes)):
            lo, hi = max(a, offsets[k]), min(b, offsets[k + 1])
            if lo < hi:
                ranges.append((k, int(lo - offsets[k]), int(hi - offsets[k])))
        plan.append(ranges)
    return plan


def prepare(cfg, out_dir: str, *, num_workers: int | None = None, progress: bool = True) -> dict:
    """Tokenize `cfg.data`'s corpus into ArrayRecord shards in `out_dir`; return the manifest."""
    d = cfg.data
    if d.source in SYNTHETIC_SOURCES or d.source == "prepared":
        raise ConfigError(
            "data.source",
            f"{d.source!r} cannot be prepared",
            "prepare a text, jsonl, parquet, arrayrecord or default corpus",
        )
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        raise ConfigError("--out", f"{out_dir!r} is not empty", "choose a new or empty directory")
    tokenizer = make_tokenizer_checked(cfg)
    srcs = open_sources(d)
    sizes = [len(s) for s in srcs]
    total = sum(sizes)
    if total == 0:
        raise ConfigError("data.path", f"{d.path!r} holds no documents", "check the files")
    dtype = "uint16" if tokenizer.vocab_size <= 2**16 else "int32"
    workers = max(1, min(num_workers or os.cpu_count() or 1, total))
    num_shards = max(workers, math.ceil(total / _DOCS_PER_SHARD))
    num_shards = min(num_shards, total)
    os.makedirs(out_dir, exist_ok=True)
    tasks = [(os.path.join(out_dir, f"shard-{i:05d}.array_record"), r) for i, r in enumerate(_plan(sizes, num_shards))]
    init_args = (srcs, tokenizer, d.add_bos, d.add_eos, dtype)

    start = time.time()
    shards = []
    with tqdm(total=total, unit="doc", desc="prepare", disable=not progress) as bar:
        if workers == 1:
            _init_worker(*init_args)
            results = map(_write_shard, tasks)
        else:
            # spawn, not fork: the parent may hold JAX's threads, which fork would copy mid-lock.
            pool = multiprocessing.get_context("spawn").Pool(workers, initializer=_init_worker, initargs=init_args)
            results = pool.imap(_write_shard, tasks)  # imap keeps shard order in the manifest
        try:
            for counts in results:
                shards.append(counts)
                bar.update(counts.pop("input_documents"))
        finally:
            if workers > 1:
                pool.close()
                pool.join()

    manifest = {
        "format": FORMAT,
        "num_tokens": sum(s["num_tokens"] for s in shards),
        "num_documents": sum(s["num_documents"] for s in shards),
        "empty_documents": sum(s["empty_documents"] for s in shards),
        "invalid_utf8_documents": sum(s["invalid_utf8_documents"] for s in shards),
        "tokenizer": tokenizer.fingerprint,
        "tokenizer_spec": d.tokenizer,
        "vocab_size": tokenizer.vocab_size,
        "bos_id": tokenizer.bos_id,
        "eos_id": tokenizer.eos_id,
        "pad_id": tokenizer.pad_id,
        "add_bos": bool(d.add_bos),
        "add_eos": bool(d.add_eos),
        "dtype": dtype,
        "source": d.source,
        "path": d.path,
        "seconds": round(time.time() - start, 2),
        "shards": shards,
    }
    tmp = os.path.join(out_dir, MANIFEST + ".tmp")
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=1)
    os.replace(tmp, os.path.join(out_dir, MANIFEST))
    return manifest
