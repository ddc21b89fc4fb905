"""Multi-head attention core and rotary position embeddings.

One attention function serves CLIP (bidirectional, no mask) and LLaMA (causal, padding and KV
cache masks), with two implementations:

* "xla" / "cudnn": `jax.nn.dot_product_attention`, which handles grouped-query attention natively
  and lets XLA pick a fused kernel (cuDNN flash attention on GPUs, forced by "cudnn").
* "einsum": the same function written as heads-first einsums, with causal self-attention split
  into query blocks that skip the keys above the diagonal. On XLA:CPU the [B, T, N, H] order
  of `dot_product_attention` made its score dots run at ~30 GFLOP/s; heads-first dots and the
  skipped upper triangle halve the attention's share of a train step (BENCHMARKS.md).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None,
              impl: str = "xla", *, causal: bool = False, query_block: int = 0) -> jax.Array:
  """q [B, T, N, H], k/v [B, S, K, H] with N % K == 0, mask bool [B, 1, T, S] -> [B, T, N, H].

  `causal`: the caller promises self-attention over the same slots (S == T, no cache) under a
  mask that hides key s from query t whenever s > t. With impl "einsum" and `query_block` > 0
  the queries then run in blocks of `query_block`, each against the keys up to its last slot
  only. The result is the same except at queries that see no key at all (padding slots, whose
  output nothing reads): those average fewer values.
  """
  if impl != "einsum":
    return jax.nn.dot_product_attention(
        q, k, v, mask=mask, implementation="cudnn" if impl == "cudnn" else None)
  b, t, n, h = q.shape
  kv_heads = k.shape[2]
  # [B, K, G, T, H] queries (grouped per KV head), [B, K, S, H] keys and values.
  q = (q * (1.0 / math.sqrt(h))).reshape(b, t, kv_heads, n // kv_heads, h).transpose(0, 2, 3, 1, 4)
  k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
  mask = None if mask is None else mask[:, :, None]  # [B, 1, 1, T, S]
  block = query_block if causal and 0 < query_block < t else t
  outs = []
  for start in range(0, t, block):
    stop = min(start + block, t)
    keys = stop if causal else k.shape[2]  # causal: later keys are masked for these queries
    outs.append(_attend(q[:, :, :, start:stop], k[:, :, :keys], v[:, :, :keys],
                        None if mask is None else mask[..., start:stop, :keys]))
  o = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=3)
  return o.transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)


def _attend(q, k, v, mask):
  """Softmax attention of q [B, K, G, T, H] (already scaled) over k/v [B, K, S, H]."""
  scores = jnp.einsum("bkgth,bksh->bkgts", q, k).astype(jnp.float32)
  if mask is not None:  # the same large finite negative as dot_product_attention
    scores = jnp.where(mask, scores, -0.7 * jnp.finfo(jnp.float32).max)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  return jnp.einsum("bkgts,bksh->bkgth", probs, v)


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
