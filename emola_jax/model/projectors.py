"""Projectors into the language model's embedding space: visual features and the landmark prior.

`mlp2x_gelu` is Linear -> GELU (exact erf form) -> Linear, LLaVA-1.5's projector and EmoLA's prior
projector; `linear` is LLaVA-1's single Linear.
"""

from __future__ import annotations

import jax
from flax import nnx

from emola_jax.model.layers import Linear, activation


class Projector(nnx.Module):
  """[..., in_dim] -> [..., out_dim]."""

  def __init__(self, kind: str, in_dim: int, out_dim: int, *, in_axis: str, dtype, param_dtype,
               rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    if kind == "linear":
      self.linear_1 = Linear(in_dim, out_dim, (in_axis, "embed"), **kw)
      self.linear_2 = None
    elif kind == "mlp2x_gelu":
      self.linear_1 = Linear(in_dim, out_dim, (in_axis, "mlp"), **kw)
      self.linear_2 = Linear(out_dim, out_dim, ("mlp", "embed"), **kw)
    else:
      raise ValueError(f"unknown projector type {kind!r}; use 'linear' or 'mlp2x_gelu'")

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.linear_1(x)
    if self.linear_2 is not None:
      x = self.linear_2(activation("gelu")(x))
    return x
