"""Tests of `emola_jax.data.shards`: serialisation, ArrayRecord writing and Grain reading."""

from __future__ import annotations

import os
import pickle

import grain
import msgpack
import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordReader

from emola_jax.data import shards


def _example(i: int, prior_dim: int = 4) -> dict:
  return {
      "id": f"src/{i:03d}",
      "source": "AffectNet" if i % 2 else "RAF-DB",
      "task": "emotion",
      "image_bytes": bytes([0, 255, i % 256, 0]) * (i + 1),  # NUL bytes must survive.
      "prior": (np.arange(prior_dim, dtype=np.float32) + i / 7).astype(np.float32),
      "conversations": [{"from": "human", "value": f"Ünïcode ✓ {i}\n<image>"},
                        {"from": "gpt", "value": "answer " * i}],
      "label": "Happiness" if i % 3 else "",
      "gpt4": "",
  }


def _assert_same(a: dict, b: dict) -> None:
  assert set(a) == set(b) == set(shards.EXAMPLE_FIELDS)
  for key in shards.EXAMPLE_FIELDS:
    if key == "prior":
      assert b[key].dtype == np.float32 and b[key].ndim == 1
      np.testing.assert_array_equal(a[key], b[key])
    else:
      assert a[key] == b[key], key


def test_encode_decode_round_trip():
  for i in (0, 1, 5):
    example = _example(i)
    decoded = shards.decode_example(shards.encode_example(example))
    _assert_same(example, decoded)
    assert isinstance(decoded["image_bytes"], bytes)
  empty = {**_example(2), "prior": np.zeros(0, np.float32)}
  assert shards.decode_example(shards.encode_example(empty))["prior"].shape == (0,)


def test_encoding_is_plain_msgpack_without_pickle():
  payload = msgpack.unpackb(shards.encode_example(_example(3)), raw=False)
  assert payload["v"] == shards.FORMAT_VERSION
  assert payload["image_bytes"] == _example(3)["image_bytes"]
  np.testing.assert_array_equal(np.frombuffer(payload["prior"], "<f4"), _example(3)["prior"])
  # A pickle (or any other byte string) is refused, never executed.
  with pytest.raises(ValueError):
    shards.decode_example(pickle.dumps(_example(3)))
  with pytest.raises(ValueError, match="version"):
    shards.decode_example(msgpack.packb({"v": 99}))


@pytest.mark.parametrize("change, match", [
    ({"extra": 1}, "unexpected"),
    ({"label": None}, "label"),
    ({"image_bytes": "text"}, "image_bytes"),
    ({"prior": np.zeros((2, 2), np.float32)}, "prior"),
    ({"prior": np.array(["a"])}, "prior"),
    ({"conversations": [{"from": "human"}]}, "turn 0"),
])
def test_encode_rejects_bad_examples(change, match):
  example = {**_example(1), **change}
  with pytest.raises(ValueError, match=match):
    shards.encode_example(example)
  missing = _example(1)
  del missing["gpt4"]
  with pytest.raises(ValueError, match="missing"):
    shards.encode_example(missing)


def _shard_counts(out_dir, meta):
  counts = []
  for shard in meta["shards"]:
    reader = ArrayRecordReader(os.path.join(out_dir, shard["file"]))
    counts.append(reader.num_records())
    reader.close()
  return counts


def test_contiguous_round_trip(tmp_path):
  examples = [_example(i) for i in range(10)]
  meta = shards.write_shards(examples, tmp_path, "train", examples_per_shard=3, source="faba",
                             skips={"missing_image": {"count": 2}})
  assert meta["count"] == 10 and meta["layout"] == "contiguous"
  assert [s["file"] for s in meta["shards"]] == [
      f"train.array_record-0000{k}-of-00004" for k in range(4)]
  # Counted by array_record's own reader, independently of our metadata.
  assert _shard_counts(tmp_path, meta) == [3, 3, 3, 1] == [s["count"] for s in meta["shards"]]
  assert meta["prior_dim"] == 4 and meta["source"] == "faba"
  assert meta["sources"] == {"AffectNet": 5, "RAF-DB": 5} and meta["tasks"] == {"emotion": 10}
  assert meta["skips"] == {"missing_image": {"count": 2}}
  assert shards.read_meta(tmp_path, "train") == meta
  source = shards.open_split(tmp_path, "train")
  assert isinstance(source, grain.sources.RandomAccessDataSource)
  assert len(source) == 10
  for i, example in enumerate(examples):
    _assert_same(example, source[i])
  _assert_same(examples[9], source[-1])
  with pytest.raises(IndexError):
    source[10]
  got = source.__getitems__([7, 0])
  _assert_same(examples[7], got[0])
  # Through Grain's own dataset API, shuffled: the same examples come back.
  dataset = grain.MapDataset.source(source).shuffle(seed=0)
  assert sorted(e["id"] for e in dataset) == [e["id"] for e in examples]
  # Picklable for Grain worker processes.
  _assert_same(examples[4], pickle.loads(pickle.dumps(source))[4])
  raw = shards.open_split(tmp_path, "train", decode=False)
  _assert_same(examples[2], shards.decode_example(raw[2]))


def test_interleaved_stream_keeps_order(tmp_path):
  examples = [_example(i) for i in range(10)]
  meta = shards.write_shards((e for e in examples), tmp_path, "test", num_shards=4)
  assert meta["layout"] == "interleaved"
  assert _shard_counts(tmp_path, meta) == [3, 3, 2, 2]
  source = shards.open_split(tmp_path, "test")
  assert [source[i]["id"] for i in range(10)] == [e["id"] for e in examples]
  for i in (0, 3, 9):
    _assert_same(examples[i], source[i])
  # Fewer examples than shards: no empty shard files.
  meta = shards.write_shards(examples[:2], tmp_path, "tiny", num_shards=5)
  assert len(meta["shards"]) == 2
  assert [shards.open_split(tmp_path, "tiny")[i]["id"] for i in range(2)] == ["src/000", "src/001"]


def test_concatenated_splits_and_rewrite(tmp_path):
  first = [_example(i) for i in range(5)]
  second = [_example(i) for i in range(5, 8)]
  shards.write_shards(first, tmp_path, "fold0", num_shards=2)
  shards.write_shards(second, tmp_path, "fold1", examples_per_shard=2)
  both = shards.open_split(tmp_path, "fold0+fold1")
  assert [both[i]["id"] for i in range(len(both))] == [e["id"] for e in first + second]
  assert len(shards.open_split(tmp_path, ["fold1", "fold0"])) == 8
  # Re-writing a split with fewer shards leaves no stale shard behind.
  shards.write_shards(first[:1], tmp_path, "fold0", num_shards=1)
  assert sorted(n for n in os.listdir(tmp_path) if n.startswith("fold0.array_record")) == [
      "fold0.array_record-00000-of-00001"]
  assert len(shards.open_split(tmp_path, "fold0")) == 1


def test_empty_split(tmp_path):
  meta = shards.write_shards([], tmp_path, "test", prior_dim=212)
  assert meta["count"] == 0 and meta["shards"] == [] and meta["prior_dim"] == 212
  source = shards.open_split(tmp_path, "test")
  assert len(source) == 0
  with pytest.raises(IndexError):
    source[0]


def test_errors(tmp_path):
  bad = [_example(0, prior_dim=4), _example(1, prior_dim=5)]
  with pytest.raises(ValueError, match="prior of length 5"):
    shards.write_shards(bad, tmp_path, "train", num_shards=2)
  # A failed write leaves neither shards, temporary files nor meta.
  assert os.listdir(tmp_path) == []
  with pytest.raises(ValueError, match="prior of length 4"):
    shards.write_shards([_example(0)], tmp_path, "train", prior_dim=212)
  with pytest.raises(ValueError, match="not both"):
    shards.write_shards([], tmp_path, "train", num_shards=1, examples_per_shard=1)
  with pytest.raises(ValueError, match="split name"):
    shards.write_shards([], tmp_path, "a+b")
  with pytest.raises(ValueError, match="redefine"):
    shards.write_shards([], tmp_path, "train", extra_meta={"count": 3})
  with pytest.raises(shards.ShardError, match="emola-prepare"):
    shards.open_split(tmp_path, "validation")
  shards.write_shards([_example(0)], tmp_path, "train")
  shards.write_shards([_example(0, prior_dim=3)], tmp_path, "other")
  with pytest.raises(shards.ShardError, match="prior_dim"):
    shards.open_split(tmp_path, "train+other")
  os.remove(tmp_path / "train.array_record-00000-of-00001")
  with pytest.raises(shards.ShardError, match="missing"):
    shards.open_split(tmp_path, "train")
