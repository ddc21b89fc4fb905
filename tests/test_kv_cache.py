"""KV-cache decoding gives the logits of a full forward pass at every step."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from emola_jax.model.config import LoraConfig, TextConfig
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
