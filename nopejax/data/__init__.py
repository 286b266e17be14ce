"""nopejax's input pipeline on grain: sources, tokenizers, packing, sharding, resumable state.

    tokenizer = make_tokenizer(cfg.data)            # byte (offline default) or tokenizer.json
    it = make_iterator(cfg, "train")                # this process's [B_local, S] numpy batches
    batch = global_batch(next(it), mesh)            # global [B, S] jax.Arrays on the batch axes
    state = it.get_state(); it.set_state(state)     # JSON-able; stored in every checkpoint

Modules, bottom up; each imports only modules listed before it, never a caller
(tests/test_data_layering.py checks it): sources (file formats, prepared-shard manifests),
corpus (the offline default corpus), packing, tokenizer (byte / tokenizer.json, BPE training,
HF tokenizer files), synthetic (copy / reverse / parity tasks), pipeline (the grain graph),
prepare (pre-tokenized ArrayRecord shards), commands (`nopejax data|tokenizer ...`).
"""

from nopejax.data.commands import prepare_main, tokenizer_main
from nopejax.data.packing import BATCH_KEYS, pack_documents
from nopejax.data.pipeline import global_batch, make_iterator, split_indices
from nopejax.data.prepare import prepare
from nopejax.data.synthetic import exact_match
from nopejax.data.tokenizer import ByteTokenizer, HFTokenizer, make_tokenizer, tokenizer_from_hf, train_tokenizer

__all__ = [
    "BATCH_KEYS",
    "ByteTokenizer",
    "HFTokenizer",
    "exact_match",
    "global_batch",
    "make_iterator",
    "make_tokenizer",
    "pack_documents",
    "prepare",
    "prepare_main",
    "split_indices",
    "tokenizer_from_hf",
    "tokenizer_main",
    "train_tokenizer",
]
