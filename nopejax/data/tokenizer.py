"""Tokenizers: a byte-level one that needs no file, and a HuggingFace `tokenizer.json`.

Both expose the same small surface the pipeline needs: `encode(text) -> int32 [L]` without
specials, `decode(ids)`, the special ids, `vocab_size`, and a `fingerprint` that changes
whenever the id mapping could change (prepared shards record it, so shards and a run cannot
silently disagree).

The byte tokenizer is the offline default: ids 0..255 are the UTF-8 bytes, then PAD=256,
BOS=257, EOS=258 (vocab 259, below the default model vocab of 384). `train_tokenizer` trains a
byte-level BPE (GPT-2 style pre-tokenization, so any byte string is encodable) on the user's
own files with the `tokenizers` library.

`save_for_hf(out_dir, model_max_length, add_bos)` writes a tokenizer as transformers loads it
(`AutoTokenizer`): tokenizer.json, tokenizer_config.json (bos/eos/pad) and generation_config.json. A
HuggingFace tokenizer.json is copied with one change: its post-processor prepends BOS exactly when
the run did (`data.add_bos`; nopejax training puts BOS before each document and `nopejax generate`
before the prompt, never EOS after a prompt), so `pipeline("text-generation")` feeds the model what
nopejax feeds it, and never what the original file's post-processor added instead. The byte
tokenizer is written as a `tokenizers` serialization that gives each byte its nopejax id: GPT-2's
byte-to-character table (ByteLevel pre-tokenizer, no regex split) and a BPE vocabulary of the 256
byte characters with no merges, so every UTF-8 string encodes to its bytes and decodes back; the
specials are added tokens at 256-258, which `split_special_tokens` keeps from matching inside text,
as nopejax never does.
`tokenizer_from_hf(hf_dir, workdir)` goes the other way for `nopejax import-hf`.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil

import numpy as np
from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as _RustTokenizer

from nopejax.config import ConfigError
from nopejax.data.sources import open_documents, to_text

BYTE_VOCAB_SIZE = 259
BYTE_PAD, BYTE_BOS, BYTE_EOS = 256, 257, 258

# Special tokens written by `train_tokenizer`, at ids 0, 1, 2.
TRAINED_SPECIALS = ("<|pad|>", "<|bos|>", "<|eos|>")
# Names under which common tokenizer.json files spell their specials, most specific first.
_BOS_NAMES = ("<|bos|>", "<|begin_of_text|>", "<s>", "<bos>", "[CLS]", "<|endoftext|>", "<|im_start|>")
_EOS_NAMES = ("<|eos|>", "<|end_of_text|>", "</s>", "<eos>", "[SEP]", "<|endoftext|>", "<|im_end|>")
_PAD_NAMES = ("<|pad|>", "<pad>", "[PAD]", "<|finetune_right_pad_id|>")
# The byte tokenizer's specials as written for HuggingFace, at BYTE_PAD, BYTE_BOS, BYTE_EOS.
BYTE_SPECIALS = TRAINED_SPECIALS


class ByteTokenizer:
    """UTF-8 bytes as ids; nothing to download, nothing to train."""

    vocab_size = BYTE_VOCAB_SIZE
    pad_id, bos_id, eos_id = BYTE_PAD, BYTE_BOS, BYTE_EOS
    fingerprint = "byte-v1"

    def encode(self, text: str) -> np.ndarray:  # -> int32 [L]
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

    def decode(self, ids) -> str:
        ids = np.asarray(ids).reshape(-1)
        return bytes(int(i) for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")

    def save_for_hf(self, out_dir: str, model_max_length: int, add_bos: bool) -> None:
        """tokenizer.json (the byte table, see the module docstring), tokenizer_config.json, generation_config.json."""
        os.makedirs(out_dir, exist_ok=True)
        tok = _with_bos(byte_hf_tokenizer(), BYTE_SPECIALS[1], self.bos_id, add_bos)
        tok.save(os.path.join(out_dir, "tokenizer.json"))
        # nopejax encodes "<|bos|>" typed in text as its 7 bytes: keep HF from matching it as a special
        _write_hf_configs(out_dir, self, BYTE_SPECIALS, model_max_length, add_bos, split_special_tokens=True)

    def __repr__(self) -> str:
        return "ByteTokenizer()"


class HFTokenizer:
    """A HuggingFace `tokenizers` tokenizer.json. Specials come from the file's added tokens."""

    def __init__(self, path: str):
        if not os.path.isfile(path):
            raise ConfigError(
                "data.tokenizer", f"tokenizer file {path!r} does not exist", "give a tokenizer.json or 'byte'"
            )
        self.path = path
        try:
            self._tok = _RustTokenizer.from_file(path)
        except Exception as e:
            raise ConfigError(
                "data.tokenizer", f"{path!r} is not a valid tokenizer.json ({e})", "check the file"
            ) from None
        # Specials are added by the pipeline (data.add_bos / add_eos), not by a post-processor.
        self._tok.no_padding()
        self._tok.no_truncation()
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        with open(path, "rb") as f:
            self.fingerprint = "hf-" + hashlib.sha256(f.read()).hexdigest()[:16]
        eos = self._first_id(_EOS_NAMES)
        bos = self._first_id(_BOS_NAMES)
        pad = self._first_id(_PAD_NAMES)
        # Fall back the way GPT-2-style files need: one <|endoftext|> serves as bos and eos. Pad is
        # never trained on (loss_mask is 0 there), so any id works; eos is the conventional choice.
        self.eos_id = eos if eos is not None else (bos if bos is not None else 0)
        self.bos_id = bos if bos is not None else self.eos_id
        self.pad_id = pad if pad is not None else self.eos_id
        self.has_specials = eos is not None or bos is not None

    def _first_id(self, names) -> int | None:
        for name in names:
            i = self._tok.token_to_id(name)
            if i is not None:
                return int(i)
        return None

    def encode(self, text: str) -> np.ndarray:  # -> int32 [L]
        return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, dtype=np.int32)

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in np.asarray(ids).reshape(-1)], skip_special_tokens=True)

    def save_for_hf(self, out_dir: str, model_max_length: int, add_bos: bool) -> None:
        """A copy of the tokenizer.json with nopejax's BOS rule as its post-processor, plus
        tokenizer_config.json and generation_config.json."""
        os.makedirs(out_dir, exist_ok=True)
        names = [self._tok.id_to_token(i) for i in (self.pad_id, self.bos_id, self.eos_id)]
        tok = _RustTokenizer.from_file(self.path)  # as the file is: its own padding and truncation settings
        _with_bos(tok, names[1], self.bos_id, add_bos).save(os.path.join(out_dir, "tokenizer.json"))
        _write_hf_configs(out_dir, self, names, model_max_length, add_bos, split_special_tokens=False)

    def __getstate__(self):  # grain workers receive a pickled copy; the Rust object pickles as JSON
        return {"path": self.path}

    def __setstate__(self, state):
        self.__init__(state["path"])

    def __repr__(self) -> str:
        return f"HFTokenizer({self.path!r}, vocab_size={self.vocab_size})"


Tokenizer = ByteTokenizer | HFTokenizer


def make_tokenizer(data_cfg) -> Tokenizer:
    """`data.tokenizer`: 'byte' or the path of a tokenizer.json (or of a directory holding one)."""
    spec = data_cfg.tokenizer
    if spec == "byte":
        return ByteTokenizer()
    path = os.path.join(spec, "tokenizer.json") if os.path.isdir(spec) else spec
    tok = HFTokenizer(path)
    if (data_cfg.add_bos or data_cfg.add_eos) and not tok.has_specials:
        raise ConfigError(
            "data.add_bos",
            f"{path} defines no BOS/EOS token (looked for {_BOS_NAMES + _EOS_NAMES})",
            "add one to the tokenizer or set data.add_bos=false and data.add_eos=false",
        )
    return tok


# ---------------------------------------------------------------------------------------------
# HuggingFace files: the byte tokenizer as a `tokenizers` serialization, configs, import


def _gpt2_byte_chars() -> list[str]:
    """GPT-2's byte -> printable character table (what the ByteLevel pre-tokenizer emits)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:  # control bytes, space, etc. move above 255 so every byte is one visible character
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def byte_hf_tokenizer() -> _RustTokenizer:
    """The byte tokenizer for `tokenizers`: byte b -> id b, specials at 256-258, no merges."""
    vocab = {c: b for b, c in enumerate(_gpt2_byte_chars())}
    tok = _RustTokenizer(models.BPE(vocab=vocab, merges=[]))
    # no regex split: the text is one piece, bytes are never regrouped, so ids are exactly the bytes
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(name, special=True, normalized=False) for name in BYTE_SPECIALS])
    got = [tok.token_to_id(name) for name in BYTE_SPECIALS]
    assert got == [BYTE_PAD, BYTE_BOS, BYTE_EOS], got  # added tokens take the next ids, in order
    return tok


def _with_bos(tok: _RustTokenizer, bos: str, bos_id: int, add_bos: bool) -> _RustTokenizer:
    """`tok` with a post-processor that prepends BOS when `add_bos` and adds nothing otherwise (no EOS:
    a prompt is continued, not ended)."""
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, bos_id)]
        )
    else:
        tok.post_processor = processors.TemplateProcessing(single="$A:0", pair="$A:0 $B:1", special_tokens=[])
    return tok


def _write_hf_configs(out_dir: str, tok, names, model_max_length: int, add_bos: bool, split_special_tokens: bool):
    """tokenizer_config.json and generation_config.json; `names`: the pad, bos, eos strings."""
    pad, bos, eos = names
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos,
        "eos_token": eos,
        "pad_token": pad,
        # as nopejax trains and generates; transformers rebuilds tokenizer.json's post-processor from these
        "add_bos_token": bool(add_bos),
        "add_eos_token": False,
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False,  # decode exactly, as nopejax does
        "split_special_tokens": split_special_tokens,
    }
    # greedy by default, as `nopejax generate`; stop at EOS
    generation_config = {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id,
                         "do_sample": False}  # fmt: skip
    for name, content in (("tokenizer_config.json", tokenizer_config), ("generation_config.json", generation_config)):
        with open(os.path.join(out_dir, name), "w") as f:
            json.dump(content, f, indent=2)


def tokenizer_from_hf(hf_dir: str, workdir: str) -> str | None:
    """The `data.tokenizer` for a run imported from `hf_dir`: "byte" when its tokenizer.json is
    nopejax's byte serialization, else the path of a copy in `workdir` (so the run does not
    depend on `hf_dir` staying where it is); None when the directory has no tokenizer.json."""
    path = os.path.join(hf_dir, "tokenizer.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        theirs = json.load(f)
    ours = json.loads(byte_hf_tokenizer().to_str())
    # the post-processor carries the exporting run's BOS rule, not the id mapping
    if {**theirs, "post_processor": None} == {**ours, "post_processor": None}:
        return "byte"
    os.makedirs(workdir, exist_ok=True)
    copy = os.path.abspath(os.path.join(workdir, "tokenizer.json"))
    shutil.copyfile(path, copy)
    return copy


# ---------------------------------------------------------------------------------------------
# Training a byte-level BPE on the user's corpus


def train_tokenizer(input_glob: str, vocab_size: int, out_dir: str, *, text_field: str = "text") -> str:
    """Train a byte-level BPE on the files matching `input_glob`; write OUT/tokenizer.json.

    Files are read with the same readers as training (.jsonl / .parquet / .array_record by
    extension, anything else as plain text, one document per file), so the BPE sees exactly
    the documents the model will. Returns the path of the written tokenizer.json.
    """
    min_vocab = 256 + len(TRAINED_SPECIALS)
    if vocab_size < min_vocab:
        raise ConfigError(
            "--vocab-size", f"{vocab_size} is below the byte alphabet plus specials", f"use >= {min_vocab}"
        )
    source = open_documents(_kind_of(input_glob), input_glob, text_field=text_field)

    def texts():  # the trainer pulls batches; the GIL is released while it counts pairs
        for i in range(len(source)):
            text, _ = to_text(source[i])
            if text.strip():
                yield text

    tok = _RustTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(TRAINED_SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, seen or not
        show_progress=False,
    )
    tok.train_from_iterator(texts(), trainer=trainer, length=len(source))
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "tokenizer.json")
    tok.save(path)
    return path


def _kind_of(pattern: str) -> str:
    first = sorted(glob.glob(os.path.expanduser(pattern)))
    name = first[0] if first else pattern
    for ext, kind in (
        (".jsonl", "jsonl"),
        (".json", "jsonl"),
        (".parquet", "parquet"),
        (".array_record", "arrayrecord"),
    ):
        if name.endswith(ext):
            return kind
    return "text"
