"""The LoRA matmul's hand-written backward against autodiff of the plain formula."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from emola_jax.model.layers import Linear, lora_matmul


def _plain(x, x_lora, kernel, a, b, scale):
  return x @ kernel + scale * ((x_lora @ a) @ b)


def _inputs(dtype, seed=0):
  rng = np.random.default_rng(seed)
  shapes = [(2, 5, 12), (2, 5, 12), (12, 7), (12, 3), (3, 7)]
  return [jnp.asarray(rng.normal(size=s), dtype) for s in shapes]


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 3e-2)])
def test_gradients_match_autodiff_of_the_plain_formula(dtype, tol):
  args = _inputs(dtype)
  weights = jnp.asarray(np.random.default_rng(1).normal(size=(2, 5, 7)), dtype)

  def loss(fn):
    return lambda *a: jnp.sum((fn(*a, 2.0) * weights).astype(jnp.float32))

  ours = jax.jit(jax.value_and_grad(loss(lora_matmul), argnums=(0, 1, 2, 3, 4)))(*args)
  want = jax.value_and_grad(loss(_plain), argnums=(0, 1, 2, 3, 4))(*args)
  np.testing.assert_allclose(float(ours[0]), float(want[0]), rtol=tol)
  for name, got, ref in zip(("x", "x_lora", "kernel", "a", "b"), ours[1], want[1]):
    assert got.shape == ref.shape and got.dtype == ref.dtype, name
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(ref, np.float32),
                               rtol=tol, atol=tol, err_msg=name)


def test_linear_with_dropout_matches_the_plain_formula_under_the_same_mask():
  layer = Linear(12, 7, ("embed", "mlp"), lora_rank=3, lora_alpha=6.0, lora_dropout=0.25,
                 rngs=nnx.Rngs(0))
  layer.lora_b[...] = jnp.asarray(np.random.default_rng(2).normal(size=(3, 7)), jnp.float32)
  x = _inputs(jnp.float32)[0]
  key = jax.random.key(3)
  keep = jax.random.bernoulli(key, 0.75, x.shape)

  def ours(x):
    return jnp.sum(jnp.sin(layer(x, key)))

  def plain(x):
    dropped = jnp.where(keep, x / 0.75, 0)
    y = _plain(x, dropped, layer.kernel[...], layer.lora_a[...], layer.lora_b[...], 2.0)
    return jnp.sum(jnp.sin(y + layer.bias[...]))

  np.testing.assert_allclose(float(ours(x)), float(plain(x)), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(jax.grad(ours)(x)), np.asarray(jax.grad(plain)(x)),
                             rtol=1e-5, atol=1e-6)
