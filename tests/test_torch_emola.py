"""EmolaForConditionalGeneration (PyTorch) on exported EmoLA checkpoints gives the JAX logits."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from emola_jax.conversion import hf_load, native, to_hf
from emola_jax.torch_emola import EmolaForConditionalGeneration
from tests import hf_tiny
from tests.test_convert_roundtrip import load_without_warnings

REL_TOL = 1e-4


def _with_prior_slot(ids, mask):
  """`hf_tiny.llava_inputs` rows with one more placeholder per image (the prior token's slot)."""
  rows = []
  for row, valid in zip(ids, mask):
    row = list(row[valid.astype(bool)])
    row.insert(row.index(hf_tiny.IMAGE_TOKEN), hf_tiny.IMAGE_TOKEN)
    rows.append(row)
  width = max(map(len, rows))
  out_ids = np.zeros((len(rows), width), np.int64)
  out_mask = np.zeros((len(rows), width), np.int64)
  for b, row in enumerate(rows):
    out_ids[b, :len(row)] = row
    out_mask[b, :len(row)] = 1
  return out_ids, out_mask


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  model = hf_tiny.llava(seed=21)
  path = tmp_path_factory.mktemp("hf")
  model.save_pretrained(path)
  return model, path


@pytest.fixture(scope="module", params=["after", "before"])
def exported(request, hf_dir, tmp_path_factory):
  """A JAX EmoLA model (prior projector freshly initialised) and its HF export."""
  original, path = hf_dir
  model, config = hf_load.load_pretrained(str(path), prior_position=request.param, seed=3)
  root = tmp_path_factory.mktemp(f"emola_{request.param}")
  with native.atomic_dir(str(root / "native")) as tmp:
    native.save_native(model, tmp)
  to_hf.native_to_hf(str(root / "native"), str(root / "hf"))
  ids, mask = _with_prior_slot(*hf_tiny.llava_inputs(original)[::2])
  pixels = hf_tiny.llava_inputs(original)[1]
  prior = np.random.default_rng(1).normal(size=(len(ids), config.prior_dim)).astype(np.float32)
  jax_logits = np.asarray(model(jnp.asarray(ids), jnp.asarray(pixels), jnp.asarray(mask),
                                prior_features=jnp.asarray(prior)))
  return root / "hf", (ids, pixels, mask, prior), jax_logits, config


def _logits(model, ids, pixels, mask, prior):
  with torch.no_grad():
    return model(input_ids=torch.from_numpy(ids), pixel_values=torch.from_numpy(pixels),
                 attention_mask=torch.from_numpy(mask),
                 prior_features=torch.from_numpy(prior)).logits.numpy()


def test_matches_jax_logits(exported):
  path, inputs, jax_logits, config = exported
  emola = json.loads((path / "config.json").read_text())["emola"]
  assert emola == {"prior_position": config.prior_position, "prior_dim": config.prior_dim}
  model = load_without_warnings(EmolaForConditionalGeneration, path)
  assert model.prior_position == config.prior_position
  ours = _logits(model, *inputs)
  real = inputs[2].astype(bool)
  assert hf_tiny.rel_err(jax_logits[real], ours[real]) <= REL_TOL
  # The prior token matters: zeroing it changes the logits.
  zero = _logits(model, *inputs[:3], np.zeros_like(inputs[3]))
  assert hf_tiny.rel_err(zero[real], ours[real]) > 100 * REL_TOL


def test_save_pretrained_round_trip(exported, tmp_path):
  path, inputs, _, _ = exported
  model = EmolaForConditionalGeneration.from_pretrained(path).eval()
  model.save_pretrained(tmp_path)
  assert (tmp_path / "prior_projector.safetensors").exists()
  again = load_without_warnings(EmolaForConditionalGeneration, tmp_path)
  np.testing.assert_array_equal(_logits(again, *inputs), _logits(model, *inputs))
  # And our own loader reads the directory the PyTorch class wrote.
  jax_model, config = hf_load.load_pretrained(str(tmp_path))
  assert config.prior_position == model.prior_position
  np.testing.assert_array_equal(np.asarray(jax_model.prior_projector.linear_2.bias[...]),
                                model.prior_projector.linear_2.bias.detach().numpy())


def test_plain_transformers_loads_the_llava_part(exported):
  path, _, _, _ = exported
  load_without_warnings(transformers.LlavaForConditionalGeneration, path)


def test_generate_with_prior(exported):
  path, (ids, pixels, mask, prior), _, _ = exported
  model = EmolaForConditionalGeneration.from_pretrained(path).eval()
  n = int(mask[0].sum())
  out = model.generate(input_ids=torch.from_numpy(ids[:1, :n]),
                       pixel_values=torch.from_numpy(pixels[:1]),
                       prior_features=torch.from_numpy(prior[:1]), max_new_tokens=3,
                       do_sample=False)
  # Greedy decoding continues with the argmax of the full forward's last position.
  first = _logits(model, ids[:1, :n], pixels[:1], mask[:1, :n], prior[:1])[0, -1].argmax()
  assert out.shape == (1, n + 3) and int(out[0, n]) == int(first)


def test_errors(exported, tmp_path):
  path, (ids, pixels, mask, prior), _, _ = exported
  model = EmolaForConditionalGeneration.from_pretrained(path).eval()
  with pytest.raises(ValueError, match="pass prior_features"):
    model(input_ids=torch.from_numpy(ids), pixel_values=torch.from_numpy(pixels))
  with pytest.raises(ValueError, match="image placeholders"):
    model(input_ids=torch.from_numpy(ids[:, 1:] * 0 + 5), pixel_values=torch.from_numpy(pixels),
          prior_features=torch.from_numpy(prior))
  for name in ("config.json", "model.safetensors"):
    (tmp_path / name).write_bytes((path / name).read_bytes())
  with pytest.raises(OSError, match="prior_projector.safetensors is missing"):
    EmolaForConditionalGeneration.from_pretrained(tmp_path)
