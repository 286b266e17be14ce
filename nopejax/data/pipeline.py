"""The grain pipeline: documents -> this process's shard -> shuffle -> tokenize -> packed batches.

  MapDataset of document indices (this split)          deterministic hash split by document
    [process_index::process_count]                     grain's sharding: disjoint, covering
    .shuffle(seed)      (train only)                    reshuffled every epoch
    .repeat()                                           epochs, forever (train and eval)
    .map(ReadAndTokenize)                               in grain threads / worker processes
  MapDataset.mix(components, weights)                   when data.path lists several globs
  .to_iter_dataset() [.mp_prefetch(num_workers)]
  PackedBatchIterDataset                                [B_local, S] batches, checkpointable

Every stage before packing is a random-access `MapDataset`, so the whole upstream state is an
element index; the packer adds an offset into the one document it is splitting. The result
is a small JSON-able dict (`get_state()`), restored with `set_state()`; it also carries
`stats` (documents, tokens, empty and invalid-UTF-8 documents seen).

The train split repeats forever, shuffled with `train.seed` and differently each epoch. The
eval split (`data.eval_fraction` of the documents, chosen by a hash of the document index) is
unshuffled and repeats too: a fresh eval iterator always yields the same batches, and hosts
with unequal shards never run out at different steps.
"""

from __future__ import annotations

import grain
import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from nopejax.config import ConfigError
from nopejax.data import sources
from nopejax.data.packing import PackedBatchIterDataset
from nopejax.data.tokenizer import make_tokenizer

SPLITS = ("train", "eval")
SYNTHETIC_SOURCES = ("copy", "reverse", "parity")


def split_indices(num_documents: int, eval_fraction: float, split: str) -> np.ndarray:
    """Indices (int64 [N_split]) of the documents in `split`, by a fixed hash of the index.

    A hash rather than "the last N%" spreads held-out documents over every file, and keeps a
    document in its split when files are appended.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    idx = np.arange(num_documents, dtype=np.int64)
    u = _unit_hash(idx)
    is_eval = u < eval_fraction
    if eval_fraction > 0 and not is_eval.any() and num_documents > 1:
        is_eval[np.argmin(u)] = True  # a tiny corpus still gets one held-out document
    return idx[is_eval] if split == "eval" else idx[~is_eval]


def _unit_hash(x: np.ndarray) -> np.ndarray:
    """splitmix64 of int64 [N] -> float64 in [0, 1); identical on every machine."""
    z = x.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / float(1 << 53)


class ReadAndTokenize(grain.transforms.Map):
    """Document index -> {"tokens": int32 [L] with BOS/EOS, "invalid_utf8": bool}."""

    def __init__(self, source, tokenizer, add_bos: bool, add_eos: bool):
        self.source, self.tokenizer = source, tokenizer
        self.bos = [tokenizer.bos_id] if add_bos else []
        self.eos = [tokenizer.eos_id] if add_eos else []

    def map(self, index) -> dict:
        raw = self.source[int(index)]
        if isinstance(raw, np.ndarray):  # prepared shards: already tokens, specials included
            return {"tokens": raw, "invalid_utf8": False}
        text, invalid = sources.to_text(raw)
        if not text.strip():  # empty documents are skipped (and counted) by the packer
            return {"tokens": np.zeros(0, np.int32), "invalid_utf8": invalid}
        ids = self.tokenizer.encode(text)
        if self.bos or self.eos:
            ids = np.concatenate([np.asarray(self.bos, np.int32), ids, np.asarray(self.eos, np.int32)])
        return {"tokens": ids, "invalid_utf8": invalid}


def open_sources(data_cfg) -> list:
    """One source per entry of the comma-separated `data.path` (the default corpus: one)."""
    if data_cfg.source == "default":
        from nopejax.data.corpus import default_corpus_path

        return [sources.JsonlSource([default_corpus_path()], "text")]
    patterns = [p for p in data_cfg.path.split(",") if p.strip()]
    if not patterns:
        raise ConfigError("data.path", f"data.source={data_cfg.source!r} needs a path", "set --config.data.path=GLOB")
    return [
        sources.open_documents(data_cfg.source, p, text_field=data_cfg.text_field, text_unit=data_cfg.text_unit)
        for p in patterns
    ]


def document_indices(num_documents: int, data_cfg, split: str, process_index: int, process_count: int) -> np.ndarray:
    """The document indices this process reads in `split`, before shuffling: int64 [N_local]."""
    return split_indices(num_documents, data_cfg.eval_fraction, split)[process_index::process_count]


def _component(source, tokenizer, cfg, split: str, k: int, process_index: int, process_count: int):
    d = cfg.data
    ds = grain.MapDataset.source(split_indices(len(source), d.eval_fraction, split))
    ds = ds[process_index::process_count]  # grain's sharding idiom: disjoint, union = all
    if len(ds) == 0:
        raise ConfigError(
            "data.path",
            f"source {k} has no {split} documents for process {process_index} of {process_count} "
            f"({len(source)} documents in all)",
            "use more data, or raise data.eval_fraction for the eval split",
        )
    if split == "train" and d.shuffle:
        ds = ds.shuffle(seed=(cfg.train.seed * 1_000_003 + k) % 2**32)
    ds = ds.repeat(None)
    add_bos, add_eos = d.add_bos, d.add_eos
    if isinstance(source, sources.TokenSource):
        add_bos = add_eos = False  # already in the shards
    return ds.map(ReadAndTokenize(source, tokenizer, add_bos, add_eos))


def _check_prepared(source: sources.TokenSource, tokenizer, data_cfg) -> None:
    m = source.manifest
    if m["tokenizer"] != tokenizer.fingerprint:
        raise ConfigError(
            "data.tokenizer",
            f"the shards were prepared with tokenizer {m['tokenizer_spec']!r} ({m['tokenizer']}) but data.tokenizer="
            f"{data_cfg.tokenizer!r} is {tokenizer.fingerprint}",
            "set data.tokenizer to the one used by `nopejax data prepare`, or prepare again",
        )


def make_tokenizer_checked(cfg):
    tokenizer = make_tokenizer(cfg.data)
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ConfigError(
            "model.vocab_size",
            f"{cfg.model.vocab_size} is smaller than the tokenizer's vocabulary ({tokenizer.vocab_size})",
            f"set model.vocab_size >= {tokenizer.vocab_size} (a multiple of 128 is fastest)",
        )
    return tokenizer


def _process(process_index: int | None, process_count: int | None, global_batch_size: int) -> tuple[int, int]:
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} is not in [0, {process_count})")
    if global_batch_size % process_count:
        raise ConfigError(
            "train.global_batch_size",
            f"{global_batch_size} is not divisible by the {process_count} processes",
            f"use a multiple of {process_count}",
        )
    return process_index, process_count


def make_iterator(
    cfg,
    split: str = "train",
    *,
    process_index: int | None = None,
    process_count: int | None = None,
    num_shards: int | None = None,
):
    """This process's batches: a checkpointable grain iterator of dicts of [B_local, S] arrays.

    Keys: inputs, targets, segment_ids, positions (int32) and loss_mask (float32), with
    B_local = train.global_batch_size // process_count and S = train.seq_len.

    The data is split into `num_shards` disjoint shards (default: `data.num_shards`, else one per
    process), each packed into B / num_shards rows; process p reads shards p * k .. (p + 1) * k - 1, k = shards per
    process, and stacks them. The global batch (process-major rows, as `global_batch` builds it)
    therefore depends on the shard count only, never on the process count: a run resumed on
    fewer or more processes keeps its data order when it keeps its shard count.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    process_index, process_count = _process(process_index, process_count, cfg.train.global_batch_size)
    # data.num_shards fixes the shard count of a fresh run (the same data order on any number
    # of hosts); a resumed run passes the count its checkpoint was written with
    num_shards = num_shards or cfg.data.num_shards or process_count
    if num_shards % process_count or cfg.train.global_batch_size % num_shards:
        raise ConfigError(
            "train.global_batch_size",
            f"{num_shards} data shards cannot be spread over {process_count} processes with a global batch of "
            f"{cfg.train.global_batch_size} rows",
            "use a shard count that is a multiple of the process count and divides the global batch",
        )
    per_process = num_shards // process_count
    if per_process == 1:
        return _shard_iterator(cfg, split, process_index, process_count)
    first = process_index * per_process
    return ShardsIterator([_shard_iterator(cfg, split, first + j, num_shards) for j in range(per_process)])


class ShardsIterator(grain.DatasetIterator):
    """Several data shards read by one process: their [B / num_shards, S] batches stacked by rows.

    State: {"shards": [state of each shard, in order]}, so a checkpoint written by another
    number of processes can be regrouped per shard (see `shard_states`).
    """

    def __init__(self, shards: list):
        super().__init__(shards)
        self.shards = shards

    def __next__(self) -> dict[str, np.ndarray]:
        batches = [next(s) for s in self.shards]
        return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}

    def get_state(self) -> dict:
        return {"shards": [s.get_state() for s in self.shards]}

    def set_state(self, state: dict) -> None:
        if len(state["shards"]) != len(self.shards):
            raise ValueError(f"a state of {len(state['shards'])} data shards for an iterator of {len(self.shards)}")
        for s, st in zip(self.shards, state["shards"]):
            s.set_state(st)

    def start_prefetch(self) -> None:  # grain's checkpoint handler calls it after a restore
        for s in self.shards:
            getattr(s, "start_prefetch", lambda: None)()


def shard_states(state: dict) -> list:
    """A process's saved iterator state -> the list of its shards' states."""
    return state["shards"] if isinstance(state, dict) and set(state) == {"shards"} else [state]


def _shard_iterator(cfg, split: str, shard: int, num_shards: int):
    """The batches of one data shard: [B / num_shards, S], documents [shard::num_shards]."""
    process_index, process_count = shard, num_shards  # the pipeline below shards by these
    rows, seq_len, d = cfg.train.global_batch_size // process_count, cfg.train.seq_len, cfg.data
    if d.source in SYNTHETIC_SOURCES:
        from nopejax.data.synthetic import make_task_iterator

        return make_task_iterator(cfg, split, process_index, process_count)
    if split == "eval" and d.eval_fraction == 0:
        raise ConfigError(
            "data.eval_fraction", "is 0, so there is no eval split", "set it above 0 or train.eval_every=0"
        )
    tokenizer = make_tokenizer_checked(cfg)
    srcs = open_sources(d)
    for s in srcs:
        if isinstance(s, sources.TokenSource):
            _check_prepared(s, tokenizer, d)
    parts = [_component(s, tokenizer, cfg, split, k, process_index, process_count) for k, s in enumerate(srcs)]
    if len(parts) > 1:
        weights = d.mixture_weights
        if weights is not None and len(weights) != len(parts):
            raise ConfigError(
                "data.mixture_weights", f"has {len(weights)} weights for {len(parts)} paths", "give one weight per path"
            )
        ds = grain.MapDataset.mix(parts, weights=None if weights is None else [float(w) for w in weights])
    else:
        ds = parts[0]
    # Threads overlap file reads and tokenization (the HF tokenizer releases the GIL); eval
    # iterators are short-lived, so they read ahead less.
    buffer = 64 if split == "train" else 16
    it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=buffer))
    if d.num_workers > 0 and split == "train":
        _ensure_absl_flags_parsed()
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=d.num_workers))
    return iter(PackedBatchIterDataset(it_ds, rows, seq_len, tokenizer.pad_id, split_documents=d.packing == "concat"))


def _ensure_absl_flags_parsed() -> None:
    """grain's worker processes read absl flags; outside absl.app nobody parses them."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def global_batch(local_batch: dict[str, np.ndarray], mesh: jax.sharding.Mesh, batch_axes=("data", "fsdp")) -> dict:
    """Assemble every process's [B_local, S] arrays into global [B, S] jax.Arrays on `mesh`.

    The batch dimension is sharded over those of `batch_axes` that the mesh has (DCN axes
    included when named), the sequence dimension is replicated.
    """
    axes = tuple(a for a in batch_axes if a in mesh.axis_names)
    sharding = NamedSharding(mesh, P(axes if axes else None, None))
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local_batch.items()}
