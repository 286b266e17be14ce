"""Streaming safetensors reader and writer.

The writer lays out the header from shapes alone and then writes one tensor at a time, so an
export holds one tensor on the host at once, not the model (a 3B export would otherwise need
several copies in RAM). The reader memory-maps each file and returns one tensor per call.
Format: 8-byte little-endian header length, a JSON header {name: {dtype, shape, data_offsets}},
then the raw little-endian bytes (https://github.com/huggingface/safetensors).
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Callable, Iterable

import ml_dtypes
import numpy as np

DTYPES = {
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F64": np.dtype(np.float64),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
}
NAMES = {v: k for k, v in DTYPES.items()}
FLOAT_DTYPES = {"F32", "F16", "BF16", "F64"}
MAX_SHARD_BYTES = 4 * 2**30


def write(
    out_dir: str,
    specs: Iterable[tuple[str, tuple[int, ...], np.dtype]],
    produce: Callable[[str], np.ndarray],
    max_shard_bytes: int = MAX_SHARD_BYTES,
) -> list[str]:
    """Write tensors `specs` (name, shape, dtype), asking `produce(name)` for each in turn.

    One file `model.safetensors` when it fits in `max_shard_bytes`, else numbered shards plus
    `model.safetensors.index.json`, as transformers expects.
    """
    specs = list(specs)
    shards, current, size = [], [], 0
    for name, shape, dtype in specs:
        nbytes = math.prod(shape) * np.dtype(dtype).itemsize
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append((name, tuple(shape), np.dtype(dtype)))
        size += nbytes
    shards.append(current)

    files = []
    weight_map = {}
    for n, shard in enumerate(shards):
        fname = "model.safetensors" if len(shards) == 1 else f"model-{n + 1:05d}-of-{len(shards):05d}.safetensors"
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name, shape, dtype in shard:
            nbytes = math.prod(shape) * dtype.itemsize
            header[name] = {"dtype": NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
            weight_map[name] = fname
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # data starts 8-byte aligned
        with open(os.path.join(out_dir, fname), "wb") as f:
            f.write(struct.pack("<Q", len(blob)))
            f.write(blob)
            for name, shape, dtype in shard:
                array = np.ascontiguousarray(produce(name), dtype=dtype)
                if array.shape != shape:
                    raise ValueError(f"tensor {name}: produced shape {array.shape}, declared {shape}")
                f.write(array.reshape(-1).view(np.uint8))  # a view: no bytes copy of the tensor
        files.append(fname)
    if len(shards) > 1:
        total = sum(math.prod(s) * np.dtype(d).itemsize for _, s, d in specs)
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
            json.dump(index, f, indent=2)
    return files


class Reader:
    """All tensors of a HF checkpoint directory (one file or an indexed set), read lazily."""

    def __init__(self, hf_dir: str):
        index = os.path.join(hf_dir, "model.safetensors.index.json")
        if os.path.exists(index):
            with open(index) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        elif os.path.exists(os.path.join(hf_dir, "model.safetensors")):
            files = ["model.safetensors"]
        else:
            raise FileNotFoundError(f"{hf_dir} has no model.safetensors or model.safetensors.index.json")
        self._where = {}
        for fname in files:
            path = os.path.join(hf_dir, fname)
            with open(path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(n))
            header.pop("__metadata__", None)
            for name, info in header.items():
                self._where[name] = (path, 8 + n, info)

    def names(self) -> list[str]:
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._where[name][2]["shape"])

    def dtype(self, name: str) -> str:
        """The safetensors dtype name, e.g. "BF16", from the header (nothing is read)."""
        return self._where[name][2]["dtype"]

    def get(self, name: str) -> np.ndarray:
        if name not in self._where:
            raise KeyError(f"tensor {name!r} is missing from the checkpoint")
        path, base, info = self._where[name]
        if info["dtype"] not in DTYPES:
            raise ValueError(f"tensor {name!r} has dtype {info['dtype']}, which nopejax does not read")
        dtype = DTYPES[info["dtype"]]
        start, end = info["data_offsets"]
        mm = np.memmap(path, dtype=np.uint8, mode="r", offset=base + start, shape=(end - start,))
        return np.array(mm.view(dtype).reshape(info["shape"]))
