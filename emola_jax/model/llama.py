"""LLaMA decoder: embeddings, scanned decoder blocks with a KV cache, final norm and LM head.

Blocks: RMSNorm -> grouped-query attention with rotary embeddings -> residual, RMSNorm -> SwiGLU
MLP -> residual. LoRA adapters sit on the projections named in `LoraConfig.targets`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from emola_jax.model import sharding
from emola_jax.model.attention import apply_rope, attention, causal_mask, rope_inverse_frequencies
from emola_jax.model.config import LoraConfig, TextConfig
from emola_jax.model.layers import Linear, RMSNorm, dense, make_param
from emola_jax.model.stack import create_stack, run_stack, unstack

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
  """Keys/values of every layer for `max_len` slots, which slots hold tokens, and the next slot.

  Keys and values are stacked [layers, B, K, S, H] for the scanned decoder, or per layer (tuples
  of [B, K, S, H]) for `LlamaForCausalLM.for_decoding`'s unstacked one: there a layer reads its
  own array where it lies, where slicing it out of the stack copied it on every step. Heads
  come before slots so that the attention's dots read the cache as it lies, where [B, S, K, H]
  made XLA:CPU transpose the whole cache on every decoding step.
  """

  k: jax.Array | tuple[jax.Array, ...]
  v: jax.Array | tuple[jax.Array, ...]
  valid: jax.Array  # bool [B, S]
  index: jax.Array  # int32 scalar: the slot the next token is written to

  @classmethod
  def empty(cls, cfg: TextConfig, batch: int, max_len: int, dtype, *,
            per_layer: bool = False) -> KVCache:
    shape = (batch, cfg.num_kv_heads, max_len, cfg.resolved_head_dim)
    if per_layer:
      k = tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers))
      v = tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers))
    else:
      k = jnp.zeros((cfg.num_layers, *shape), dtype)
      v = jnp.zeros((cfg.num_layers, *shape), dtype)
    return cls(k, v, jnp.zeros((batch, max_len), bool), jnp.zeros((), jnp.int32))

  @property
  def per_layer(self) -> bool:
    return isinstance(self.k, tuple)

  @property
  def max_len(self) -> int:
    return self.valid.shape[1]

  def grow(self, max_len: int) -> KVCache:
    """This cache with `max_len` slots: the new slots are empty (zero, not valid)."""
    extra = max_len - self.max_len
    if extra < 0:
      raise ValueError(f"KVCache.grow: {max_len} slots < the {self.max_len} it has")
    pad = lambda x: jnp.pad(x, [(0, 0)] * (x.ndim - 2) + [(0, extra), (0, 0)])
    k, v = ((tuple(map(pad, x)) if self.per_layer else pad(x)) for x in (self.k, self.v))
    return KVCache(k, v, jnp.pad(self.valid, [(0, 0), (0, extra)]), self.index)


def write_cache(cache: jax.Array, new: jax.Array, layer: int | jax.Array | None,
                index: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Writes `new` [B, T, K, H] to slots [index, index + T) of one layer's keys or values.

  `cache`: the stacked [layers, B, K, S, H] with `layer` its index, or the layer's own
  [B, K, S, H] with `layer` None. Returns (the updated cache, the layer's slots [B, S, K, H]).
  """
  new = new.swapaxes(1, 2).astype(cache.dtype)
  if layer is None:
    cache = jax.lax.dynamic_update_slice(cache, new, (0, 0, index, 0))
    return cache, cache.swapaxes(1, 2)
  cache = jax.lax.dynamic_update_slice(cache, new[None], (layer, 0, 0, index, 0))
  return cache, jax.lax.dynamic_index_in_dim(cache, layer, axis=0, keepdims=False).swapaxes(1, 2)


class DecoderBlock(nnx.Module):
  """One LLaMA decoder layer."""

  def __init__(self, cfg: TextConfig, lora: LoraConfig, *, dtype, param_dtype,
               attention_impl: str, attention_query_block: int, rngs: nnx.Rngs):
    d, m, hd = cfg.hidden_size, cfg.intermediate_size, cfg.resolved_head_dim
    q_dim, kv_dim = cfg.num_heads * hd, cfg.num_kv_heads * hd

    def linear(name, n_in, n_out, axes, bias):
      rank = lora.rank if name in lora.targets else 0
      return Linear(n_in, n_out, axes, use_bias=bias, lora_rank=rank, lora_alpha=lora.alpha,
                    lora_dropout=lora.dropout, lora_dropout_masks=lora.dropout_masks,
                    dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    norm_kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.input_norm = RMSNorm(d, cfg.rms_norm_eps, **norm_kw)
    self.q_proj = linear("q_proj", d, q_dim, ("embed", "heads"), cfg.attention_bias)
    self.k_proj = linear("k_proj", d, kv_dim, ("embed", "kv"), cfg.attention_bias)
    self.v_proj = linear("v_proj", d, kv_dim, ("embed", "kv"), cfg.attention_bias)
    self.o_proj = linear("o_proj", q_dim, d, ("heads", "embed"), cfg.attention_bias)
    self.post_attention_norm = RMSNorm(d, cfg.rms_norm_eps, **norm_kw)
    self.gate_proj = linear("gate_proj", d, m, ("embed", "mlp"), cfg.mlp_bias)
    self.up_proj = linear("up_proj", d, m, ("embed", "mlp"), cfg.mlp_bias)
    self.down_proj = linear("down_proj", m, d, ("mlp", "embed"), cfg.mlp_bias)
    self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, hd
    self.attention_impl = attention_impl
    self.attention_query_block = attention_query_block

  def __call__(self, x, positions, inv_freq, mask, cache, cache_index, dropout_rng):
    """One layer. `cache`: None, or (layer, keys, values) as `write_cache` takes them; this
    call's keys/values are written in place at slots [cache_index, cache_index + T)."""
    b, t, _ = x.shape
    rngs = (list(jax.random.split(dropout_rng, len(LORA_TARGETS))) if dropout_rng is not None
            else [None] * len(LORA_TARGETS))
    rng = dict(zip(LORA_TARGETS, rngs))
    h = self.input_norm(x)
    q = self.q_proj(h, rng["q_proj"]).reshape(b, t, self.num_heads, self.head_dim)
    k = self.k_proj(h, rng["k_proj"]).reshape(b, t, self.num_kv_heads, self.head_dim)
    v = self.v_proj(h, rng["v_proj"]).reshape(b, t, self.num_kv_heads, self.head_dim)
    q, k = apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq)
    if cache is not None:
      layer, k_cache, v_cache = cache
      k_cache, k = write_cache(k_cache, k, layer, cache_index)
      v_cache, v = write_cache(v_cache, v, layer, cache_index)
      cache = (k_cache, v_cache)
    o = attention(q, k.astype(q.dtype), v.astype(q.dtype), mask, self.attention_impl,
                  causal=cache is None, query_block=self.attention_query_block)
    x = x + self.o_proj(o.reshape(b, t, -1), rng["o_proj"])
    h = self.post_attention_norm(x)
    gated = jax.nn.silu(self.gate_proj(h, rng["gate_proj"])) * self.up_proj(h, rng["up_proj"])
    x = x + self.down_proj(gated, rng["down_proj"])
    return sharding.constrain(x, sharding.BATCH_LENGTH_EMBED), cache


class LlamaForCausalLM(nnx.Module):
  """inputs_embeds [B, T, D] -> logits [B, T, V], optionally reading and extending a KV cache."""

  def __init__(self, cfg: TextConfig, lora: LoraConfig, *, dtype=jnp.float32,
               param_dtype=jnp.float32, scan_layers: bool = True, remat_policy: str = "none",
               attention_impl: str = "xla", attention_query_block: int = 256,
               rngs: nnx.Rngs):
    d, v = cfg.hidden_size, cfg.vocab_size
    normal = nnx.initializers.normal(0.02)
    self.embed_tokens = make_param(rngs, normal, (v, d), ("vocab", "embed"), param_dtype)
    self.blocks = create_stack(
        lambda r: DecoderBlock(cfg, lora, dtype=dtype, param_dtype=param_dtype,
                               attention_impl=attention_impl,
                               attention_query_block=attention_query_block, rngs=r),
        cfg.num_layers, rngs)
    self.norm = RMSNorm(d, cfg.rms_norm_eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.lm_head = (None if cfg.tie_word_embeddings else
                    make_param(rngs, normal, (d, v), ("embed", "vocab"), param_dtype))
    self.head_transposed = False  # lm_head stored [vocab, embed] (see `for_decoding`)
    self.cfg = cfg
    self.dtype = dtype
    self.scan_layers = scan_layers
    self.remat_policy = remat_policy

  def for_decoding(self, *, transpose_kernels: bool,
                   merge_lora: bool = False) -> LlamaForCausalLM:
    """A copy of this decoder laid out for a token-by-token loop (`Generator` keeps one).

    The blocks' weights are sliced out of the stack (`stack.unstack`: one copy of them), so the
    loop reads them in place instead of slicing them on every step. With `merge_lora`, LoRA
    adapters are folded into their kernels (`Linear.merge_lora`): a step runs one matmul per
    projection instead of three. With `transpose_kernels`, every kernel and the LM head are also
    stored [out, in], for `layers.dense`'s weights-first product on few rows (faster on
    XLA:CPU; measured in BENCHMARKS.md). Same function up to rounding, for inference only.
    """
    clone = nnx.merge(*nnx.split(self))
    clone.blocks = nnx.List(unstack(self.blocks, self.cfg.num_layers))
    for block in clone.blocks:
      for _, module in nnx.iter_modules(block):
        if isinstance(module, Linear):
          if merge_lora:
            module.merge_lora()
          if transpose_kernels:
            module.transpose_kernel()
    if transpose_kernels:
      if clone.lm_head is not None:
        clone.lm_head = clone.lm_head.replace(clone.lm_head[...].T,
                                              out_sharding=("vocab", "embed"))
        clone.head_transposed = True
    return clone

  def embed(self, token_ids: jax.Array) -> jax.Array:
    return jnp.take(self.embed_tokens[...], token_ids, axis=0).astype(self.dtype)

  def __call__(self, inputs_embeds: jax.Array, *, attention_mask: jax.Array | None = None,
               positions: jax.Array | None = None, cache: KVCache | None = None,
               dropout_rng: jax.Array | None = None,
               logits_at: jax.Array | None = None) -> tuple[jax.Array, KVCache | None]:
    """Runs the decoder.

    Args:
      inputs_embeds: [B, T, D].
      attention_mask: [B, T], 1 for real tokens (default: all ones).
      positions: rotary positions [B, T] (default: the slot index, as `transformers` does).
      cache: a KV cache whose slots [index, index + T) receive this call's keys and values.
      dropout_rng: LoRA dropout key; None = deterministic.
      logits_at: [B, K] positions whose logits are computed (default: all T). Training scores
        a fraction of the positions; the LM head is the largest matmul of a small model.

    Returns:
      (logits [B, T or K, V] in float32, the updated cache or None).
    """
    cfg = self.cfg
    b, t, _ = inputs_embeds.shape
    attention_mask = jnp.ones((b, t), bool) if attention_mask is None else attention_mask.astype(bool)
    start = jnp.zeros((), jnp.int32) if cache is None else cache.index
    query_slots = jnp.broadcast_to(start + jnp.arange(t, dtype=jnp.int32), (b, t))
    positions = query_slots if positions is None else positions
    if cache is None:
      key_valid = attention_mask
    else:
      key_valid = jax.lax.dynamic_update_slice_in_dim(cache.valid, attention_mask, start, axis=1)
    mask = causal_mask(query_slots, key_valid)
    inv_freq = rope_inverse_frequencies(cfg.resolved_head_dim, cfg.rope_theta, cfg.rope_scaling)
    layer_rngs = (None if dropout_rng is None else jax.random.split(dropout_rng, cfg.num_layers))
    unstacked = isinstance(self.blocks, nnx.List)  # `for_decoding`'s copy
    blocks = list(self.blocks) if unstacked else self.blocks
    if cache is not None and cache.per_layer != unstacked:
      raise ValueError("LlamaForCausalLM: a per-layer KV cache goes with the unstacked decoder "
                       "of `for_decoding`, a stacked one with the stacked decoder; build it with "
                       f"KVCache.empty(..., per_layer={unstacked})")
    # Unstacked blocks run in a Python loop: numpy layer ids stay static there and pick the
    # layer's own cache arrays.
    layer_ids = (np.arange(cfg.num_layers) if unstacked
                 else jnp.arange(cfg.num_layers, dtype=jnp.int32))

    # The cache rides in the carry and each layer updates its part in place: passing it as
    # per-layer scan inputs/outputs would copy and re-stack the whole cache every step.
    def body(block, carry, xs):
      layer, rng = xs
      if cache is None:
        x, _ = block(carry, positions, inv_freq, mask, None, start, rng)
        return x, None
      x, k_all, v_all = carry
      if cache.per_layer:
        x, (k, v) = block(x, positions, inv_freq, mask, (None, k_all[layer], v_all[layer]),
                          start, rng)
        k_all, v_all = (_replace(k_all, layer, k), _replace(v_all, layer, v))
      else:
        x, (k_all, v_all) = block(x, positions, inv_freq, mask, (layer, k_all, v_all), start,
                                  rng)
      return (x, k_all, v_all), None

    x = sharding.constrain(inputs_embeds.astype(self.dtype), sharding.BATCH_LENGTH_EMBED)
    carry = x if cache is None else (x, cache.k, cache.v)
    carry, _ = run_stack(blocks, carry, (layer_ids, layer_rngs), body, num=cfg.num_layers,
                         scan=self.scan_layers, remat_policy=self.remat_policy)
    x = carry if cache is None else carry[0]
    if logits_at is not None:
      x = jnp.take_along_axis(x, logits_at[..., None], axis=1)
    x = self.norm(x)
    # Tied heads read the [vocab, embed] embedding table as it is.
    head = self.embed_tokens if self.lm_head is None else self.lm_head
    logits = dense(x, head[...].astype(self.dtype),
                   transposed=self.lm_head is None or self.head_transposed).astype(jnp.float32)
    logits = sharding.constrain(logits, sharding.BATCH_LENGTH_VOCAB)
    if cache is not None:
      cache = KVCache(carry[1], carry[2], key_valid, start + t)
    return logits, cache


def _replace(items: tuple, index: int, item) -> tuple:
  return items[:index] + (item,) + items[index + 1:]
