"""Training-ready shards: ArrayRecord files of serialised examples plus a `<split>.meta.json`.

An *example* is a plain dict with exactly these keys:

| key | type | meaning |
|---|---|---|
| `id` | str | record id |
| `source` | str | dataset the image comes from (e.g. "AffectNet", "RAF-DB") |
| `task` | str | "emotion" or "au" |
| `image_bytes` | bytes | the encoded image file exactly as on disk |
| `prior` | np.float32 1-D | landmark prior (length 0 when the record has none) |
| `conversations` | list of {"from", "value"} | the conversation, FABA style |
| `label` | str | class name / AU string, "" if none |
| `gpt4` | str | reference description, "" if none |

Serialisation (`encode_example`/`decode_example`) is msgpack (no pickle: shards may come from
elsewhere and must never execute code when read): a map with a format version, strings as UTF-8,
the image as raw bytes and the prior as little-endian float32 bytes.

On disk, split `train` of `out_dir` is `train.array_record-00000-of-00004` ... plus
`train.meta.json` (count, fields, prior_dim, source, per-source and per-task counts, skip counts,
shard files and their counts, layout). ArrayRecord is written with `group_size:1` so any example
can be read on its own (random access for Grain). Two layouts keep the reading order equal to
the writing order:

* `contiguous` (`examples_per_shard`): shard k holds examples [k*E, (k+1)*E);
* `interleaved` (`num_shards`, works on a stream of unknown length): example i is in shard
  i % K at position i // K.

`open_split` returns a Grain `RandomAccessDataSource` that decodes examples in the original
order; several splits can be opened as one (`"fold0+fold1"` or a list).
"""

from __future__ import annotations

import glob
import json
import math
import os
from typing import Any, Iterable, Mapping, Sequence

import msgpack
import numpy as np
from array_record.python.array_record_module import ArrayRecordWriter
import grain

FORMAT_VERSION = 1
EXAMPLE_FIELDS = ("id", "source", "task", "image_bytes", "prior", "conversations", "label",
                  "gpt4")
_STR_FIELDS = ("id", "source", "task", "label", "gpt4")
_WRITER_OPTIONS = "group_size:1,uncompressed"  # JPEG/PNG bytes do not compress further.


class ShardError(ValueError):
  """Shards or their metadata are missing or inconsistent."""


def _shard_name(split: str, index: int, total: int) -> str:
  return f"{split}.array_record-{index:05d}-of-{total:05d}"


def meta_path(out_dir: str | os.PathLike[str], split: str) -> str:
  return os.path.join(os.fspath(out_dir), f"{split}.meta.json")


def encode_example(example: Mapping[str, Any]) -> bytes:
  """Serialises one example dict (see the module docstring for the schema).

  Raises:
    ValueError: naming the example id and the offending field.
  """
  ident = example.get("id", "<no id>")
  keys = set(example)
  if keys != set(EXAMPLE_FIELDS):
    fields = set(EXAMPLE_FIELDS)
    raise ValueError(f"example {ident!r}: keys must be {sorted(fields)}; missing "
                     f"{sorted(fields - keys)}, unexpected {sorted(keys - fields)}")
  for key in _STR_FIELDS:
    if not isinstance(example[key], str):
      raise ValueError(f"example {ident!r}: field {key!r} must be str, got "
                       f"{type(example[key]).__name__}")
  image = example["image_bytes"]
  if not isinstance(image, (bytes, bytearray, memoryview)):
    raise ValueError(f"example {ident!r}: image_bytes must be bytes, got {type(image).__name__}")
  prior = np.asarray(example["prior"])
  if prior.ndim != 1 or not (prior.size == 0 or np.issubdtype(prior.dtype, np.floating)):
    raise ValueError(f"example {ident!r}: prior must be a 1-D float array, got shape "
                     f"{prior.shape} dtype {prior.dtype}")
  turns = []
  for i, turn in enumerate(example["conversations"]):
    if (not isinstance(turn, Mapping) or set(turn) != {"from", "value"}
        or not all(isinstance(turn[k], str) for k in ("from", "value"))):
      raise ValueError(f"example {ident!r}: conversation turn {i} must be "
                       "{'from': str, 'value': str}")
    turns.append([turn["from"], turn["value"]])
  payload = {
      "v": FORMAT_VERSION,
      **{key: example[key] for key in _STR_FIELDS},
      "image_bytes": bytes(image),
      "prior": prior.astype("<f4").tobytes(),
      "conversations": turns,
  }
  return msgpack.packb(payload, use_bin_type=True)


def decode_example(data: bytes) -> dict[str, Any]:
  """Inverse of `encode_example`.

  Raises:
    ValueError: for data that is not an encoded example of a known format version.
  """
  try:
    payload = msgpack.unpackb(data, raw=False, use_list=True, strict_map_key=True)
  except (msgpack.UnpackException, ValueError) as e:
    raise ValueError(f"not an encoded example: {e}") from e
  if not isinstance(payload, dict) or payload.get("v") != FORMAT_VERSION:
    version = payload.get("v") if isinstance(payload, dict) else None
    raise ValueError(f"example format version {version!r} is not {FORMAT_VERSION}; re-run "
                     "emola-prepare with this version of emola-jax")
  return {
      **{key: payload[key] for key in ("id", "source", "task")},
      "image_bytes": payload["image_bytes"],
      "prior": np.frombuffer(payload["prior"], dtype="<f4").astype(np.float32),
      "conversations": [{"from": r, "value": v} for r, v in payload["conversations"]],
      "label": payload["label"],
      "gpt4": payload["gpt4"],
  }


def _remove_split_files(out_dir: str, split: str) -> None:
  for path in glob.glob(os.path.join(glob.escape(out_dir), f"{glob.escape(split)}.array_record-*")):
    os.remove(path)
  if os.path.exists(meta_path(out_dir, split)):
    os.remove(meta_path(out_dir, split))


def write_shards(examples: Iterable[Mapping[str, Any]], out_dir: str | os.PathLike[str],
                 split: str, num_shards: int | None = None,
                 examples_per_shard: int | None = None, *, source: str = "",
                 prior_dim: int | None = None, skips: Any = None,
                 extra_meta: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """Writes `examples` as ArrayRecord shards of `split` in `out_dir`, then its meta.json.

  Existing shards of the same split are replaced (the meta file is written last, so a crashed
  run leaves no meta and `open_split` refuses the split).

  Args:
    examples: example dicts (any iterable; consumed once).
    out_dir: output folder (created).
    split: split name, e.g. "train"; letters, digits, "_", "-" and "." only.
    num_shards: number of shards (interleaved layout); or
    examples_per_shard: shard size (contiguous layout). Neither: one shard.
    source: what the split was built from (e.g. "faba", "rafdb"), stored in meta.
    prior_dim: the prior length every example must have (default: the first example's).
    skips: a `SkipReport` (read after the examples are consumed, so a report filled while
      streaming is complete) or its `as_dict()`; stored in meta.
    extra_meta: more JSON-ready metadata to store (must not redefine the keys above).

  Returns:
    The metadata written to `<split>.meta.json`.

  Raises:
    ValueError: bad arguments, an invalid example, or priors of different lengths.
  """
  if not split or not all(c.isalnum() or c in "_-." for c in split) or "+" in split:
    raise ValueError(f"split name {split!r} must be non-empty letters, digits, '_', '-', '.'")
  if num_shards is not None and examples_per_shard is not None:
    raise ValueError("give num_shards or examples_per_shard, not both")
  if num_shards is None and examples_per_shard is None:
    num_shards = 1
  if num_shards is not None and num_shards < 1:
    raise ValueError(f"num_shards must be >= 1, got {num_shards}")
  if examples_per_shard is not None and examples_per_shard < 1:
    raise ValueError(f"examples_per_shard must be >= 1, got {examples_per_shard}")
  out_dir = os.fspath(out_dir)
  os.makedirs(out_dir, exist_ok=True)
  _remove_split_files(out_dir, split)
  tmp = lambda k: os.path.join(out_dir, f".{split}.tmp-{k:05d}")  # noqa: E731
  writers: list[ArrayRecordWriter] = []
  counts: list[int] = []
  by_source: dict[str, int] = {}
  by_task: dict[str, int] = {}
  total = 0
  ok = False
  try:
    if num_shards is not None:
      writers = [ArrayRecordWriter(tmp(k), _WRITER_OPTIONS) for k in range(num_shards)]
      counts = [0] * num_shards
    for example in examples:
      dim = int(np.asarray(example.get("prior", ())).size)
      if prior_dim is None:
        prior_dim = dim
      elif dim != prior_dim:
        raise ValueError(f"example {example.get('id')!r} has a prior of length {dim}, but "
                         f"split {split!r} has prior_dim {prior_dim}")
      data = encode_example(example)
      if num_shards is not None:
        k = total % num_shards
      else:
        k = total // examples_per_shard
        if k == len(writers):
          writers.append(ArrayRecordWriter(tmp(k), _WRITER_OPTIONS))
          counts.append(0)
      writers[k].write(data)
      counts[k] += 1
      total += 1
      by_source[example["source"]] = by_source.get(example["source"], 0) + 1
      by_task[example["task"]] = by_task.get(example["task"], 0) + 1
    ok = True
  finally:
    for writer in writers:
      writer.close()
    if not ok:  # Leave no partial shards behind.
      for k in range(len(writers)):
        if os.path.exists(tmp(k)):
          os.remove(tmp(k))
  # Interleaved shards beyond the example count would be empty: drop them.
  if num_shards is not None and total < num_shards:
    for k in range(total, num_shards):
      os.remove(tmp(k))
    counts = counts[:total]
  files = []
  for k, count in enumerate(counts):
    name = _shard_name(split, k, len(counts))
    os.replace(tmp(k), os.path.join(out_dir, name))
    files.append({"file": name, "count": count})
  if skips is not None and hasattr(skips, "as_dict"):
    skips = skips.as_dict()
  meta = {
      "format_version": FORMAT_VERSION,
      "serialisation": "msgpack",
      "split": split,
      "count": total,
      "fields": list(EXAMPLE_FIELDS),
      "prior_dim": prior_dim or 0,
      "source": source,
      "sources": dict(sorted(by_source.items())),
      "tasks": dict(sorted(by_task.items())),
      "skips": dict(skips or {}),
      "layout": "interleaved" if num_shards is not None else "contiguous",
      "shards": files,
  }
  clash = sorted(set(meta) & set(extra_meta or {}))
  if clash:
    raise ValueError(f"extra_meta must not redefine {clash}")
  meta.update(extra_meta or {})
  with open(meta_path(out_dir, split) + ".tmp", "w", encoding="utf-8") as f:
    json.dump(meta, f, indent=1)
  os.replace(meta_path(out_dir, split) + ".tmp", meta_path(out_dir, split))
  return meta


def read_meta(data_dir: str | os.PathLike[str], split: str) -> dict[str, Any]:
  """Loads `<split>.meta.json`, naming what to do when it is missing."""
  path = meta_path(data_dir, split)
  if not os.path.exists(path):
    pattern = os.path.join(glob.escape(os.fspath(data_dir)), "*.meta.json")
    present = sorted(os.path.basename(p)[:-len(".meta.json")] for p in glob.glob(pattern))
    raise ShardError(f"{path} not found: split {split!r} was not prepared in {data_dir} (splits "
                     f"there: {present or 'none'}); run emola-prepare first")
  with open(path, encoding="utf-8") as f:
    meta = json.load(f)
  if meta.get("format_version") != FORMAT_VERSION:
    raise ShardError(f"{path}: format_version {meta.get('format_version')!r} is not "
                     f"{FORMAT_VERSION}; re-run emola-prepare")
  return meta


def _raw_index_map(meta: dict[str, Any], where: str) -> np.ndarray | None:
  """Order index -> position in the concatenated shard files (None when it is the identity)."""
  counts = [s["count"] for s in meta["shards"]]
  if sum(counts) != meta["count"]:
    raise ShardError(f"{where}: shard counts {counts} do not add up to count {meta['count']}")
  if meta["layout"] == "contiguous" or len(counts) <= 1:
    return None
  if meta["layout"] != "interleaved":
    raise ShardError(f"{where}: unknown layout {meta['layout']!r}")
  k, n = len(counts), meta["count"]
  if counts != [math.ceil((n - j) / k) for j in range(k)]:
    raise ShardError(f"{where}: shard counts {counts} are not an interleaved layout of {n}")
  offsets = np.concatenate([[0], np.cumsum(counts)[:-1]])
  i = np.arange(n)
  return (offsets[i % k] + i // k).astype(np.int64)


class ExampleSource:
  """Random-access source of decoded examples over one or more prepared splits.

  Satisfies `grain.sources.RandomAccessDataSource`; picklable (for Grain worker processes).
  """

  def __init__(self, data_dir: str | os.PathLike[str], splits: Sequence[str],
               decode: bool = True):
    self._data_dir = os.fspath(data_dir)
    self._splits = tuple(splits)
    self._decode = decode
    self.metas = [read_meta(data_dir, s) for s in self._splits]
    dims = {m["prior_dim"] for m in self.metas if m["count"]}
    if len(dims) > 1:
      raise ShardError(f"splits {list(self._splits)} of {data_dir} have different prior_dim "
                       f"{sorted(dims)}; they cannot be read as one")
    self.prior_dim = dims.pop() if dims else 0
    paths: list[str] = []
    maps: list[np.ndarray] = []
    for split, meta in zip(self._splits, self.metas):
      where = meta_path(data_dir, split)
      for shard in meta["shards"]:
        path = os.path.join(self._data_dir, shard["file"])
        if not os.path.exists(path):
          raise ShardError(f"{where}: shard {path} is missing; re-run emola-prepare")
        paths.append(path)
      local = _raw_index_map(meta, where)
      base = sum(len(m) for m in maps)
      maps.append(base + (np.arange(meta["count"]) if local is None else local))
    self._index = np.concatenate(maps).astype(np.int64) if maps else np.zeros(0, np.int64)
    self._source = grain.sources.ArrayRecordDataSource(paths) if paths else None
    if self._source is not None and len(self._source) != len(self._index):
      raise ShardError(f"shards of {list(self._splits)} in {data_dir} hold {len(self._source)} "
                       f"records but meta says {len(self._index)}; re-run emola-prepare")

  def __len__(self) -> int:
    return len(self._index)

  def _raw(self, index: int) -> int:
    if not -len(self) <= index < len(self):
      raise IndexError(f"index {index} out of range for {len(self)} examples")
    return int(self._index[index])

  def __getitem__(self, index: int) -> dict[str, Any] | bytes:
    data = self._source[self._raw(index)]
    return decode_example(data) if self._decode else data

  def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any] | bytes]:
    datas = self._source.__getitems__([self._raw(i) for i in indices])
    return [decode_example(d) for d in datas] if self._decode else list(datas)

  def __repr__(self) -> str:
    return (f"ExampleSource(data_dir={self._data_dir!r}, splits={self._splits!r}, "
            f"decode={self._decode})")


def open_split(data_dir: str | os.PathLike[str], split: str | Sequence[str],
               decode: bool = True) -> ExampleSource:
  """Opens prepared split(s) as a Grain random-access source of example dicts.

  Args:
    data_dir: the folder `emola-prepare --output` wrote.
    split: a split name, several joined by "+" ("fold0+fold1"), or a list of names.
    decode: False yields the serialised bytes (decode later with `decode_example`).

  Raises:
    ShardError: a split's meta or shards are missing or inconsistent.
  """
  splits = split.split("+") if isinstance(split, str) else list(split)
  return ExampleSource(data_dir, splits, decode=decode)
