"""The grain pipeline: documents -> data shards -> shuffle -> tokenize -> packed batches.

  MapDataset of document indices (this split)          deterministic hash split by document
    [shard::num_shards]                                 grain's sharding idiom: disjoint, covering
    .shuffle(seed)      (train only)                    reshuffled every epoch
    .repeat()                                           epochs, forever (train and eval)
    .map(ReadAndTokenize)                               in grain threads / worker processes
  MapDataset.mix(components, weights)                   when data.path lists several globs
  .to_iter_dataset() [.mp_prefetch(num_workers)]
  PackedBatchIterDataset                                [B / num_shards, S] batches, checkpointable

Data order does not depend on the process count. The train split is cut into `num_shards`
data shards (default: one per row of the global batch), each its own packed stream of
B / num_shards rows; process p of P reads the shards p * k .. (p + 1) * k - 1 (k = shards /
P) and stacks their rows. Row r of every global batch therefore comes from the same stream on
1, 2 or 16 processes, and a checkpoint written by one process count resumes on another. The
eval split is one unshuffled stream of B rows that every process packs whole and cuts its own
rows from: eval is small, and this keeps it identical on any process count too.

Every stage before packing is a random-access `MapDataset`, so the whole upstream state is an
element index; the packer adds an offset into the one document it is splitting. The result
is a small JSON-able dict (`get_state()`), restored with `set_state()`; it also carries
`stats` (documents, tokens, empty and invalid-UTF-8 documents seen).

The train split repeats forever, shuffled with `train.seed` and differently each epoch. The
eval split (`data.eval_fraction` of the documents, chosen by a hash of the document index) is
unshuffled and repeats too: a fresh eval iterator always yields the same batches.
"""

from __future__ import annotations

import atexit
import math
import weakref

import grain
import jax
import numpy as np
from absl import flags
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from nopejax.config import ConfigError
from nopejax.data import sources
from nopejax.data.corpus import default_corpus_path
from nopejax.data.packing import PackedBatchIterDataset
from nopejax.data.synthetic import make_task_iterator
from nopejax.data.tokenizer import make_tokenizer

SPLITS = ("train", "eval")
SYNTHETIC_SOURCES = ("copy", "reverse", "parity", "passkey")


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
    """One source per entry of the comma-separated `data.path` (the default corpus: one).

    A source whose documents are all empty (an empty file, only blank lines) is refused here,
    before anything compiles: packing skips empty documents, so it could never fill a batch."""
    if data_cfg.source == "default":
        return [sources.JsonlSource([default_corpus_path()], "text")]
    patterns = [p for p in data_cfg.path.split(",") if p.strip()]
    if not patterns:
        raise ConfigError("data.path", f"data.source={data_cfg.source!r} needs a path", "set --config.data.path=GLOB")
    opened = []
    for p in patterns:
        source = sources.open_documents(
            data_cfg.source, p, text_field=data_cfg.text_field, text_unit=data_cfg.text_unit
        )
        if len(source) and not _has_text(source):
            field = data_cfg.source in ("jsonl", "parquet")
            raise ConfigError(
                "data.path", f"{p.strip()!r} holds no text: its {len(source)} document(s) are empty or blank",
                "point data.path at files with text" + (" or data.text_field at the text" if field else ""),
            )  # fmt: skip
        opened.append(source)
    return opened


def _has_text(source) -> bool:
    """Whether any document has text; reads documents only until the first that does."""
    for i in range(len(source)):
        raw = source[i]
        if len(raw) if isinstance(raw, np.ndarray) else sources.to_text(raw)[0].strip():
            return True
    return False


def _max_empty_run(lengths: list[int], weights) -> int:
    """Empty documents in a row after which a packed stream surely holds no text at all.

    A component of n documents repeats in a fresh order each epoch, so 2n - 1 draws from it in a
    row span a whole epoch. grain's mixture draws component k in proportion p_k, within one draw
    in any window, so ceil((2 n_k + 1) / p_k) draws of the mixture hold 2 n_k - 1 draws of k."""
    if len(lengths) == 1:
        return 2 * lengths[0]
    w = [1.0] * len(lengths) if weights is None else [float(x) for x in weights]
    return sum(math.ceil((2 * n + 1) * sum(w) / wk) for n, wk in zip(lengths, w))


def document_indices(num_documents: int, data_cfg, split: str, shard: int, num_shards: int) -> np.ndarray:
    """The document indices of one data shard of `split`, before shuffling: int64 [N_shard]."""
    return _shard_of(split_indices(num_documents, data_cfg.eval_fraction, split), shard, num_shards)


def _shard_of(docs: np.ndarray, shard: int, num_shards: int) -> np.ndarray:
    """Every num_shards-th document from `shard` on; a split with fewer documents than shards
    (a toy corpus) gives every shard all of them, each starting at another document."""
    if len(docs) < num_shards:
        return np.roll(docs, -(shard % max(len(docs), 1)))
    return docs[shard::num_shards]


class EpochShuffle(grain.transforms.MapWithIndex):
    """Element i of an endless stream -> a document of `docs`, in a fresh permutation per epoch.

    grain's lazy index shuffle costs milliseconds per element on the small domains of per-row
    data shards (a shard may hold a handful of documents), so each epoch's order is one numpy
    permutation of the shard, seeded by (seed, source, shard, epoch): 4-8 bytes per document.
    """

    def __init__(self, docs: np.ndarray, seed: int, source: int, shard: int):
        self.docs, self.key = docs, (seed, source, shard)
        self._cache = (-1, None)  # (epoch, its order): one tuple, swapped whole, safe across threads

    def map_with_index(self, index: int, _) -> int:
        epoch, i = divmod(index, len(self.docs))
        cached_epoch, order = self._cache
        if cached_epoch != epoch:  # readers stay within one epoch for long
            order = np.random.default_rng([*self.key, epoch]).permutation(len(self.docs))
            self._cache = (epoch, order)
        return int(self.docs[order[i]])


def _component(source, split_docs: np.ndarray, tokenizer, cfg, split: str, k: int, shard: int, num_shards: int):
    """Source k's documents of one data shard, as a MapDataset of tokenized documents."""
    d = cfg.data
    docs = _shard_of(split_docs, shard, num_shards)
    if len(docs) == 0:
        raise ConfigError(
            "data.path",
            f"source {k} has no {split} documents ({len(source)} documents in all)",
            "use more data, or raise data.eval_fraction for the eval split",
        )
    if split == "train" and d.shuffle:
        ds = grain.MapDataset.range(len(docs)).repeat(None)
        ds = ds.map_with_index(EpochShuffle(docs, cfg.train.seed, k, shard))
    else:
        ds = grain.MapDataset.source(docs).repeat(None)
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


# Iterators still open at exit are closed while the interpreter is whole: at shutdown grain's
# __del__ finds its modules torn down, prints tracebacks and leaks shared memory otherwise.
_OPEN_ITERATORS: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _close_open_iterators() -> None:
    for it in list(_OPEN_ITERATORS):
        it.close()
        # Drop the grain iterators below now, so their own __del__ runs here and not at shutdown.
        it._parents = ()
        if isinstance(it, ShardsIterator):
            it.shards = []


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

    Train: the data is split into `num_shards` disjoint shards (a resumed run passes the count
    its checkpoint was written with; else `data.num_shards`, else one per row of the global
    batch), each packed into B / num_shards rows; this process reads its consecutive share of
    them and stacks their rows. The global batch (process-major rows, as `global_batch` builds
    it) depends on the shard count only, never on the process count. Eval: the one global
    stream of B rows, of which this process keeps its B_local.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    B = cfg.train.global_batch_size
    process_index, process_count = _process(process_index, process_count, B)
    if split == "eval":
        rows = B // process_count
        it = RowsIterator(_shard_iterators(cfg, split, [0], 1)[0], process_index * rows, (process_index + 1) * rows)
        _OPEN_ITERATORS.add(it)
        return it
    num_shards = num_shards or cfg.data.num_shards or B
    if num_shards % process_count or B % num_shards:
        raise ConfigError(
            "data.num_shards",
            f"{num_shards} data shards cannot be spread over {process_count} processes with a global batch of {B} rows",
            "use a shard count that is a multiple of the process count and divides the global batch "
            "(0, the default, is one shard per row and fits every process count)",
        )
    per_process = num_shards // process_count
    if cfg.data.num_workers > 0 and per_process > 1:
        raise ConfigError(
            "data.num_workers",
            f"grain worker processes need one data shard per process, but this process reads {per_process}",
            f"set data.num_shards={process_count} (the data order then needs a process count dividing it) "
            "or data.num_workers=0",
        )
    first = process_index * per_process
    shards = _shard_iterators(cfg, split, list(range(first, first + per_process)), num_shards)
    it = shards[0] if per_process == 1 else ShardsIterator(shards)
    _OPEN_ITERATORS.add(it)
    return it


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


class RowsIterator(grain.DatasetIterator):
    """Rows [lo, hi) of another iterator's batches: one process's part of a global stream."""

    def __init__(self, parent, lo: int, hi: int):
        super().__init__(parent)
        self.lo, self.hi = lo, hi

    def __next__(self) -> dict[str, np.ndarray]:
        return {k: v[self.lo : self.hi] for k, v in next(self._parent).items()}

    def get_state(self):
        return self._parent.get_state()

    def set_state(self, state) -> None:
        self._parent.set_state(state)


def shard_states(state: dict) -> list:
    """A process's saved iterator state -> the list of its shards' states."""
    return state["shards"] if isinstance(state, dict) and set(state) == {"shards"} else [state]


def _shard_iterators(cfg, split: str, shards: list[int], num_shards: int) -> list:
    """The batch iterators of the given data shards, [B / num_shards, S] each, documents
    [shard::num_shards]. Sources and tokenizer are opened once and shared by the shards."""
    rows, seq_len, d = cfg.train.global_batch_size // num_shards, cfg.train.seq_len, cfg.data
    if d.source in SYNTHETIC_SOURCES:
        return [make_task_iterator(cfg, split, shard, num_shards) for shard in shards]
    if split == "eval" and d.eval_fraction == 0:
        raise ConfigError(
            "data.eval_fraction", "is 0, so there is no eval split", "set it above 0 or train.eval_every=0"
        )
    tokenizer = make_tokenizer_checked(cfg)
    srcs = open_sources(d)
    for s in srcs:
        if isinstance(s, sources.TokenSource):
            _check_prepared(s, tokenizer, d)
    weights = d.mixture_weights
    if len(srcs) > 1 and weights is not None and len(weights) != len(srcs):
        raise ConfigError(
            "data.mixture_weights", f"has {len(weights)} weights for {len(srcs)} paths", "give one weight per path"
        )
    # Threads overlap file reads and tokenization (the HF tokenizer releases the GIL); eval
    # iterators are short-lived, so they read ahead less. Many shards in one process share
    # the work: fewer threads and a shorter read-ahead each.
    if len(shards) > 1:
        options = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
    else:
        options = grain.ReadOptions(num_threads=2, prefetch_buffer_size=64 if split == "train" else 16)
    iterators = []
    split_docs = [split_indices(len(s), d.eval_fraction, split) for s in srcs]  # hashed once, not per shard
    for shard in shards:
        parts = [
            _component(s, docs, tokenizer, cfg, split, k, shard, num_shards)
            for k, (s, docs) in enumerate(zip(srcs, split_docs))
        ]
        if len(parts) > 1:
            ds = grain.MapDataset.mix(parts, weights=None if weights is None else [float(w) for w in weights])
        else:
            ds = parts[0]
        it_ds = ds.to_iter_dataset(options)
        if d.num_workers > 0 and split == "train":
            _ensure_absl_flags_parsed()
            it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=d.num_workers))
        lengths = [len(_shard_of(docs, shard, num_shards)) for docs in split_docs]
        packed = PackedBatchIterDataset(
            it_ds, rows, seq_len, tokenizer.pad_id, split_documents=d.packing == "concat",
            max_empty_run=_max_empty_run(lengths, weights), name=f"data shard {shard} of {num_shards} ({split} split)",
        )  # fmt: skip
        iterators.append(iter(packed))
    return iterators


def _ensure_absl_flags_parsed() -> None:
    """grain's worker processes read absl flags; outside absl.app nobody parses them."""
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
