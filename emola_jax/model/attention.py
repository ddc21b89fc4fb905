"""Multi-head attention core and rotary position embeddings.

One attention function serves CLIP (bidirectional, no mask) and LLaMA (causal, padding and KV
cache masks): it calls `jax.nn.dot_product_attention`, which handles grouped-query attention
natively and lets XLA pick a fused kernel (cuDNN flash attention on GPUs) where one exists.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None,
              impl: str = "xla") -> jax.Array:
  """q [B, T, N, H], k/v [B, S, K, H] with N % K == 0, mask bool [B, 1, T, S] -> [B, T, N, H]."""
  return jax.nn.dot_product_attention(
      q, k, v, mask=mask, implementation="cudnn" if impl == "cudnn" else None)


def causal_mask(query_slots: jax.Array, key_valid: jax.Array) -> jax.Array:
  """bool [B, 1, T, S]: key slot s is visible from query slot t if s <= t and s holds a token.

  Slots are positions in the (cache) sequence, not rotary positions, so left padding and a
  partially filled KV cache are handled by the same rule.
  """
  key_slots = jnp.arange(key_valid.shape[-1])
  visible = key_slots[None, None, :] <= query_slots[:, :, None]
  return (visible & key_valid[:, None, :].astype(bool))[:, None]


def rope_inverse_frequencies(head_dim: int, theta: float,
                             scaling: dict[str, Any] | None) -> jax.Array:
  """Per-pair rotation frequencies, with `transformers`' `default`, `linear` and `llama3` rules."""
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
  if rope_type == "default":
    return inv_freq
  if rope_type == "linear":
    return inv_freq / scaling["factor"]
  if rope_type == "llama3":
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * jnp.pi / inv_freq
    scaled = jnp.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return jnp.where(medium, smoothed, scaled)
  raise ValueError(f"rope_scaling type {rope_type!r} is not supported; "
                   "supported: default, linear, llama3")


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
  """Rotates x [B, T, N, H] by positions [B, T] in the half-split layout LLaMA checkpoints use."""
  freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, H/2]
  cos = jnp.cos(freqs)[:, :, None, :].astype(x.dtype)
  sin = jnp.sin(freqs)[:, :, None, :].astype(x.dtype)
  x1, x2 = jnp.split(x, 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
