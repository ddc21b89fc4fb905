"""The native checkpoint: save, restore, and restore into a changed config."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from emola_jax.conversion import native
from emola_jax.conversion.safetensors_io import CheckpointError
from emola_jax.model import presets
from emola_jax.model.emola import EmolaModel


def _flat(model):
  return {p: np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def test_round_trip_is_exact(tmp_path):
  model = EmolaModel(presets.get("tiny"), rngs=nnx.Rngs(3))
  native.save_native(model, str(tmp_path / "ckpt"))
  restored, config = native.load_native(str(tmp_path / "ckpt"))
  assert config == model.config
  a, b = _flat(model), _flat(restored)
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])


def test_restore_with_lora_keeps_base_and_adds_fresh_adapters(tmp_path):
  model = EmolaModel(presets.get("tiny"), rngs=nnx.Rngs(3))
  native.save_native(model, str(tmp_path / "ckpt"))
  restored, config = native.load_native(str(tmp_path / "ckpt"), **{"lora.rank": 4})
  assert config.lora.rank == 4
  a, b = _flat(model), _flat(restored)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])
  lora = [k for k in b if k not in a]
  assert lora and all("lora_" in k[-1] for k in lora)
  # B starts at zero, so the adapted model computes exactly what the base model does.
  ids = jnp.asarray([[1] * 3 + [config.image_token_index] * config.num_image_slots + [4, 5]])
  pixels = jnp.ones((1, 3, config.vision.image_size, config.vision.image_size))
  prior = jnp.ones((1, config.prior_dim))
  np.testing.assert_array_equal(model(ids, pixels, prior_features=prior),
                                restored(ids, pixels, prior_features=prior))


def test_dropping_a_saved_part_is_an_error(tmp_path):
  model = EmolaModel(presets.get("tiny"), rngs=nnx.Rngs(3))
  native.save_native(model, str(tmp_path / "ckpt"))
  with pytest.raises(CheckpointError, match="no place for saved parameter"):
    native.load_native(str(tmp_path / "ckpt"), prior_position="none")
  with pytest.raises(CheckpointError, match="not empty"):
    native.save_native(model, str(tmp_path / "ckpt"))


def test_presets_have_the_published_sizes():
  """EmoLA-7B: CLIP-L/14-336 (303M without the unused head) + LLaMA-2-7B (6.74B) + projectors."""
  config = presets.get("emola_7b")
  abstract = nnx.eval_shape(lambda: EmolaModel(config, rngs=nnx.Rngs(0)))
  sizes = {name: sum(int(np.prod(v.shape)) for _, v in nnx.to_flat_state(nnx.state(part)))
           for name, part in [("vision", abstract.vision_tower), ("text", abstract.language_model),
                              ("projector", abstract.projector),
                              ("prior", abstract.prior_projector)]}
  assert sizes["text"] == 6_738_415_616  # LLaMA-2-7B
  assert sizes["vision"] == 303_507_456  # CLIP ViT-L/14-336 vision model
  assert sizes["projector"] == 1024 * 4096 + 4096 + 4096 * 4096 + 4096  # ~21M
  assert sizes["prior"] == 212 * 4096 + 4096 + 4096 * 4096 + 4096  # ~17.7M
  assert config.num_image_slots == 577
