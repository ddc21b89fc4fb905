"""Model shapes alone, for tools that need a model but no training recipe.

  emola-plan --config=configs/models.py:emola_7b ...
  python -c "from ml_collections import config_flags" ...  (any config_flags user)

Argument: a preset name from emola_jax/model/presets.py (emola_7b, llava_7b, tiny).
"""

import ml_collections

from emola_jax.model import presets


def get_config(arg: str = "emola_7b") -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(presets.get_dict(arg))
