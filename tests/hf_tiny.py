"""Tiny random `transformers` models built and saved inside the tests (nothing is downloaded)."""

from __future__ import annotations

import numpy as np
import torch
import transformers

VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
              image_size=28, patch_size=14, projection_dim=16)
TEXT = dict(vocab_size=160, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
            rms_norm_eps=1e-5)
IMAGE_TOKEN = 159


def randomise(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
  """Re-draws every parameter (norm scales and biases too), so parity tests miss nothing."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      scale = 0.5 if p.ndim > 1 else 0.2
      p.copy_(torch.randn(p.shape, generator=gen) * scale / max(1, p.shape[-1]) ** 0.5
              + (1.0 if name.endswith(("norm.weight", "layernorm.weight", "layer_norm1.weight",
                                       "layer_norm2.weight", "layrnorm.weight")) else 0.0))
  return model.eval()


def llama_config(**overrides) -> transformers.LlamaConfig:
  return transformers.LlamaConfig(**{**TEXT, **overrides})


def clip_config(**overrides) -> transformers.CLIPVisionConfig:
  return transformers.CLIPVisionConfig(**{**VISION, **overrides})


def llava(text=None, vision=None, seed=0, **overrides) -> transformers.LlavaForConditionalGeneration:
  cfg = transformers.LlavaConfig(vision_config=vision or clip_config(),
                                 text_config=text or llama_config(),
                                 image_token_index=IMAGE_TOKEN, **overrides)
  torch.manual_seed(seed)
  return randomise(transformers.LlavaForConditionalGeneration(cfg), seed)


def llava_inputs(model, batch=2, text_len=(5, 3), seed=0):
  """input_ids with one image block per row (rows of different text length), pixels, mask."""
  rng = np.random.default_rng(seed)
  cfg = model.config
  patches = (cfg.vision_config.image_size // cfg.vision_config.patch_size) ** 2
  rows = []
  for b in range(batch):
    pre = rng.integers(3, IMAGE_TOKEN - 1, size=2).tolist()
    post = rng.integers(3, IMAGE_TOKEN - 1, size=text_len[b % len(text_len)]).tolist()
    rows.append([1] + pre + [IMAGE_TOKEN] * patches + post)
  length = max(map(len, rows))
  ids = np.zeros((batch, length), np.int64)
  mask = np.zeros((batch, length), np.int64)
  for b, row in enumerate(rows):
    ids[b, :len(row)] = row
    mask[b, :len(row)] = 1
  size = cfg.vision_config.image_size
  pixels = rng.normal(size=(batch, 3, size, size)).astype(np.float32)
  return ids, pixels, mask


def rel_err(ours, ref) -> float:
  ours = np.asarray(ours, np.float64)
  ref = np.asarray(ref, np.float64)
  return float(np.abs(ours - ref).max() / np.abs(ref).max())
