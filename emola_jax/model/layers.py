"""Small building blocks shared by the vision tower, the projectors and the decoder.

Every parameter is created with its logical axis names in the `out_sharding` metadata (read by
`emola_jax.model.sharding`); parameters are stored in `param_dtype` and cast to the compute
`dtype` where they are used, so bf16 compute keeps fp32 master weights.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

Axes = tuple[str | None, ...]


def make_param(rngs: nnx.Rngs | None, init: Callable, shape: Sequence[int], axes: Axes,
               dtype, kind: type[nnx.Param] = nnx.Param) -> nnx.Param:
  """A parameter initialised with `init(key, shape, dtype)` and tagged with logical axes."""
  if len(axes) != len(shape):
    raise ValueError(f"axes {axes} do not match shape {tuple(shape)}")
  key = rngs.params() if rngs is not None else jax.random.key(0)
  return kind(init(key, tuple(shape), dtype), out_sharding=tuple(axes), eager_sharding=False)


def torch_linear_init(fan_in: int) -> Callable:
  """PyTorch's nn.Linear default (kaiming-uniform with a=sqrt(5)): U(-1/sqrt(fan_in), +)."""
  bound = 1.0 / math.sqrt(fan_in)
  return lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -bound, bound)


# Up to this many rows (tokens), `dense` with a kernel stored [out, in] multiplies weights-first.
SKINNY_ROWS = 64


def dense(x: jax.Array, kernel: jax.Array, *, transposed: bool = False) -> jax.Array:
  """x @ W over the last axis of x; `kernel` is W [in, out], or W transposed [out, in].

  With the kernel stored [out, in], few rows (a decoding step) are multiplied weights-first,
  kernel [out, in] @ x^T [in, rows], and the small [out, rows] result is transposed back: on
  XLA:CPU that streams the weights once at close to memory bandwidth, 2-3x faster than
  x @ W for 8 rows (BENCHMARKS.md). The barrier keeps XLA from folding the transpose back into
  the dot, which would turn it into the slow form again.
  """
  if not transposed:
    return x @ kernel
  rows = math.prod(x.shape[:-1])
  if rows > SKINNY_ROWS:
    return x @ kernel.T
  y = jax.lax.optimization_barrier(kernel @ x.reshape(rows, x.shape[-1]).T)
  return y.T.reshape(*x.shape[:-1], kernel.shape[0])


class Linear(nnx.Module):
  """y = x @ kernel (+ bias), with an optional LoRA branch scale * dropout(x) @ A @ B.

  The kernel is stored [in, out]; `transpose_kernel()` re-stores it [out, in] for decoding loops
  (see `dense`), and `merge_lora()` folds the adapter into it.
  """

  def __init__(self, in_features: int, out_features: int, axes: tuple[str | None, str | None], *,
               use_bias: bool = True, lora_rank: int = 0, lora_alpha: float = 0.0,
               lora_dropout: float = 0.0, lora_dropout_masks: str = "bernoulli",
               dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
    init = torch_linear_init(in_features)
    self.kernel = make_param(rngs, init, (in_features, out_features), axes, param_dtype)
    self.bias = (make_param(rngs, init, (out_features,), (axes[1],), param_dtype)
                 if use_bias else None)
    self.lora_rank = lora_rank
    self.lora_scale = lora_alpha / lora_rank if lora_rank else 0.0
    self.lora_dropout = lora_dropout
    self.lora_dropout_masks = lora_dropout_masks
    if lora_rank:
      # PEFT's initialisation: A like nn.Linear, B zero, so a new adapter starts as a no-op.
      self.lora_a = make_param(rngs, init, (in_features, lora_rank), (axes[0], None), param_dtype,
                               nnx.LoRAParam)
      self.lora_b = make_param(rngs, nnx.initializers.zeros, (lora_rank, out_features),
                               (None, axes[1]), param_dtype, nnx.LoRAParam)
    else:
      self.lora_a = self.lora_b = None
    self.dtype = dtype
    self.transposed = False

  def transpose_kernel(self) -> None:
    """Stores the kernel [out, in] from now on (a copy of the weights; for inference)."""
    if not self.transposed:
      axes = self.kernel.get_metadata().get("out_sharding")
      self.kernel = self.kernel.replace(
          self.kernel[...].T, out_sharding=None if axes is None else tuple(reversed(axes)))
      self.transposed = True

  @property
  def merge_keeps_precision(self) -> bool:
    """Whether `merge_lora` rounds no more than the separate branch: the kernel is stored and
    computed at least as wide as the adapter. A bf16 kernel (EmoLA's frozen base weights)
    would round every update below half a bf16 step of its weight away."""
    if self.lora_a is None:
      return True
    bits = lambda dtype: jnp.finfo(dtype).bits
    return min(bits(self.kernel.dtype), bits(self.dtype)) >= bits(self.lora_a.dtype)

  def merge_lora(self) -> None:
    """Folds the LoRA branch into the kernel, W + scale * A @ B (computed in fp32, stored in the
    kernel's dtype), and drops A and B: one matmul per call instead of three (inference; see
    `merge_keeps_precision`)."""
    if self.lora_a is None:
      return
    a, b = (p[...].astype(jnp.float32) for p in (self.lora_a, self.lora_b))
    delta = self.lora_scale * jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST)
    kernel = self.kernel[...]
    merged = kernel.astype(jnp.float32) + (delta.T if self.transposed else delta)
    self.kernel = self.kernel.replace(merged.astype(kernel.dtype))
    self.lora_a = self.lora_b = None
    self.lora_rank, self.lora_scale = 0, 0.0

  def __call__(self, x: jax.Array, dropout_rng: jax.Array | None = None) -> jax.Array:
    x = x.astype(self.dtype)
    kernel = self.kernel[...].astype(self.dtype)
    if self.lora_a is None:
      y = dense(x, kernel, transposed=self.transposed)
    else:
      h = x
      if dropout_rng is not None and self.lora_dropout > 0:
        h = dropout(x, dropout_rng, self.lora_dropout, self.lora_dropout_masks)
      a, b = self.lora_a[...].astype(self.dtype), self.lora_b[...].astype(self.dtype)
      if self.transposed:  # inference: autodiff suffices
        y = dense(x, kernel, transposed=True) + self.lora_scale * ((h @ a) @ b)
      else:
        y = lora_matmul(x, h, kernel, a, b, self.lora_scale)
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    return y


def dropout(x: jax.Array, key: jax.Array, rate: float, masks: str = "bernoulli") -> jax.Array:
  """Inverted dropout: each element zeroed with probability `rate`, the rest scaled by
  1 / (1 - rate). `masks`: "bernoulli" (jax.random) or "hash" (`hash_keep_mask`)."""
  keep_prob = 1.0 - rate
  if masks == "hash":
    keep = hash_keep_mask(key, x.shape, keep_prob)
  else:
    keep = jax.random.bernoulli(key, keep_prob, x.shape)
  return jnp.where(keep, x / keep_prob, 0).astype(x.dtype)


def hash_keep_mask(key: jax.Array, shape: Sequence[int], keep_prob: float) -> jax.Array:
  """bool mask, True with probability `keep_prob`, from a counter-based hash.

  Each element's flat index is hashed twice with Wellons' "lowbias32" integer hash, mixed with
  two 32-bit seeds drawn from `key`, and compared with keep_prob * 2^32. One fused elementwise
  pass: on XLA:CPU ~40x cheaper than `jax.random.bernoulli`'s threefry bits, which took ~12%
  of a LoRA train step at the bench config (BENCHMARKS.md). The index, not the device, decides
  each bit, so masks do not depend on the sharding.
  """
  size = math.prod(shape)
  if size >= 2**32:
    raise ValueError(f"hash_keep_mask: {size} elements do not fit 32-bit indices; use "
                     "lora.dropout_masks=bernoulli")
  seeds = jax.random.bits(key, (2,), jnp.uint32)
  index = jax.lax.iota(jnp.uint32, size).reshape(shape)
  bits = _lowbias32(_lowbias32(index ^ seeds[0]) ^ seeds[1])
  return bits < jnp.uint32(min(round(keep_prob * 2**32), 2**32 - 1))


def _lowbias32(x: jax.Array) -> jax.Array:
  x = x ^ (x >> 16)
  x = x * jnp.uint32(0x7FEB352D)
  x = x ^ (x >> 15)
  x = x * jnp.uint32(0x846CA68B)
  return x ^ (x >> 16)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def lora_matmul(x: jax.Array, x_lora: jax.Array, kernel: jax.Array, a: jax.Array, b: jax.Array,
                scale: float) -> jax.Array:
  """x @ kernel + scale * (x_lora @ a) @ b over the last axis (x_lora: x after LoRA dropout).

  The backward is written out so that every weight-gradient matmul contracts the token axis
  with the small rank-r operand transposed: left to autodiff, XLA:CPU transposed the large
  [tokens, out] output gradient instead, through slow strided copies (~13% of a LoRA step at the
  bench config; BENCHMARKS.md).
  """
  return _lora_forward(x, x_lora, kernel, a, b, scale)[0]


def _lora_forward(x, x_lora, kernel, a, b, scale):
  h = x_lora @ a
  return x @ kernel + scale * (h @ b), h


def _lora_fwd(x, x_lora, kernel, a, b, scale):
  y, h = _lora_forward(x, x_lora, kernel, a, b, scale)
  return y, (x, x_lora, kernel, a, b, h)


def _lora_bwd(scale, residuals, g):
  x, x_lora, kernel, a, b, h = residuals
  tokens = math.prod(g.shape[:-1])
  g2, x2, xl2, h2 = (t.reshape(tokens, t.shape[-1]) for t in (g, x, x_lora, h))
  g_h = scale * (g2 @ b.T)  # [N, r]
  # [r, N] operands, materialised (the barrier keeps XLA from folding the transposes back into
  # the dots as a transposed large operand).
  h_t, g_h_t = jax.lax.optimization_barrier((h2.T, g_h.T))
  grad_b = scale * (h_t @ g2)  # [r, out]
  grad_a = (g_h_t @ xl2).T  # [in, r]
  grad_x = (g2 @ kernel.T).reshape(x.shape)
  grad_x_lora = (g_h @ a.T).reshape(x_lora.shape)
  grad_kernel = x2.T @ g2  # only computed when the base weight trains (else XLA drops it)
  return grad_x, grad_x_lora, grad_kernel, grad_a, grad_b


lora_matmul.defvjp(_lora_fwd, _lora_bwd)


class LayerNorm(nnx.Module):
  """LayerNorm with scale and bias, computed in fp32."""

  def __init__(self, dim: int, eps: float, *, dtype=jnp.float32, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    self.scale = make_param(rngs, nnx.initializers.ones, (dim,), ("norm",), param_dtype)
    self.bias = make_param(rngs, nnx.initializers.zeros, (dim,), ("norm",), param_dtype)
    self.eps = eps
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    var = jnp.square(x32 - mean).mean(-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
    y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
    return y.astype(self.dtype)


class RMSNorm(nnx.Module):
  """LLaMA's RMSNorm: normalised in fp32, cast back, then scaled (as `transformers` does)."""

  def __init__(self, dim: int, eps: float, *, dtype=jnp.float32, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    self.scale = make_param(rngs, nnx.initializers.ones, (dim,), ("norm",), param_dtype)
    self.eps = eps
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), -1, keepdims=True) + self.eps)
    return self.scale[...].astype(self.dtype) * y.astype(self.dtype)


def quick_gelu(x: jax.Array) -> jax.Array:
  return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS = {
    "quick_gelu": quick_gelu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "silu": jax.nn.silu,
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
  if name not in ACTIVATIONS:
    raise ValueError(f"unsupported activation {name!r}; supported: {sorted(ACTIVATIONS)}")
  return ACTIVATIONS[name]
