"""The "einsum" attention (heads-first, causal query blocks) against numpy and
jax.nn.dot_product_attention."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from emola_jax.model.attention import attention, causal_mask


def _inputs(batch=2, t=10, heads=4, kv_heads=2, dim=8, seed=0):
  rng = np.random.default_rng(seed)
  q = rng.normal(size=(batch, t, heads, dim)).astype(np.float32)
  k, v = (rng.normal(size=(batch, t, kv_heads, dim)).astype(np.float32) for _ in range(2))
  return jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)


def _reference(q, k, v, mask):
  """Plain numpy softmax attention, grouped-query heads repeated (float64)."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  group = q.shape[2] // k.shape[2]
  k, v = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)
  scores = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(q.shape[-1])
  if mask is not None:
    scores = np.where(np.asarray(mask), scores, -1e30)
  probs = np.exp(scores - scores.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  return np.einsum("bnts,bsnh->btnh", probs, v)


@pytest.mark.parametrize("query_block", [0, 3, 4, 10, 64])
def test_causal_blocks_match_reference_with_left_padding(query_block):
  q, k, v = _inputs()
  valid = np.ones((2, 10), bool)
  valid[1, :3] = False  # row 1 left-padded by 3: its first 3 queries see no key
  slots = jnp.broadcast_to(jnp.arange(10), (2, 10))
  mask = causal_mask(slots, jnp.asarray(valid))
  ref = _reference(q, k, v, mask)
  ours = np.asarray(attention(q, k, v, mask, "einsum", causal=True, query_block=query_block))
  xla = np.asarray(attention(q, k, v, mask, "xla"))
  real = valid[:, :, None, None].repeat(4, 2).repeat(8, 3)
  np.testing.assert_allclose(ours[real], ref[real], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(xla[real], ref[real], rtol=1e-5, atol=1e-5)


def test_bidirectional_without_mask():
  q, k, v = _inputs(kv_heads=4, seed=1)
  ours = attention(q, k, v, None, "einsum", query_block=4)  # not causal: no blocks
  np.testing.assert_allclose(np.asarray(ours), _reference(q, k, v, None), rtol=1e-5, atol=1e-5)


def test_blocked_gradients_equal_dot_product_attention():
  q, k, v = _inputs(seed=2)
  mask = causal_mask(jnp.broadcast_to(jnp.arange(10), (2, 10)), jnp.ones((2, 10), bool))
  cotangent = jnp.asarray(np.random.default_rng(3).normal(size=q.shape).astype(np.float32))

  def grads(impl):
    fn = lambda q, k, v: attention(q, k, v, mask, impl, causal=True, query_block=4)
    return jax.vjp(fn, q, k, v)[1](cotangent)

  for ours, ref in zip(grads("einsum"), grads("xla")):
    np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), rtol=1e-4, atol=1e-5)
