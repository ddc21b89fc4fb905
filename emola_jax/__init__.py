"""emola-jax: EmoLA (LLaVA-1.5 plus a face-landmark prior token) in JAX/Flax NNX."""

from emola_jax.conversion.hf_load import load_pretrained
from emola_jax.model.config import EmolaConfig, LoraConfig, TextConfig, VisionConfig
from emola_jax.model.emola import EmolaModel

__all__ = ["EmolaConfig", "EmolaModel", "LoraConfig", "TextConfig", "VisionConfig",
           "load_pretrained"]
