"""CLIP ViT vision tower, stopped at the selected layer, returning patch features without CLS.

Pre-LayerNorm ViT: patch embedding (a linear map of flattened patches, equal to CLIP's stride-p
convolution), a class token, learned position embeddings, `pre_layrnorm`, then encoder blocks
(LN -> attention -> residual, LN -> quick-GELU MLP -> residual). All `num_layers` blocks and the
post-LayerNorm are kept so that checkpoints round-trip, but only `select_layer` is computed.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from emola_jax.model import sharding
from emola_jax.model.attention import attention
from emola_jax.model.config import VisionConfig
from emola_jax.model.layers import LayerNorm, Linear, activation, make_param
from emola_jax.model.stack import create_stack, run_stack


class ClipBlock(nnx.Module):
  """One pre-LayerNorm transformer encoder layer."""

  def __init__(self, cfg: VisionConfig, *, dtype, param_dtype, attention_impl: str,
               rngs: nnx.Rngs):
    d, m = cfg.hidden_size, cfg.intermediate_size
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.ln1 = LayerNorm(d, cfg.layer_norm_eps, **kw)
    self.q_proj = Linear(d, d, ("embed", "heads"), **kw)
    self.k_proj = Linear(d, d, ("embed", "heads"), **kw)
    self.v_proj = Linear(d, d, ("embed", "heads"), **kw)
    self.o_proj = Linear(d, d, ("heads", "embed"), **kw)
    self.ln2 = LayerNorm(d, cfg.layer_norm_eps, **kw)
    self.fc1 = Linear(d, m, ("embed", "mlp"), **kw)
    self.fc2 = Linear(m, d, ("mlp", "embed"), **kw)
    self.num_heads = cfg.num_heads
    self.act = cfg.hidden_act
    self.attention_impl = attention_impl

  def __call__(self, x: jax.Array) -> jax.Array:
    b, t, d = x.shape
    heads = lambda y: y.reshape(b, t, self.num_heads, d // self.num_heads)
    h = self.ln1(x)
    o = attention(heads(self.q_proj(h)), heads(self.k_proj(h)), heads(self.v_proj(h)), None,
                  self.attention_impl)
    x = x + self.o_proj(o.reshape(b, t, d))
    x = x + self.fc2(activation(self.act)(self.fc1(self.ln2(x))))
    return sharding.constrain(x, sharding.BATCH_LENGTH_EMBED)


class ClipVisionTower(nnx.Module):
  """pixel_values [B, C, H, W] (the `transformers` layout) -> patch features [B, P, D]."""

  def __init__(self, cfg: VisionConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
               scan_layers: bool = True, remat_policy: str = "none", attention_impl: str = "xla",
               rngs: nnx.Rngs):
    d, p, c = cfg.hidden_size, cfg.patch_size, cfg.num_channels
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    normal = nnx.initializers.normal(0.02)
    self.patch_embed = Linear(c * p * p, d, ("patch", "embed"), use_bias=False, **kw)
    self.class_embedding = make_param(rngs, normal, (d,), ("embed",), param_dtype)
    self.position_embedding = make_param(rngs, normal, (cfg.num_patches + 1, d),
                                         ("positions", "embed"), param_dtype)
    self.pre_norm = LayerNorm(d, cfg.layer_norm_eps, **kw)
    self.blocks = create_stack(
        lambda r: ClipBlock(cfg, dtype=dtype, param_dtype=param_dtype,
                            attention_impl=attention_impl, rngs=r), cfg.num_layers, rngs)
    # Unused by LLaVA (it reads a hidden state before it); kept so checkpoints round-trip.
    self.post_norm = LayerNorm(d, cfg.layer_norm_eps, **kw)
    self.cfg = cfg
    self.dtype = dtype
    self.scan_layers = scan_layers
    self.remat_policy = remat_policy

  def __call__(self, pixel_values: jax.Array) -> jax.Array:
    cfg = self.cfg
    b, c, h, w = pixel_values.shape
    p = cfg.patch_size
    if (h, w) != (cfg.image_size, cfg.image_size) or c != cfg.num_channels:
      raise ValueError(f"pixel_values of shape {pixel_values.shape} do not match the vision config "
                       f"({cfg.num_channels} x {cfg.image_size} x {cfg.image_size})")
    # [B, C, H, W] -> [B, (H/p)*(W/p), C*p*p], flattened in (c, py, px) order like the conv kernel.
    patches = pixel_values.reshape(b, c, h // p, p, w // p, p).transpose(0, 2, 4, 1, 3, 5)
    x = self.patch_embed(patches.reshape(b, (h // p) * (w // p), c * p * p))
    cls = jnp.broadcast_to(self.class_embedding[...].astype(self.dtype), (b, 1, cfg.hidden_size))
    x = jnp.concatenate([cls, x], axis=1) + self.position_embedding[...].astype(self.dtype)
    x = self.pre_norm(x)
    x, _ = run_stack(self.blocks, x, None, lambda block, h, _: (block(h), None),
                     num=cfg.layers_to_run, scan=self.scan_layers, remat_policy=self.remat_policy)
    return x[:, 1:]
