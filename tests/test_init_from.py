"""Training starts from a native checkpoint or a Hugging Face LLaVA directory."""

from __future__ import annotations

import os

import jax
import numpy as np
from flax import nnx
from ml_collections import config_flags

from emola_jax.conversion import native
from emola_jax.model import presets
from emola_jax.model.emola import EmolaModel
from emola_jax.training import mesh as mesh_lib
from emola_jax.training import param_groups, trainer
from tests import hf_tiny

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(init_from, **model):
  config = config_flags.config_flags._ConfigFileParser(name="config").parse(  # pylint: disable=protected-access
      f"{REPO}/configs/tiny.py")
  config.init_from = str(init_from)
  for key, value in model.items():
    config.model[key] = value
  return config


def _build(config):
  mesh = mesh_lib.make_mesh(config)
  split, cfg, shardings = trainer.build_split(config, mesh, mesh_lib.rules_from_config(config))
  for name, value in {**split.frozen, **split.trainable}.items():  # placed on the mesh
    assert isinstance(value, jax.Array) and value.sharding == shardings[name], name
  return split, cfg, shardings


def _host_loaded(model: nnx.Module) -> set[str]:
  """Names of the parameters of `model` held as numpy arrays in host memory."""
  return {k for k, v in param_groups.to_flat(nnx.state(model)).items()
          if isinstance(v[...], np.ndarray)}


def test_init_from_native_keeps_weights_and_adds_fresh_lora(tmp_path):
  saved = EmolaModel(presets.get("tiny"), rngs=nnx.Rngs(7))  # no LoRA
  native.save_native(saved, str(tmp_path / "ckpt"))
  split, cfg, _ = _build(_config(tmp_path / "ckpt"))
  assert cfg.lora.rank == 4  # configs/tiny.py's LoRA on top of the checkpoint
  weights = param_groups.to_flat(nnx.state(saved))
  for name, value in {**split.frozen, **split.trainable}.items():
    if ".lora_" in name:
      continue
    np.testing.assert_array_equal(np.asarray(value), np.asarray(weights[name][...]))
  lora_b = [v for k, v in split.trainable.items() if k.endswith("lora_b")]
  assert lora_b and all(not np.asarray(v).any() for v in lora_b)  # fresh adapters start at 0
  # Loaded weights stay on the host until `build_split` places each device's slices.
  model, _ = trainer.build_model(_config(tmp_path / "ckpt"))
  assert _host_loaded(model) == set(weights)
  same, _ = native.load_native(str(tmp_path / "ckpt"), host_arrays=True)  # no config change
  assert _host_loaded(same) == set(weights)
  for name, value in param_groups.to_flat(nnx.state(same)).items():
    np.testing.assert_array_equal(value[...], np.asarray(weights[name][...]))


def test_init_from_hf_llava_with_a_fresh_prior_token(tmp_path):
  model = hf_tiny.llava()
  model.save_pretrained(tmp_path / "hf")
  split, cfg, _ = _build(_config(tmp_path / "hf", prior_position="after", prior_dim=12))
  assert cfg.text.vocab_size == hf_tiny.TEXT["vocab_size"] and cfg.has_prior
  embed = model.state_dict()["model.language_model.embed_tokens.weight"].numpy()
  np.testing.assert_array_equal(np.asarray(split.frozen["language_model.embed_tokens"]), embed)
  assert split.trainable["prior_projector.linear_1.kernel"].shape == (12, 32)
  model, _ = trainer.build_model(_config(tmp_path / "hf", prior_position="after", prior_dim=12))
  loaded = _host_loaded(model)
  assert "language_model.embed_tokens" in loaded
  assert not any(".lora_" in k or k.startswith("prior_projector.") for k in loaded)  # fresh
