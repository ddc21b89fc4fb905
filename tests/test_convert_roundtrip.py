"""HF -> emola-jax -> HF on tiny random models: transformers reloads the export cleanly, same
logits."""

from __future__ import annotations

import json
import logging

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from emola_jax.cli import convert
from emola_jax.conversion import hf_load, native, to_hf
from emola_jax.conversion.safetensors_io import SafetensorsCheckpoint
from tests import hf_tiny

ABS_TOL, REL_TOL = 1e-5, 1e-4
TOKENIZER_FILES = {"tokenizer_config.json": '{"model_max_length": 256}',
                   "special_tokens_map.json": '{"bos_token": "<s>"}'}


class _Records(logging.Handler):
  def __init__(self):
    super().__init__(logging.DEBUG)
    self.messages: list[str] = []

  def emit(self, record):
    self.messages.append(record.getMessage())


def load_without_warnings(cls, path):
  """`cls.from_pretrained(path)`, asserting transformers reports no missing/unexpected keys."""
  handler = _Records()
  logger = logging.getLogger("transformers")
  logger.addHandler(handler)
  level = transformers.logging.get_verbosity()
  transformers.logging.set_verbosity_info()
  try:
    model, info = cls.from_pretrained(path, output_loading_info=True)
  finally:
    transformers.logging.set_verbosity(level)
    logger.removeHandler(handler)
  assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys",
                                   "error_msgs")), info
  bad = [m for m in handler.messages if any(w in m.lower() for w in (
      "missing", "unexpected", "newly initialized", "not used", "mismatch"))]
  assert not bad, bad
  return model.eval()


def torch_logits(model, ids, pixels, mask, **extra):
  with torch.no_grad():
    return model(input_ids=torch.from_numpy(ids), pixel_values=torch.from_numpy(pixels),
                 attention_mask=torch.from_numpy(mask), **extra).logits.numpy()


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  model = hf_tiny.llava(seed=11)
  path = tmp_path_factory.mktemp("hf")
  model.save_pretrained(path)
  for name, text in TOKENIZER_FILES.items():
    (path / name).write_text(text)
  return model, path


def test_hf_native_hf_round_trip(hf_dir, tmp_path):
  original, path = hf_dir
  convert.convert("hf", "native", str(path), str(tmp_path / "native"))
  convert.convert("native", "hf", str(tmp_path / "native"), str(tmp_path / "hf"),
                  max_shard_size="40KB")
  out = tmp_path / "hf"
  index = json.loads((out / "model.safetensors.index.json").read_text())
  shards = sorted(set(index["weight_map"].values()))
  assert len(shards) > 1 and all((out / s).exists() for s in shards)
  assert not (out / "prior_projector.safetensors").exists()  # plain LLaVA: no prior token
  for name, text in TOKENIZER_FILES.items():
    assert (tmp_path / "native" / "tokenizer" / name).read_text() == text
    assert (out / name).read_text() == text
  reloaded = load_without_warnings(transformers.LlavaForConditionalGeneration, out)
  want = original.state_dict()
  got = reloaded.state_dict()
  assert want.keys() == got.keys()
  for key in want:
    torch.testing.assert_close(got[key], want[key], rtol=0, atol=0)
  ids, pixels, mask = hf_tiny.llava_inputs(original)
  ref = torch_logits(original, ids, pixels, mask)
  assert np.abs(torch_logits(reloaded, ids, pixels, mask) - ref).max() <= ABS_TOL
  model, config = native.load_native(str(tmp_path / "native"))
  assert config.prior_position == "none"
  ours = np.asarray(model(jnp.asarray(ids), jnp.asarray(pixels), jnp.asarray(mask)))
  real = mask.astype(bool)
  assert hf_tiny.rel_err(ours[real], ref[real]) <= REL_TOL


def test_export_dtype_and_single_file(hf_dir, tmp_path):
  original, path = hf_dir
  convert.convert("hf", "native", str(path), str(tmp_path / "native"))
  convert.convert("native", "hf", str(tmp_path / "native"), str(tmp_path / "hf"),
                  dtype="bfloat16")
  out = tmp_path / "hf"
  assert (out / "model.safetensors").exists()
  assert not (out / "model.safetensors.index.json").exists()
  assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
  checkpoint = SafetensorsCheckpoint(str(out))
  key = "language_model.model.layers.1.mlp.down_proj.weight"
  want = original.state_dict()["model.language_model.layers.1.mlp.down_proj.weight"].numpy()
  np.testing.assert_array_equal(checkpoint.get(key), want.astype(ml_dtypes.bfloat16))
  # Our loader reads bf16 files too (here into bf16 parameters: the values are exact).
  model, _ = hf_load.load_pretrained(str(out), param_dtype="bfloat16")
  np.testing.assert_array_equal(np.asarray(model.language_model.blocks.down_proj.kernel[1]),
                                want.T.astype(ml_dtypes.bfloat16))


def test_lora_is_merged_on_export(hf_dir, tmp_path):
  """A native checkpoint with LoRA exports W + (alpha/r) A B: transformers gives the JAX logits."""
  original, path = hf_dir
  model, config = hf_load.load_pretrained(str(path), lora={"rank": 4, "alpha": 8.0})
  rng = np.random.default_rng(0)
  for _, var in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam)):
    var[...] = jnp.asarray(rng.normal(size=var.shape) * 0.2, jnp.float32)
  with native.atomic_dir(str(tmp_path / "native")) as tmp:
    native.save_native(model, tmp)
  to_hf.native_to_hf(str(tmp_path / "native"), str(tmp_path / "hf"))
  reloaded = load_without_warnings(transformers.LlavaForConditionalGeneration, tmp_path / "hf")
  ids, pixels, mask = hf_tiny.llava_inputs(original, seed=1)
  ours = np.asarray(model(jnp.asarray(ids), jnp.asarray(pixels), jnp.asarray(mask)))
  ref = torch_logits(reloaded, ids, pixels, mask)
  real = mask.astype(bool)
  assert hf_tiny.rel_err(ours[real], ref[real]) <= REL_TOL
  # The adapter is not a no-op: the base model's logits are far away.
  base = torch_logits(original, ids, pixels, mask)
  assert hf_tiny.rel_err(base[real], ref[real]) > 100 * REL_TOL


@pytest.mark.parametrize("text,size", [("5GB", 5 * 10**9), ("500MB", 5 * 10**8),
                                       ("2GiB", 2 * 2**30), ("1024", 1024), ("1.5kb", 1500)])
def test_parse_size(text, size):
  assert to_hf.parse_size(text) == size


def test_parse_size_rejects_nonsense():
  with pytest.raises(ValueError, match="5GB"):
    to_hf.parse_size("five gigabytes")
