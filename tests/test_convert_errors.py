"""Bad input to emola-convert: a clear error naming file and key, and no (partial) output left."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from emola_jax.cli import convert
from emola_jax.conversion import native, reference_release
from emola_jax.conversion.safetensors_io import CheckpointError
from tests import hf_tiny
from tests.test_reference_import import write_release

LAYER_KEY = "language_model.model.layers.1.self_attn.k_proj.weight"


@pytest.fixture(scope="module")
def sharded_hf(tmp_path_factory):
  """A tiny LLaVA saved in two safetensors shards with an index."""
  model = hf_tiny.llava(seed=2)
  path = tmp_path_factory.mktemp("hf")
  model.save_pretrained(path)
  state = load_file(str(path / "model.safetensors"))
  os.remove(path / "model.safetensors")
  keys = sorted(state)
  shards = {"model-00001-of-00002.safetensors": keys[:len(keys) // 2],
            "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
  for name, shard_keys in shards.items():
    save_file({k: state[k] for k in shard_keys}, str(path / name), metadata={"format": "pt"})
  (path / "model.safetensors.index.json").write_text(json.dumps(
      {"metadata": {}, "weight_map": {k: n for n, ks in shards.items() for k in ks}}))
  return path


def _copy(src, tmp_path):
  dst = tmp_path / "in"
  shutil.copytree(src, dst)
  return dst


def _shard_of(path, key):
  return json.loads((path / "model.safetensors.index.json").read_text())["weight_map"][key]


def _rewrite(path, shard, change):
  state = load_file(str(path / shard))
  change(state)
  save_file(state, str(path / shard), metadata={"format": "pt"})


def _assert_fails_cleanly(tmp_path, source, input_dir, match, **kwargs):
  out = tmp_path / "out"
  with pytest.raises(CheckpointError, match=match) as info:
    convert.convert(source, "native", str(input_dir), str(out), **kwargs)
  assert not out.exists()
  assert not [p for p in os.listdir(tmp_path) if ".partial-" in p]
  return str(info.value)


def test_missing_shard(sharded_hf, tmp_path):
  path = _copy(sharded_hf, tmp_path)
  os.remove(path / "model-00002-of-00002.safetensors")
  message = _assert_fails_cleanly(tmp_path, "hf", path, "missing")
  assert "model.safetensors.index.json" in message and "model-00002-of-00002" in message


def test_wrong_shape(sharded_hf, tmp_path):
  path = _copy(sharded_hf, tmp_path)
  shard = _shard_of(path, LAYER_KEY)
  _rewrite(path, shard, lambda s: s.update({LAYER_KEY: s[LAYER_KEY][:, :-1].contiguous()}))
  message = _assert_fails_cleanly(tmp_path, "hf", path, "has shape")
  assert shard in message and LAYER_KEY in message


def test_unknown_key(sharded_hf, tmp_path):
  path = _copy(sharded_hf, tmp_path)
  shard = _shard_of(path, LAYER_KEY)
  extra = "language_model.model.layers.0.self_attn.extra_proj.weight"
  _rewrite(path, shard, lambda s: s.update({extra: torch.zeros(4, 4)}))
  index = json.loads((path / "model.safetensors.index.json").read_text())
  index["weight_map"][extra] = shard
  (path / "model.safetensors.index.json").write_text(json.dumps(index))
  message = _assert_fails_cleanly(tmp_path, "hf", path, "unexpected tensor")
  assert shard in message and extra in message


def test_truncated_file(sharded_hf, tmp_path):
  path = _copy(sharded_hf, tmp_path)
  shard = path / "model-00002-of-00002.safetensors"
  with open(shard, "r+b") as f:
    f.truncate(os.path.getsize(shard) - 100)
  message = _assert_fails_cleanly(tmp_path, "hf", path, "truncated")
  last = max(load_file_header(shard).items(), key=lambda kv: kv[1]["data_offsets"][1])[0]
  assert shard.name in message and last in message


def load_file_header(path):
  with open(path, "rb") as f:
    n = int.from_bytes(f.read(8), "little")
    header = json.loads(f.read(n))
  header.pop("__metadata__", None)
  return header


def test_failure_while_writing_leaves_nothing(sharded_hf, tmp_path, monkeypatch):
  def fail_midway(model, out_dir, **kwargs):
    (tmp_path / "marker").write_text(out_dir)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
      f.write("{}")
    raise OSError("disk full")

  monkeypatch.setattr(native, "save_native", fail_midway)
  with pytest.raises(OSError, match="disk full"):
    convert.convert("hf", "native", str(sharded_hf), str(tmp_path / "out"))
  assert not (tmp_path / "out").exists()
  assert not os.path.exists((tmp_path / "marker").read_text())  # the temporary dir is gone


def test_existing_output_is_refused(sharded_hf, tmp_path):
  (tmp_path / "out").mkdir()
  (tmp_path / "out" / "keep.txt").write_text("precious")
  with pytest.raises(CheckpointError, match="not an empty directory"):
    convert.convert("hf", "native", str(sharded_hf), str(tmp_path / "out"))
  assert os.listdir(tmp_path / "out") == ["keep.txt"]


class _Payload:
  """Unpickling this would create a file: proof of arbitrary code execution."""

  def __init__(self, path):
    self.path = path

  def __reduce__(self):
    return (open, (self.path, "w"))


@pytest.fixture(scope="module")
def release(tmp_path_factory):
  root = tmp_path_factory.mktemp("release")
  base_dir, release_dir, _, _ = write_release(root)
  return base_dir, release_dir


def _release_copy(release, tmp_path):
  base_dir, release_dir = release
  return base_dir, _copy(release_dir, tmp_path)


def test_pickled_object_in_bin_is_refused(release, tmp_path):
  base_dir, release_dir = _release_copy(release, tmp_path)
  proof = tmp_path / "executed"
  state = torch.load(release_dir / "non_lora_trainables.bin", weights_only=True)
  state["base_model.model.model.evil"] = _Payload(str(proof))
  torch.save(state, release_dir / "non_lora_trainables.bin")
  message = _assert_fails_cleanly(tmp_path, "reference", release_dir, "refused",
                                  base=str(base_dir))
  assert "non_lora_trainables.bin" in message and "weights_only" in message
  assert not proof.exists()


def test_truncated_bin(release, tmp_path):
  base_dir, release_dir = _release_copy(release, tmp_path)
  path = release_dir / "landmark_feature_projector.bin"
  path.write_bytes(path.read_bytes()[:-64])
  message = _assert_fails_cleanly(tmp_path, "reference", release_dir, "truncated",
                                  base=str(base_dir))
  assert "landmark_feature_projector.bin" in message


def test_truncated_base_shard_names_its_keys(release, tmp_path):
  release_dir = release[1]
  base_dir = _copy(release[0], tmp_path / "b")
  shard = base_dir / "pytorch_model-00002-of-00002.bin"
  shard.write_bytes(shard.read_bytes()[:1000])
  index = json.loads((base_dir / "pytorch_model.bin.index.json").read_text())["weight_map"]
  first = next(k for k, v in index.items() if v == shard.name)
  message = _assert_fails_cleanly(tmp_path, "reference", release_dir, "truncated",
                                  base=str(base_dir))
  assert shard.name in message and first in message


def test_unknown_key_in_release(release, tmp_path):
  base_dir, release_dir = _release_copy(release, tmp_path)
  state = torch.load(release_dir / "non_lora_trainables.bin", weights_only=True)
  state["base_model.model.model.face_feature_projector.0.weight"] = torch.zeros(3, 3)
  torch.save(state, release_dir / "non_lora_trainables.bin")
  message = _assert_fails_cleanly(tmp_path, "reference", release_dir, "unexpected tensor",
                                  base=str(base_dir))
  assert "non_lora_trainables.bin" in message and "face_feature_projector" in message


def test_unknown_landmark_key(release, tmp_path):
  base_dir, release_dir = _release_copy(release, tmp_path)
  state = torch.load(release_dir / "landmark_feature_projector.bin", weights_only=True)
  state["4.weight"] = torch.zeros(3, 3)
  torch.save(state, release_dir / "landmark_feature_projector.bin")
  message = _assert_fails_cleanly(tmp_path, "reference", release_dir, "unexpected tensor",
                                  base=str(base_dir))
  assert "landmark_feature_projector.bin" in message and "4.weight" in message


@pytest.mark.parametrize("key,name", [
    ("0.weight", "prior_projector.linear_1.weight"),
    ("2.bias", "prior_projector.linear_2.bias"),
    ("model.landmark_feature_projector.0.bias", "prior_projector.linear_1.bias"),
    ("base_model.model.model.landmark_feature_projector.2.weight",
     "prior_projector.linear_2.weight"),
    ("linear_1.weight", "prior_projector.linear_1.weight"),
    ("1.weight", None), ("model.landmark_feature_projector.weight", None),
])
def test_landmark_key_variants(key, name):
  assert reference_release._landmark_name(key) == name  # pylint: disable=protected-access


def test_unmerged_lora_outside_the_decoder_needs_merge(release, tmp_path):
  base_dir, release_dir = _release_copy(release, tmp_path)
  state = load_file(str(release_dir / "adapter_model.safetensors"))
  state["base_model.model.lm_head.lora_A.weight"] = torch.zeros(8, 32)
  state["base_model.model.lm_head.lora_B.weight"] = torch.zeros(160, 8)
  save_file(state, str(release_dir / "adapter_model.safetensors"))
  message = _assert_fails_cleanly(tmp_path, "reference", release_dir, "--merge_lora",
                                  base=str(base_dir))
  assert "adapter_model.safetensors" in message and "lm_head" in message


def test_cli_reports_bad_input_and_usage(sharded_hf, tmp_path):
  path = _copy(sharded_hf, tmp_path)
  os.remove(path / "model-00001-of-00002.safetensors")
  cmd = [sys.executable, "-m", "emola_jax.cli.convert", "--from=hf", f"--input={path}",
         f"--output={tmp_path / 'out'}"]
  result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
  assert result.returncode != 0
  assert "emola-convert: bad input:" in result.stderr and "model-00001-of-00002" in result.stderr
  assert not (tmp_path / "out").exists()
  with pytest.raises(ValueError, match="nothing to convert"):
    convert.convert("native", "native", str(path), str(tmp_path / "out"))
  with pytest.raises(ValueError, match="--base"):
    convert.convert("reference", "native", str(path), str(tmp_path / "out"))
  with pytest.raises(ValueError, match="reference only"):
    convert.convert("hf", "native", str(path), str(tmp_path / "out"), merge_lora=True)
