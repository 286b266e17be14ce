"""Document sources: random access to documents in text, JSONL, Parquet and ArrayRecord files.

Each source is a grain `RandomAccessDataSource` (`__len__`, `__getitem__`) whose items are one
document's raw text (`str`, or `bytes` that may be invalid UTF-8: `to_text` replaces and
counts that later, it is never fatal). Random access is what lets grain shuffle globally,
shard by process and resume from a bare index, so every reader builds a small offset index
up front (one pass over the files, numpy arrays, no text kept in memory):

  text          one document per file (`data.text_unit = "file"`) or per blank-line-separated
                block (`"block"`); index = byte ranges
  jsonl         one JSON object per line, text in `data.text_field`; index = line byte ranges
  parquet       text in column `data.text_field`; index = rows per row group (a few decoded
                row groups are cached; for large Parquet corpora prefer `nopejax data prepare`,
                which reads them sequentially once)
  arrayrecord   grain's native format; one record = one document's UTF-8 text
  prepared      ArrayRecord shards of token ids written by `nopejax data prepare`

Open file handles are per process and dropped when pickled, so a source can be sent to grain
worker processes.
"""

from __future__ import annotations

import collections
import glob
import json
import os
import re

import grain
import numpy as np
import pyarrow.parquet as pq

from nopejax.config import ConfigError

# Prepared shards (`nopejax data prepare`): their manifest, written last, marks them complete.
FORMAT = "nopejax-prepared-v1"
MANIFEST = "manifest.json"
_GLOB_CHARS = re.compile(r"[*?\[]")
_BLANK_LINE = re.compile(rb"\n[ \t\r\f\v]*\n")


def expand_paths(pattern: str, field: str = "data.path") -> list[str]:
    """A glob, a file or a directory -> sorted file list; a clear error if nothing is there."""
    pattern = os.path.expanduser(pattern.strip())
    if _GLOB_CHARS.search(pattern):
        paths = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
        if not paths:
            raise ConfigError(
                field, f"the glob {pattern!r} matches no files", "check the pattern (quote it in a shell)"
            )
        return paths
    if os.path.isdir(pattern):
        paths = sorted(
            os.path.join(root, f) for root, _, files in os.walk(pattern) for f in files if not f.startswith(".")
        )
        if not paths:
            raise ConfigError(field, f"the directory {pattern!r} holds no files", "point it at your data files")
        return paths
    if not os.path.isfile(pattern):
        raise ConfigError(field, f"the path {pattern!r} does not exist", "give an existing file, directory or glob")
    return [pattern]


def to_text(raw: bytes | str) -> tuple[str, bool]:
    """Decode a document; invalid UTF-8 becomes U+FFFD. Returns (text, had_invalid_utf8)."""
    if isinstance(raw, bytes):
        try:
            return raw.decode("utf-8"), False
        except UnicodeDecodeError:
            return raw.decode("utf-8", errors="replace"), True
    try:
        raw.encode("utf-8")
        return raw, False
    except UnicodeEncodeError:
        # Lone surrogates: either invalid bytes smuggled through surrogateescape by a reader, or
        # \ud800-style escapes inside JSON. Recover the bytes where possible, then replace.
        try:
            data = raw.encode("utf-8", errors="surrogateescape")
        except UnicodeEncodeError:
            data = raw.encode("utf-8", errors="replace")
        return data.decode("utf-8", errors="replace"), True


class _FileHandles:
    """Lazily opened read-only descriptors, one per file per process; never pickled.

    `os.pread` carries its own offset, so grain's reader threads can share a descriptor
    (seek + read on a shared file object would interleave between threads).
    """

    def __init__(self, paths: list[str]):
        self.paths = paths
        self._fds: dict[int, int] = {}

    def read(self, file_idx: int, start: int, end: int) -> bytes:
        fd = self._fds.get(file_idx)
        if fd is None:
            new = os.open(self.paths[file_idx], os.O_RDONLY)
            fd = self._fds.setdefault(file_idx, new)
            if fd != new:  # another reader thread opened it first
                os.close(new)
        return os.pread(fd, end - start, start)

    def __del__(self, _close=os.close):  # bound early: `os` may be gone at interpreter exit
        for fd in self._fds.values():
            _close(fd)

    def __getstate__(self):
        return {"paths": self.paths}

    def __setstate__(self, state):
        self.__init__(state["paths"])


def _line_ranges(path: str) -> tuple[np.ndarray, np.ndarray]:
    """Byte [start, end) of every non-empty line (newline excluded), found with numpy."""
    data = np.fromfile(path, dtype=np.uint8)
    newlines = np.flatnonzero(data == ord("\n"))
    ends = np.append(newlines, len(data)) if (len(data) and data[-1] != ord("\n")) else newlines
    starts = np.concatenate([[0], ends[:-1] + 1]) if len(ends) else np.zeros(0, np.int64)
    keep = ends > starts
    return starts[keep].astype(np.int64), ends[keep].astype(np.int64)


class _RangeSource:
    """Documents given by (file index, byte start, byte end) triples."""

    def __init__(self, paths: list[str], file_idx: np.ndarray, starts: np.ndarray, ends: np.ndarray):
        self.paths = paths
        self._handles = _FileHandles(paths)
        self._file_idx, self._starts, self._ends = file_idx, starts, ends  # each int64 [N]

    def __len__(self) -> int:
        return len(self._starts)

    def _raw(self, i: int) -> bytes:
        return self._handles.read(int(self._file_idx[i]), int(self._starts[i]), int(self._ends[i]))


class TextSource(_RangeSource):
    """Plain text: one document per file, or per blank-line-separated block."""

    def __init__(self, paths: list[str], unit: str = "file"):
        if unit not in ("file", "block"):
            raise ConfigError("data.text_unit", f"unknown value {unit!r}", "use 'file' or 'block'")
        file_idx, starts, ends = [], [], []
        for k, path in enumerate(paths):
            if unit == "file":
                spans = [(0, os.path.getsize(path))]
            else:
                with open(path, "rb") as f:
                    data = f.read()
                cuts = [0] + [x for m in _BLANK_LINE.finditer(data) for x in (m.start(), m.end())] + [len(data)]
                spans = [(a, b) for a, b in zip(cuts[::2], cuts[1::2]) if data[a:b].strip()]
            for a, b in spans:
                file_idx.append(k)
                starts.append(a)
                ends.append(b)
        super().__init__(
            paths, np.asarray(file_idx, np.int64), np.asarray(starts, np.int64), np.asarray(ends, np.int64)
        )

    def __getitem__(self, i: int) -> bytes:
        return self._raw(i)


class JsonlSource(_RangeSource):
    """JSON Lines: one object per line, the document text in `field`."""

    def __init__(self, paths: list[str], field: str = "text"):
        self.field = field
        parts = [_line_ranges(p) for p in paths]
        file_idx = np.concatenate([np.full(len(s), k, np.int64) for k, (s, _) in enumerate(parts)])
        super().__init__(paths, file_idx, np.concatenate([s for s, _ in parts]), np.concatenate([e for _, e in parts]))
        # Check the field on the first line of every file now, so a typo fails before training.
        first = np.searchsorted(self._file_idx, np.arange(len(paths)))
        for k, i in enumerate(first):
            if i < len(self) and self._file_idx[i] == k:
                self[int(i)]

    def __getitem__(self, i: int) -> str:
        line = self._raw(i)
        path = self.paths[int(self._file_idx[i])]
        if not line.strip():
            return ""
        try:
            # surrogateescape keeps invalid bytes recoverable; to_text() replaces and counts them.
            obj = json.loads(line.decode("utf-8", errors="surrogateescape"))
        except json.JSONDecodeError as e:
            raise ConfigError(
                "data.path", f"{path}: a line at byte {self._starts[i]} is not JSON ({e})", "fix the file"
            ) from None
        if not isinstance(obj, dict) or self.field not in obj:
            keys = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
            raise ConfigError(
                "data.text_field",
                f"{path}: the record at byte {self._starts[i]} has no field {self.field!r} (it has {keys})",
                "set --config.data.text_field to the field holding the text",
            )
        value = obj[self.field]
        if value is None:
            return ""
        if not isinstance(value, str):
            raise ConfigError(
                "data.text_field",
                f"{path}: field {self.field!r} holds {type(value).__name__}, not text",
                "pick a text field",
            )
        return value


class ParquetSource:
    """Parquet: the document text in column `field`, rows addressed through row groups."""

    _CACHE_ROW_GROUPS = 4

    def __init__(self, paths: list[str], field: str = "text"):
        self.paths, self.field = paths, field
        groups, rows = [], []  # groups: (file index, row group); rows: rows in that group
        for k, path in enumerate(paths):
            try:
                meta = pq.ParquetFile(path).metadata
            except Exception as e:
                raise ConfigError(
                    "data.path", f"{path} is not a readable Parquet file ({e})", "check the file"
                ) from None
            names = meta.schema.to_arrow_schema().names
            if field not in names:
                raise ConfigError(
                    "data.text_field",
                    f"{path} has no column {field!r} (columns: {names})",
                    "set --config.data.text_field",
                )
            for g in range(meta.num_row_groups):
                groups.append((k, g))
                rows.append(meta.row_group(g).num_rows)
        self._groups = groups
        self._group_start = np.concatenate([[0], np.cumsum(rows, dtype=np.int64)])  # [G + 1]
        self._files: dict[int, object] = {}
        self._cache: collections.OrderedDict = collections.OrderedDict()

    def __len__(self) -> int:
        return int(self._group_start[-1])

    def _column(self, g: int) -> list:
        if g in self._cache:
            self._cache.move_to_end(g)
            return self._cache[g]
        k, rg = self._groups[g]
        if k not in self._files:
            self._files[k] = pq.ParquetFile(self.paths[k])
        values = self._files[k].read_row_group(rg, columns=[self.field]).column(0).to_pylist()
        self._cache[g] = values
        if len(self._cache) > self._CACHE_ROW_GROUPS:
            self._cache.popitem(last=False)
        return values

    def __getitem__(self, i: int) -> str | bytes:
        g = int(np.searchsorted(self._group_start, i, side="right")) - 1
        value = self._column(g)[i - int(self._group_start[g])]
        return "" if value is None else value

    def __getstate__(self):
        return {"paths": self.paths, "field": self.field, "groups": self._groups, "group_start": self._group_start}

    def __setstate__(self, s):
        self.paths, self.field, self._groups, self._group_start = s["paths"], s["field"], s["groups"], s["group_start"]
        self._files, self._cache = {}, collections.OrderedDict()


class ArrayRecordSource:
    """ArrayRecord files; one record holds one document's UTF-8 text."""

    def __init__(self, paths: list[str]):
        self.paths = paths
        try:
            self._source = grain.sources.ArrayRecordDataSource(paths)
        except Exception as e:
            raise ConfigError(
                "data.path", f"cannot open ArrayRecord files {paths[:3]}... ({e})", "check the files"
            ) from None

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, i: int) -> bytes:
        return self._source[i]


class TokenSource:
    """Prepared shards: one record = one document's token ids (specials included)."""

    def __init__(self, directory: str):
        self.manifest = read_manifest(directory)
        self._dtype = np.dtype(self.manifest["dtype"])
        paths = [os.path.join(directory, s["file"]) for s in self.manifest["shards"] if s["num_documents"]]
        self._source = grain.sources.ArrayRecordDataSource(paths) if paths else []

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, i: int) -> np.ndarray:  # int32 [L]
        return np.frombuffer(self._source[i], dtype=self._dtype).astype(np.int32)


def read_manifest(directory: str) -> dict:
    path = os.path.join(directory, MANIFEST)
    if not os.path.isfile(path):
        raise ConfigError(
            "data.path",
            f"{directory!r} has no {MANIFEST}, so it is not (complete) output of `nopejax data prepare`",
            "run `nopejax data prepare --config ... --out DIR` and point data.path at DIR",
        )
    with open(path) as f:
        manifest = json.load(f)
    if manifest.get("format") != FORMAT:
        raise ConfigError("data.path", f"{path} has format {manifest.get('format')!r}", f"prepare again ({FORMAT})")
    return manifest


def open_documents(kind: str, pattern: str, *, text_field: str = "text", text_unit: str = "file"):
    """The source for one `data.path` entry of the given `data.source` kind."""
    if kind == "prepared":
        return TokenSource(os.path.expanduser(pattern.strip()))
    paths = expand_paths(pattern)
    if kind == "text":
        return TextSource(paths, text_unit)
    if kind == "jsonl":
        return JsonlSource(paths, text_field)
    if kind == "parquet":
        return ParquetSource(paths, text_field)
    if kind == "arrayrecord":
        return ArrayRecordSource(paths)
    raise ConfigError(
        "data.source", f"{kind!r} is not a file source", "use text, jsonl, parquet, arrayrecord or prepared"
    )
