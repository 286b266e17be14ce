"""`nopejax data prepare ...` and `nopejax tokenizer train ...`: argument parsing only.

User mistakes (bad paths, config errors) print one line to stderr and return 2, no traceback.
"""

from __future__ import annotations

import argparse
import sys

from nopejax.config import ConfigError, apply_overrides, base_config, load_config
from nopejax.data.prepare import prepare
from nopejax.data.tokenizer import HFTokenizer, train_tokenizer
from nopejax.validation import validate


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def prepare_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="nopejax data prepare",
        description="Tokenize the corpus of a config once into ArrayRecord shards (+ manifest.json). "
        "Train on them with --config.data.source=prepared --config.data.path=DIR.",
        epilog="Config overrides: --config.KEY=VALUE, e.g. "
        "--config.data.source=jsonl --config.data.path='data/*.jsonl'",
    )
    parser.add_argument("--config", help="config file defining get_config() (default: the base config)")
    parser.add_argument("--out", required=True, help="output directory (new or empty)")
    parser.add_argument("--workers", type=int, default=None, help="tokenizer processes (default: all cores)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args, rest = parser.parse_known_args(argv)
    bad = [a for a in rest if not a.startswith("--config.")]
    if bad:
        return _fail(f"unknown argument {bad[0]!r}; config overrides look like --config.data.path=GLOB")
    try:
        cfg = load_config(args.config) if args.config else base_config()
        validate(apply_overrides(cfg, rest))
        m = prepare(cfg, args.out, num_workers=args.workers, progress=not args.no_progress)
    except ConfigError as e:
        return _fail(str(e))
    print(
        f"wrote {m['num_documents']} documents, {m['num_tokens']} tokens in {len(m['shards'])} shards to {args.out} "
        f"({m['empty_documents']} empty documents skipped, {m['invalid_utf8_documents']} with invalid UTF-8 replaced)"
    )
    return 0


def tokenizer_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="nopejax tokenizer", description="Tokenizer tools (offline).")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser(
        "train",
        help="train a byte-level BPE tokenizer on your files",
        description="Train a byte-level BPE with the `tokenizers` library; writes OUT/tokenizer.json. "
        "Use it with --config.data.tokenizer=OUT/tokenizer.json.",
    )
    train.add_argument(
        "--input", required=True, help="file glob: .jsonl/.parquet/.array_record by extension, else text"
    )
    train.add_argument("--vocab-size", type=int, required=True, help="vocabulary size including 3 specials (>= 259)")
    train.add_argument("--out", required=True, help="output directory")
    train.add_argument("--text-field", default="text", help="JSONL/Parquet field holding the text")
    args = parser.parse_args(argv)
    try:
        path = train_tokenizer(args.input, args.vocab_size, args.out, text_field=args.text_field)
        tok = HFTokenizer(path)
    except ConfigError as e:
        return _fail(str(e))
    print(f"wrote {path} (vocab_size {tok.vocab_size}, bos {tok.bos_id}, eos {tok.eos_id}, pad {tok.pad_id})")
    return 0
