"""KV-cache decoding gives the logits of a full forward pass; the decoding copy of the decoder."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from emola_jax.model.config import LoraConfig, TextConfig
from emola_jax.model.layers import Linear, dense
from emola_jax.model.llama import KVCache, LlamaForCausalLM

CFG = TextConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_layers=3, num_heads=4,
                 num_kv_heads=2)


def test_prefill_then_decode_matches_full_forward_with_left_padding():
  lm = LlamaForCausalLM(CFG, LoraConfig(), rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  ids = jnp.asarray(rng.integers(0, 50, size=(2, 12)))
  # Row 1 is left-padded by 3: its positions start at 0 on its first real token.
  mask = jnp.asarray(np.r_[[1] * 12, [0] * 3 + [1] * 9].reshape(2, 12))
  positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
  full, _ = lm(lm.embed(ids), attention_mask=mask, positions=positions)

  prefill = 5
  cache = KVCache.empty(CFG, batch=2, max_len=16, dtype=jnp.float32)
  step = jax.jit(lambda emb, m, p, c: lm(emb, attention_mask=m, positions=p, cache=c))
  logits, cache = step(lm.embed(ids[:, :prefill]), mask[:, :prefill], positions[:, :prefill],
                       cache)
  outs = [logits]
  for t in range(prefill, 12):
    logits, cache = step(lm.embed(ids[:, t:t + 1]), mask[:, t:t + 1], positions[:, t:t + 1],
                         cache)
    outs.append(logits)
  decoded = np.concatenate([np.asarray(o) for o in outs], axis=1)
  real = np.asarray(mask, bool)
  err = np.abs(decoded - np.asarray(full))[real].max() / np.abs(np.asarray(full)).max()
  assert err <= 1e-4
  assert int(cache.index) == 12


@pytest.mark.parametrize("tie", [False, True])
def test_decoding_copy_computes_the_same_logits(tie):
  """`for_decoding` (unstacked, optionally kernels stored [out, in]) is the same function, LoRA
  included, both on few rows (weights-first products) and on many."""
  cfg = dataclasses.replace(CFG, tie_word_embeddings=tie)
  lm = LlamaForCausalLM(cfg, LoraConfig(rank=4, alpha=8.0), rngs=nnx.Rngs(0))
  rng = np.random.default_rng(1)
  for _, module in nnx.iter_modules(lm):  # non-zero B: the adapters change the output
    if getattr(module, "lora_b", None) is not None:
      module.lora_b[...] = jnp.asarray(rng.normal(size=module.lora_b.shape), jnp.float32) * 0.1
  for rows in (8, 40):  # 2 x 8 = 16 rows <= layers.SKINNY_ROWS < 2 x 40
    ids = jnp.asarray(rng.integers(0, 50, size=(2, rows)))
    ref = np.asarray(lm(lm.embed(ids))[0])
    for transpose in (False, True):
      for merge in (False, True):
        copy = lm.for_decoding(transpose_kernels=transpose, merge_lora=merge)
        linears = [m for _, m in nnx.iter_modules(copy) if isinstance(m, Linear)]
        assert all(m.transposed == transpose for m in linears)
        assert all((m.lora_a is None) == merge for m in linears)
        np.testing.assert_allclose(np.asarray(copy(copy.embed(ids))[0]), ref, rtol=1e-5,
                                   atol=1e-5)
  linears = [m for _, m in nnx.iter_modules(lm) if isinstance(m, Linear)]
  assert not any(m.transposed or m.lora_a is None for m in linears)  # the original is untouched


def test_merged_lora_kernel_is_w_plus_scaled_ab():
  linear = Linear(3, 2, ("embed", "mlp"), use_bias=False, lora_rank=2, lora_alpha=4.0,
                  rngs=nnx.Rngs(0))
  w = np.arange(6, dtype=np.float32).reshape(3, 2)
  a = np.array([[1, 0], [0, 1], [1, 1]], np.float32)
  b = np.array([[1, 2], [3, 4]], np.float32)
  linear.kernel[...], linear.lora_a[...], linear.lora_b[...] = w, a, b
  linear.transpose_kernel()
  linear.merge_lora()
  # scale = alpha / rank = 2; A @ B = [[1, 2], [3, 4], [4, 6]]; stored [out, in].
  np.testing.assert_array_equal(linear.kernel[...], (w + 2 * np.array([[1, 2], [3, 4], [4, 6]])).T)
  assert linear.lora_a is None and linear.lora_b is None


def test_cache_layout_must_match_the_decoder():
  lm = LlamaForCausalLM(CFG, LoraConfig(), rngs=nnx.Rngs(0))
  embeds = lm.embed(jnp.zeros((2, 3), jnp.int32))
  with pytest.raises(ValueError, match="per_layer=True"):
    lm.for_decoding(transpose_kernels=False)(
        embeds, cache=KVCache.empty(CFG, batch=2, max_len=8, dtype=jnp.float32))
  with pytest.raises(ValueError, match="per_layer=False"):
    lm(embeds, cache=KVCache.empty(CFG, batch=2, max_len=8, dtype=jnp.float32, per_layer=True))


@pytest.mark.parametrize("rows", [1, 5, 64, 65, 300])
def test_dense_with_a_transposed_kernel(rows):
  rng = np.random.default_rng(rows)
  x = rng.normal(size=(rows, 3, 16)).astype(np.float32)  # leading dims flatten to 3 x rows
  w = rng.normal(size=(16, 24)).astype(np.float32)
  ours = jax.jit(lambda x, w: dense(x, w.T, transposed=True))(x, w)
  np.testing.assert_allclose(np.asarray(ours), x @ w, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(dense(x, w)), x @ w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("per_layer", [False, True])
def test_grown_cache_keeps_its_slots_and_adds_empty_ones(per_layer):
  cache = KVCache.empty(CFG, 2, 3, jnp.float32, per_layer=per_layer)
  rng = np.random.default_rng(0)
  fill = lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32)
  cache = KVCache(jax.tree.map(fill, cache.k), jax.tree.map(fill, cache.v),
                  jnp.array([[True, True, False], [False, True, False]]), jnp.int32(2))
  grown = cache.grow(5)
  assert grown.max_len == 5 and int(grown.index) == 2 and grown.per_layer == per_layer
  np.testing.assert_array_equal(grown.valid, [[1, 1, 0, 0, 0], [0, 1, 0, 0, 0]])
  for old, new in zip(jax.tree.leaves((cache.k, cache.v)), jax.tree.leaves((grown.k, grown.v))):
    assert new.shape == old.shape[:-2] + (5, old.shape[-1])  # [..., S, H]: slots before H
    np.testing.assert_array_equal(new[..., :3, :], old)
    assert not np.asarray(new[..., 3:, :]).any()
  with pytest.raises(ValueError, match="2 slots < the 3"):
    cache.grow(2)


def test_merge_keeps_precision_only_with_kernels_and_compute_as_wide_as_the_adapter():
  make = lambda **kw: Linear(4, 4, ("embed", "mlp"), lora_rank=2, lora_alpha=2.0,
                             rngs=nnx.Rngs(0), **kw)
  assert make().merge_keeps_precision
  assert not make(dtype=jnp.bfloat16).merge_keeps_precision  # bf16 compute
  linear = make()
  linear.kernel = linear.kernel.replace(linear.kernel[...].astype(jnp.bfloat16))
  assert not linear.merge_keeps_precision  # bf16 kernel, fp32 adapter
  assert make(param_dtype=jnp.bfloat16, dtype=jnp.bfloat16).merge_keeps_precision
  assert Linear(4, 4, ("embed", "mlp"), rngs=nnx.Rngs(0)).merge_keeps_precision  # no adapter
