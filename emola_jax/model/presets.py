"""Named model shapes: the real EmoLA-7B / LLaVA-1.5-7B and tiny ones for tests and demos.

Experiment configs in `configs/` pick one by name and override fields as flags.
"""

from __future__ import annotations

from typing import Any

from emola_jax.model.config import EmolaConfig

# CLIP ViT-L/14 at 336 px (openai/clip-vit-large-patch14-336).
CLIP_L14_336 = dict(hidden_size=1024, intermediate_size=4096, num_layers=24, num_heads=16,
                    image_size=336, patch_size=14, layer_norm_eps=1e-5, select_layer=-2)
# Vicuna-7B v1.5 as tuned by LLaVA-1.5 (LLaMA-2-7B architecture).
VICUNA_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32,
                 num_heads=32, num_kv_heads=32, rms_norm_eps=1e-5, rope_theta=10000.0,
                 max_position_embeddings=4096, tie_word_embeddings=False)

PRESETS: dict[str, dict[str, Any]] = {
    # The paper's model: one prior token (212-d InsightFace 2d106det landmarks) after 576 patches.
    "emola_7b": dict(vision=CLIP_L14_336, text=VICUNA_7B, projector_type="mlp2x_gelu",
                     prior_position="after", prior_dim=212, image_token_index=32000,
                     dtype="bfloat16", remat_policy="full"),
    # Plain LLaVA-1.5-7B (no prior token).
    "llava_7b": dict(vision=CLIP_L14_336, text=VICUNA_7B, projector_type="mlp2x_gelu",
                     prior_position="none", image_token_index=32000, dtype="bfloat16",
                     remat_policy="full"),
    # Tests: every code path, a few thousand parameters.
    "tiny": dict(vision=dict(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                             image_size=28, patch_size=14),
                 text=dict(vocab_size=256, hidden_size=32, intermediate_size=64, num_layers=2,
                           num_heads=4, num_kv_heads=2, max_position_embeddings=512),
                 prior_dim=12, image_token_index=255),
}


def get_dict(name: str) -> dict[str, Any]:
  if name not in PRESETS:
    raise ValueError(f"unknown model preset {name!r}; known: {sorted(PRESETS)}")
  return {k: (dict(v) if isinstance(v, dict) else v) for k, v in PRESETS[name].items()}


def get(name: str) -> EmolaConfig:
  return EmolaConfig.from_dict(get_dict(name))
