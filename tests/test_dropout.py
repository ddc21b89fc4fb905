"""LoRA dropout masks: both generators keep elements at the asked rate, independently."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from emola_jax.model.layers import dropout, hash_keep_mask

SHAPE = (4, 64, 1024)  # 262,144 elements


@pytest.mark.parametrize("keep_prob", [0.95, 0.5, 0.1])
def test_hash_mask_rate_and_independence(keep_prob):
  masks = [np.asarray(hash_keep_mask(jax.random.key(seed), SHAPE, keep_prob))
           for seed in range(3)]
  n = masks[0].size
  sigma = np.sqrt(keep_prob * (1 - keep_prob) / n)
  for m in masks:
    assert abs(m.mean() - keep_prob) < 5 * sigma
    # Neighbours along every axis are uncorrelated (a counter hashed badly would show here).
    flat = m.astype(np.float64)
    for axis in range(3):
      a = np.moveaxis(flat, axis, -1)
      corr = np.corrcoef(a[..., 1:].ravel(), a[..., :-1].ravel())[0, 1]
      assert abs(corr) < 5 / np.sqrt(n), (axis, corr)
  # Masks from different keys agree as often as independent draws do: p^2 + (1 - p)^2.
  agree = keep_prob**2 + (1 - keep_prob) ** 2
  for i, j in [(0, 1), (0, 2), (1, 2)]:
    assert abs((masks[i] == masks[j]).mean() - agree) < 5 * np.sqrt(agree * (1 - agree) / n)
  # The same key gives the same mask; rows of one mask are not copies of each other.
  np.testing.assert_array_equal(np.asarray(hash_keep_mask(jax.random.key(0), SHAPE, keep_prob)),
                                masks[0])
  assert not np.array_equal(masks[0][0], masks[0][1])


def test_hash_mask_extremes_and_size_limit():
  assert np.asarray(hash_keep_mask(jax.random.key(0), (1000,), 1.0)).mean() > 0.999
  assert not np.asarray(hash_keep_mask(jax.random.key(0), (1000,), 0.0)).any()
  with pytest.raises(ValueError, match="dropout_masks=bernoulli"):
    hash_keep_mask(jax.random.key(0), (2**16, 2**16), 0.9)


@pytest.mark.parametrize("masks", ["bernoulli", "hash"])
def test_dropout_zeroes_and_rescales(masks):
  x = jnp.asarray(np.random.default_rng(0).normal(size=SHAPE), jnp.float32)
  y = np.asarray(dropout(x, jax.random.key(3), 0.25, masks))
  kept = y != 0
  assert abs(kept.mean() - 0.75) < 0.01
  np.testing.assert_allclose(y[kept], np.asarray(x)[kept] / 0.75, rtol=1e-6)
