"""Where the landmark prior token lands, and that `prior_position` is the only difference."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from emola_jax.model.config import EmolaConfig, TextConfig, VisionConfig
from emola_jax.model.emola import EmolaModel

# The real geometry (336 px, patch 14 -> 576 visual tokens) on a very narrow model.
VISION = VisionConfig(hidden_size=8, intermediate_size=16, num_layers=2, num_heads=2,
                      image_size=336, patch_size=14)
TEXT = TextConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_layers=2, num_heads=4,
                  num_kv_heads=2)
IMG = 63
PRE, POST = [1, 5, 6], [7, 8, 9]


def _config(position: str) -> EmolaConfig:
  return EmolaConfig(vision=VISION, text=TEXT, prior_position=position, prior_dim=12,
                     image_token_index=IMG)


def _ids(slots: int) -> jnp.ndarray:
  return jnp.asarray([PRE + [IMG] * slots + POST])


@pytest.fixture(scope="module")
def models():
  """Three models sharing every parameter; only the prior projector differs in existence."""
  after = EmolaModel(_config("after"), rngs=nnx.Rngs(0))
  shared = nnx.from_flat_state([(p, v) for p, v in nnx.to_flat_state(nnx.state(after))
                                if p[0] != "prior_projector"])
  out = {"after": after}
  for position in ("before", "none"):
    model = EmolaModel(_config(position), rngs=nnx.Rngs(1))
    nnx.update(model, shared)
    if position == "before":
      nnx.update(model.prior_projector, nnx.state(after.prior_projector))
    out[position] = model
  rng = np.random.default_rng(0)
  pixels = jnp.asarray(rng.normal(size=(1, 3, 336, 336)), jnp.float32)
  prior = jnp.asarray(rng.normal(size=(1, 12)), jnp.float32)
  return out, pixels, prior


def test_slot_counts():
  assert _config("after").num_image_slots == 577
  assert _config("before").num_image_slots == 577
  assert _config("none").num_image_slots == 576


@pytest.mark.parametrize("position,prior_index,visual_start", [("after", 576, 0),
                                                                ("before", 0, 1)])
def test_prior_token_lands_next_to_the_visual_block(models, position, prior_index, visual_start):
  m, pixels, prior = models
  model = m[position]
  embeds = np.asarray(model.embed_inputs(_ids(577), pixels, prior))
  visual = np.asarray(model.projector(model.vision_tower(pixels)))
  prior_token = np.asarray(model.prior_projector(prior))
  start = len(PRE)
  np.testing.assert_array_equal(embeds[0, start + prior_index], prior_token[0])
  np.testing.assert_array_equal(embeds[0, start + visual_start:start + visual_start + 576],
                                visual[0])
  text = np.asarray(model.language_model.embed(jnp.asarray([PRE + POST])))
  np.testing.assert_array_equal(embeds[0, :start], text[0, :start])
  np.testing.assert_array_equal(embeds[0, start + 577:], text[0, start:])


def test_zeroed_prior_after_differs_from_none_only_by_the_extra_position(models):
  m, pixels, prior = models
  after, none = m["after"], m["none"]
  proj = after.prior_projector.linear_2
  saved = (proj.kernel[...], proj.bias[...])
  proj.kernel[...] = jnp.zeros_like(saved[0])
  proj.bias[...] = jnp.zeros_like(saved[1])
  try:
    emb_after = np.asarray(after.embed_inputs(_ids(577), pixels, prior))
    emb_none = np.asarray(none.embed_inputs(_ids(576), pixels))
    slot = len(PRE) + 576
    assert not emb_after[0, slot].any()
    np.testing.assert_array_equal(np.delete(emb_after, slot, axis=1), emb_none)
    # Causal attention: every position before the extra one sees the same inputs (the sequence
    # lengths differ, so XLA may sum in another order: equal up to fp32 rounding).
    logits_after = np.asarray(after(_ids(577), pixels, prior_features=prior))
    logits_none = np.asarray(none(_ids(576), pixels))
    np.testing.assert_allclose(logits_after[0, :slot], logits_none[0, :slot], rtol=0, atol=1e-6)
    assert np.abs(logits_after[0, slot:] - logits_none[0, slot - 1:]).max() > 1e-3
    assert logits_after.shape[1] == logits_none.shape[1] + 1
  finally:
    proj.kernel[...], proj.bias[...] = saved


def test_wrong_number_of_placeholders_is_a_clear_error(models):
  m, pixels, prior = models
  with pytest.raises(ValueError, match="needs exactly 577"):
    m["after"](_ids(576), pixels, prior_features=prior)
  with pytest.raises(ValueError, match="pass prior_features"):
    m["after"](_ids(577), pixels)
