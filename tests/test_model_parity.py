"""Parity of our Flax modules with the `transformers` PyTorch modules on tiny random models."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import save_file

import emola_jax
from tests import hf_tiny

FP32_TOL, BF16_TOL = 1e-4, 2e-2


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
  model = hf_tiny.randomise(transformers.CLIPVisionModel(hf_tiny.clip_config()))
  path = str(tmp_path_factory.mktemp("clip"))
  model.save_pretrained(path)
  return model, path


@pytest.mark.parametrize("dtype,tol,impl", [("float32", FP32_TOL, "xla"),
                                            ("bfloat16", BF16_TOL, "xla"),
                                            ("float32", FP32_TOL, "einsum")])
def test_clip_penultimate_patch_features(clip_dir, dtype, tol, impl):
  model, path = clip_dir
  pixels = np.random.default_rng(0).normal(size=(2, 3, 28, 28)).astype(np.float32)
  with torch.no_grad():
    ref = model(torch.from_numpy(pixels), output_hidden_states=True).hidden_states[-2][:, 1:]
  tower, cfg = emola_jax.load_pretrained(path, dtype=dtype, attention_impl=impl)
  assert cfg.layers_to_run == cfg.num_layers - 1
  ours = tower(jnp.asarray(pixels))
  assert ours.shape == ref.shape
  assert hf_tiny.rel_err(ours, ref) <= tol


# jax.nn.dot_product_attention, and the einsum form in query blocks of 16 (40 tokens: 16, 16, 8).
ATTENTION = [dict(attention_impl="xla"), dict(attention_impl="einsum", attention_query_block=16)]


@pytest.mark.parametrize("attn", ATTENTION, ids=["xla", "einsum"])
@pytest.mark.parametrize("kv_heads,tie,rope", [
    (2, False, None),  # grouped-query attention
    (4, False, None),  # multi-head attention
    (1, True, {"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0}),
    (2, False, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 16,
                "rope_theta": 10000.0}),
])
def test_llama_logits(tmp_path, kv_heads, tie, rope, attn):
  kw = dict(num_key_value_heads=kv_heads, tie_word_embeddings=tie)
  if rope:
    kw["rope_parameters"] = rope
  model = hf_tiny.randomise(transformers.LlamaForCausalLM(hf_tiny.llama_config(**kw)))
  model.save_pretrained(tmp_path)
  ids = np.random.default_rng(1).integers(0, 160, size=(2, 40))
  with torch.no_grad():
    ref = model(torch.from_numpy(ids)).logits
  lm, cfg = emola_jax.load_pretrained(str(tmp_path), **attn)
  assert cfg.num_kv_heads == kv_heads and cfg.tie_word_embeddings == tie
  logits, _ = lm(lm.embed(jnp.asarray(ids)))
  assert hf_tiny.rel_err(logits, ref) <= FP32_TOL


def _llava_logits(model, ids, pixels, mask):
  with torch.no_grad():
    return model(input_ids=torch.from_numpy(ids), pixel_values=torch.from_numpy(pixels),
                 attention_mask=torch.from_numpy(mask)).logits.numpy()


@pytest.mark.parametrize("dtype,tol,attn", [("float32", FP32_TOL, ATTENTION[0]),
                                            ("bfloat16", BF16_TOL, ATTENTION[0]),
                                            ("float32", FP32_TOL, dict(
                                                attention_impl="einsum",
                                                attention_query_block=4))])  # 12 tokens
def test_llava_logits_on_disk_layout(tmp_path, dtype, tol, attn):
  model = hf_tiny.llava()
  model.save_pretrained(tmp_path)
  ids, pixels, mask = hf_tiny.llava_inputs(model)  # right-padded rows of different lengths
  ref = _llava_logits(model, ids, pixels, mask)
  ours_model, cfg = emola_jax.load_pretrained(str(tmp_path), dtype=dtype, **attn)
  assert cfg.attention_impl == attn["attention_impl"]
  assert cfg.prior_position == "none" and cfg.image_token_index == hf_tiny.IMAGE_TOKEN
  ours = np.asarray(ours_model(jnp.asarray(ids), jnp.asarray(pixels), jnp.asarray(mask)))
  real = mask.astype(bool)  # padded positions are not compared
  assert hf_tiny.rel_err(ours[real], ref[real]) <= tol


def test_llava_in_memory_layout_sharded(tmp_path):
  """`model.language_model.*` keys (the in-memory names), split over two shards with an index."""
  model = hf_tiny.llava(seed=3)
  state = {k: v.contiguous() for k, v in model.state_dict().items()}
  keys = sorted(state)
  shards = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
            "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
  for name, shard_keys in shards.items():
    save_file({k: state[k] for k in shard_keys}, str(tmp_path / name))
  index = {"metadata": {}, "weight_map": {k: n for n, ks in shards.items() for k in ks}}
  (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
  model.config.save_pretrained(tmp_path)
  assert any(k.startswith("model.language_model.") for k in keys)
  ids, pixels, mask = hf_tiny.llava_inputs(model, batch=1)
  ref = _llava_logits(model, ids, pixels, mask)
  ours_model, _ = emola_jax.load_pretrained(str(tmp_path))
  ours = ours_model(jnp.asarray(ids), jnp.asarray(pixels), jnp.asarray(mask))
  assert hf_tiny.rel_err(ours, ref) <= FP32_TOL


def test_compose_from_clip_and_llama_dirs(tmp_path, clip_dir):
  """A LLaMA directory plus a CLIP directory: both parts load, projectors start fresh."""
  clip_model, clip_path = clip_dir
  llama = hf_tiny.randomise(transformers.LlamaForCausalLM(hf_tiny.llama_config()))
  llama.save_pretrained(tmp_path)
  model, cfg = emola_jax.load_pretrained(str(tmp_path), vision_path=clip_path,
                                         image_token_index=hf_tiny.IMAGE_TOKEN)
  np.testing.assert_array_equal(
      np.asarray(model.language_model.embed_tokens[...]),
      llama.model.embed_tokens.weight.detach().numpy())
  np.testing.assert_array_equal(
      np.asarray(model.vision_tower.position_embedding[...]),
      clip_model.state_dict()["embeddings.position_embedding.weight"].numpy())
  assert cfg.prior_position == "after" and model.prior_projector is not None
