"""Reads and writes safetensors files with numpy alone (bf16 through ml_dtypes), tensor by tensor.

The format is an 8-byte little-endian header length, a JSON header {name: {dtype, shape,
data_offsets}} and the raw bytes. Reading memory-maps the file, so a tensor costs memory only
when it is used, and loading never needs torch.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Iterable, Mapping

import ml_dtypes
import numpy as np

DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}
NAMES = {np.dtype(v): k for k, v in DTYPES.items()}
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


class CheckpointError(ValueError):
  """A checkpoint file or key is missing, truncated or malformed."""


class SafetensorsFile:
  """Lazy access to the tensors of one `.safetensors` file."""

  def __init__(self, path: str):
    self.path = path
    try:
      size = os.path.getsize(path)
      with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        if header_len > size - 8:
          raise CheckpointError(f"{path}: header length {header_len} exceeds the file size {size}")
        header = json.loads(f.read(header_len))
    except FileNotFoundError:
      raise CheckpointError(f"{path}: file not found") from None
    except (struct.error, json.JSONDecodeError, UnicodeDecodeError) as e:
      raise CheckpointError(f"{path}: not a safetensors file ({e})") from None
    self.metadata = header.pop("__metadata__", {}) or {}
    self.header = header
    self._data_start = 8 + header_len
    end = max((v["data_offsets"][1] for v in header.values()), default=0)
    if self._data_start + end > size:
      raise CheckpointError(f"{path}: truncated: the header describes {self._data_start + end} "
                            f"bytes but the file has {size}")
    self._mmap = np.memmap(path, dtype=np.uint8, mode="r") if size else None

  def keys(self) -> list[str]:
    return list(self.header)

  def shape(self, key: str) -> tuple[int, ...]:
    return tuple(self.header[key]["shape"])

  def get(self, key: str) -> np.ndarray:
    """The tensor as a read-only array backed by the memory map."""
    if key not in self.header:
      raise CheckpointError(f"{self.path}: no tensor named {key!r}")
    info = self.header[key]
    if info["dtype"] not in DTYPES:
      raise CheckpointError(f"{self.path}: tensor {key!r} has unsupported dtype {info['dtype']}")
    start, end = info["data_offsets"]
    raw = self._mmap[self._data_start + start:self._data_start + end]
    dtype = np.dtype(DTYPES[info["dtype"]])
    if raw.size != dtype.itemsize * int(np.prod(info["shape"], dtype=np.int64)):
      raise CheckpointError(f"{self.path}: tensor {key!r} has {raw.size} bytes, which does not "
                            f"match shape {info['shape']} of {info['dtype']}")
    return raw.view(dtype).reshape(info["shape"])


class SafetensorsCheckpoint:
  """All tensors of a directory: `model.safetensors`, or shards listed in the index file."""

  def __init__(self, directory: str, prefix: str = "model"):
    self.directory = directory
    index = os.path.join(directory, f"{prefix}.safetensors.index.json")
    single = os.path.join(directory, f"{prefix}.safetensors")
    if os.path.exists(index):
      try:
        with open(index) as f:
          weight_map = json.load(f)["weight_map"]
      except (json.JSONDecodeError, KeyError) as e:
        raise CheckpointError(f"{index}: malformed index file ({e})") from None
      files = sorted(set(weight_map.values()))
      missing = [f for f in files if not os.path.exists(os.path.join(directory, f))]
      if missing:
        raise CheckpointError(f"{index} lists shard(s) that are missing from {directory}: "
                              f"{missing}")
    elif os.path.exists(single):
      files = [os.path.basename(single)]
      weight_map = None
    else:
      raise CheckpointError(f"{directory}: no {prefix}.safetensors or "
                            f"{prefix}.safetensors.index.json")
    self.files = {name: SafetensorsFile(os.path.join(directory, name)) for name in files}
    self.weight_map = weight_map or {k: files[0] for k in self.files[files[0]].keys()}
    for key, name in self.weight_map.items():
      if key not in self.files[name].header:
        raise CheckpointError(f"{os.path.join(directory, name)}: the index says it holds "
                              f"{key!r}, but it does not")

  def keys(self) -> list[str]:
    return list(self.weight_map)

  def __contains__(self, key: str) -> bool:
    return key in self.weight_map

  def shape(self, key: str) -> tuple[int, ...]:
    return self.files[self.weight_map[key]].shape(key)

  def get(self, key: str) -> np.ndarray:
    if key not in self.weight_map:
      raise CheckpointError(f"{self.directory}: no tensor named {key!r}")
    return self.files[self.weight_map[key]].get(key)

  def where(self, key: str) -> str:
    return os.path.join(self.directory, self.weight_map[key])


def write_file(path: str, tensors: Iterable[tuple[str, np.ndarray]] | Mapping[str, np.ndarray],
               metadata: Mapping[str, str] | None = None) -> None:
  """Writes tensors to one safetensors file, streaming them after the header."""
  items = list(tensors.items() if isinstance(tensors, Mapping) else tensors)
  header: dict = {"__metadata__": dict(metadata)} if metadata else {}
  offset = 0
  for name, array in items:
    dtype = np.dtype(array.dtype)
    if dtype not in NAMES:
      raise CheckpointError(f"{path}: cannot store tensor {name!r} of dtype {dtype}")
    nbytes = array.size * dtype.itemsize
    header[name] = {"dtype": NAMES[dtype], "shape": list(array.shape),
                    "data_offsets": [offset, offset + nbytes]}
    offset += nbytes
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)  # the format aligns the data start to 8 bytes
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(blob)))
    f.write(blob)
    for _, array in items:
      f.write(np.ascontiguousarray(array).tobytes())


