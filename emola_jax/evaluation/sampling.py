"""Next-token selection for generation: greedy argmax, or temperature + nucleus (top-p) sampling.

Sampling follows the usual warper order (temperature first, then top-p), and every row draws from
its own PRNG key, so a row's sample does not depend on which other rows share its batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def nucleus_mask(logits: jax.Array, top_p: jax.Array | float) -> jax.Array:
  """bool [..., V]: the smallest set of most probable tokens whose total probability >= top_p.

  A token is kept when the probability of the tokens ranked above it is still below `top_p`, so
  the most probable token is always kept. `top_p >= 1` keeps every token (no rounding losses in
  the tail of the cumulative sum).
  """
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  order = jnp.argsort(-probs, axis=-1)  # stable: equal probabilities keep vocabulary order
  sorted_probs = jnp.take_along_axis(probs, order, axis=-1)
  mass_above = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs
  keep_sorted = (mass_above < top_p) | (top_p >= 1.0)
  # Scatter the decision back from rank order to vocabulary order.
  keep = jnp.zeros_like(keep_sorted)
  batch_index = jnp.indices(order.shape)[:-1]
  return keep.at[(*batch_index, order)].set(keep_sorted)


def sample_logits(logits: jax.Array, temperature: jax.Array | float,
                  top_p: jax.Array | float) -> jax.Array:
  """The logits to draw from: scaled by 1/temperature, -inf outside the top-p nucleus."""
  scaled = logits.astype(jnp.float32) / temperature
  return jnp.where(nucleus_mask(scaled, top_p), scaled, -jnp.inf)


def select_tokens(logits: jax.Array, keys: jax.Array, temperature: jax.Array | float,
                  top_p: jax.Array | float, do_sample: bool) -> jax.Array:
  """Chooses one token per row of logits [B, V]; `keys` [B] are per-row PRNG keys.

  `do_sample=False` is greedy (the first maximal logit, as `torch.argmax`); keys, temperature and
  top_p are then unused. `do_sample` is a Python bool, so the sort over the vocabulary that
  sampling needs is not compiled into greedy decoding.
  """
  if not do_sample:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  filtered = sample_logits(logits, temperature, top_p)
  return jax.vmap(jax.random.categorical)(keys, filtered).astype(jnp.int32)
