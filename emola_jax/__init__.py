"""emola-jax: EmoLA (LLaVA-1.5 plus a face-landmark prior token) in JAX/Flax NNX.

The model API is imported lazily, so that light tools (`emola-score`) start without JAX.
"""

import importlib

_EXPORTS = {
    "load_pretrained": "emola_jax.conversion.hf_load",
    "EmolaConfig": "emola_jax.model.config",
    "LoraConfig": "emola_jax.model.config",
    "TextConfig": "emola_jax.model.config",
    "VisionConfig": "emola_jax.model.config",
    "EmolaModel": "emola_jax.model.emola",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
  if name in _EXPORTS:
    return getattr(importlib.import_module(_EXPORTS[name]), name)
  raise AttributeError(f"module 'emola_jax' has no attribute {name!r}")
