"""EmoLA: CLIP patch features and one landmark-prior token fill the image slots of a LLaMA prompt.

The prompt holds `num_image_slots` copies of `image_token_index` per image. The slots are filled in
order by [visual tokens, prior token] (`prior_position="after"`, the paper's model), by
[prior token, visual tokens] (`"before"`, supplementary Tab. 5) or by the visual tokens alone
(`"none"`, plain LLaVA-1.5). The fill is a gather with static shapes, so it runs under `jit`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from emola_jax.model.clip import ClipVisionTower
from emola_jax.model.config import EmolaConfig
from emola_jax.model.llama import KVCache, LlamaForCausalLM
from emola_jax.model.projectors import Projector


def check_image_slots(input_ids, config: EmolaConfig) -> None:
  """Raises if a concrete `input_ids` row does not hold exactly one image's worth of slots."""
  ids = np.asarray(input_ids)
  counts = (ids == config.image_token_index).sum(axis=-1)
  bad = np.flatnonzero(counts != config.num_image_slots)
  if bad.size:
    raise ValueError(
        f"input_ids row {int(bad[0])} holds {int(counts[bad[0]])} image placeholders "
        f"(id {config.image_token_index}); this model needs exactly {config.num_image_slots} "
        f"per image ({config.vision.num_patches} visual + {int(config.has_prior)} prior). "
        "Expand '<image>' with emola_jax.data.tokenize for this model config.")


def fill_image_slots(token_embeds: jax.Array, is_slot: jax.Array,
                     image_embeds: jax.Array) -> jax.Array:
  """Replaces the k-th slot position of each row with image_embeds[row, k]."""
  index = jnp.clip(jnp.cumsum(is_slot, axis=1) - 1, 0, image_embeds.shape[1] - 1)
  gathered = jnp.take_along_axis(image_embeds, index[..., None], axis=1)
  return jnp.where(is_slot[..., None], gathered.astype(token_embeds.dtype), token_embeds)


class EmolaModel(nnx.Module):
  """`model(input_ids, pixel_values, attention_mask=None, prior_features=None) -> logits`."""

  def __init__(self, config: EmolaConfig, *, rngs: nnx.Rngs):
    dtype, param_dtype = jnp.dtype(config.dtype), jnp.dtype(config.param_dtype)
    common = dict(dtype=dtype, param_dtype=param_dtype, scan_layers=config.scan_layers,
                  remat_policy=config.remat_policy, attention_impl=config.attention_impl)
    text_dim = config.text.hidden_size
    self.vision_tower = ClipVisionTower(config.vision, rngs=rngs, **common)
    self.projector = Projector(config.projector_type, config.vision.hidden_size, text_dim,
                               in_axis="embed", dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.prior_projector = (
        Projector("mlp2x_gelu", config.prior_dim, text_dim, in_axis="prior", dtype=dtype,
                  param_dtype=param_dtype, rngs=rngs) if config.has_prior else None)
    self.language_model = LlamaForCausalLM(config.text, config.lora, rngs=rngs,
                                           attention_query_block=config.attention_query_block,
                                           **common)
    self.config = config

  def encode_image(self, pixel_values: jax.Array,
                   prior_features: jax.Array | None = None) -> jax.Array:
    """[B, C, H, W] (+ prior [B, prior_dim]) -> the embeddings of the image slots [B, S, D]."""
    visual = self.projector(self.vision_tower(pixel_values))
    if self.prior_projector is None:
      return visual
    if prior_features is None:
      raise ValueError(f"this model has a prior token (prior_position="
                       f"{self.config.prior_position!r}): pass prior_features "
                       f"[batch, {self.config.prior_dim}]")
    prior = self.prior_projector(prior_features)[:, None, :]
    parts = [visual, prior] if self.config.prior_position == "after" else [prior, visual]
    return jnp.concatenate(parts, axis=1)

  def embed_inputs(self, input_ids: jax.Array, pixel_values: jax.Array | None,
                   prior_features: jax.Array | None = None) -> jax.Array:
    """Token embeddings with the image slots filled: [B, T, D]."""
    is_slot = input_ids == self.config.image_token_index
    # The placeholder id may lie outside the vocabulary (LLaVA uses -200); look up id 0 instead.
    embeds = self.language_model.embed(jnp.where(is_slot, 0, input_ids))
    if pixel_values is None:
      return embeds
    if not isinstance(input_ids, jax.core.Tracer):
      check_image_slots(input_ids, self.config)
    return fill_image_slots(embeds, is_slot, self.encode_image(pixel_values, prior_features))

  def __call__(self, input_ids: jax.Array, pixel_values: jax.Array | None,
               attention_mask: jax.Array | None = None,
               prior_features: jax.Array | None = None, *, positions: jax.Array | None = None,
               dropout_rng: jax.Array | None = None,
               logits_at: jax.Array | None = None) -> jax.Array:
    embeds = self.embed_inputs(input_ids, pixel_values, prior_features)
    logits, _ = self.language_model(embeds, attention_mask=attention_mask, positions=positions,
                                    dropout_rng=dropout_rng, logits_at=logits_at)
    return logits

  def init_cache(self, batch: int, max_len: int, *, per_layer: bool = False) -> KVCache:
    return KVCache.empty(self.config.text, batch, max_len, jnp.dtype(self.config.dtype),
                         per_layer=per_layer)
