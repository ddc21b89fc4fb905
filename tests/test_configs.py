"""Every config file loads and builds a model config; overrides and ablation flags take effect."""

from __future__ import annotations

import glob
import os
import subprocess
import sys

import pytest
from ml_collections import config_flags

from emola_jax.training import experiment, param_groups, trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(REPO, "configs", "*.py")))


def _load(path, arg=None):
  return config_flags.config_flags._ConfigFileParser(name="config").parse(
      path + (f":{arg}" if arg else ""))


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_every_config_loads(path):
  config = _load(path)
  if os.path.basename(path) == "models.py":
    assert config.prior_dim == 212
    return
  cfg = experiment.model_config(config)
  assert experiment.train_splits(config)
  assert param_groups.parse_trainable(config.train.trainable)
  assert cfg.num_image_slots == cfg.vision.num_patches + int(cfg.has_prior)


def test_emola_lora_trainable_count_matches_the_reference():
  """~358M: LoRA ~320M, visual projector ~21M, prior projector ~17.7M (from shapes only)."""
  config = _load(os.path.join(REPO, "configs", "emola_lora.py"))
  counts = trainer.trainable_counts(config)
  assert counts == {"lora": 319_815_680, "projector": 20_979_712,
                    "prior_projector": 17_653_760}
  assert sum(counts.values()) == 358_449_152
  assert config.model.lora.rank == 128 and config.model.lora.alpha == 256.0
  assert config.train.group_lrs.projector == 2e-5 and config.train.lr == 1e-4
  assert _load(os.path.join(REPO, "configs", "emola_lora.py"), "au").task == "au"


@pytest.mark.parametrize("flag,check", [
    ("train.trainable=prior_only", lambda c: trainer.trainable_counts(c) ==
     {"prior_projector": 17_653_760}),
    ("train.trainable=lora_and_projector_only", lambda c: set(trainer.trainable_counts(c)) ==
     {"lora", "projector"}),
    ("model.lora.rank=64", lambda c: trainer.trainable_counts(c)["lora"] == 319_815_680 // 2),
    ("model.prior_position=none", lambda c: experiment.model_config(c).num_image_slots == 576),
    ("model.prior_position=before", lambda c: experiment.model_config(c).prior_position ==
     "before"),
    ("model.prior_dim=136", lambda c: trainer.trainable_counts(c)["prior_projector"] ==
     136 * 4096 + 4096 + 4096 * 4096 + 4096),
])
def test_ablation_overrides_take_effect(flag, check):
  config = _load(os.path.join(REPO, "configs", "emola_lora.py"))
  key, value = flag.split("=")
  node = config
  *parents, leaf = key.split(".")
  for p in parents:
    node = node[p]
  node[leaf] = type(node[leaf])(value)
  assert check(config)


def test_unknown_override_is_a_clear_error(tmp_path):
  result = subprocess.run(
      [sys.executable, "-m", "emola_jax.cli.train", f"--config={REPO}/configs/tiny.py",
       f"--workdir={tmp_path}", "--config.train.learning_rate=1e-3"],
      capture_output=True, text=True, cwd=REPO, timeout=120)
  assert result.returncode != 0
  assert "Traceback" not in result.stderr
  assert "--config.train.learning_rate" in result.stderr and "no field 'learning_rate'" in \
      result.stderr and "'lr'" in result.stderr
