"""PEFT LoRA adapters: reading `adapter_config.json` + weights, and merging them into base weights.

A PEFT adapter directory holds `adapter_config.json` (r, lora_alpha, lora_dropout, ...) and
`adapter_model.safetensors` or `adapter_model.bin`, with keys like
`base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight` (A: [r, in]) and `...lora_B.weight`
(B: [out, r]). The adapted layer computes W x + scale * B A x with scale = alpha / r
(alpha / sqrt(r) with `use_rslora`), so merging is W + scale * B @ A in the torch [out, in] layout.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re

import numpy as np

from emola_jax.conversion import torch_bin
from emola_jax.conversion.safetensors_io import CheckpointError, SafetensorsCheckpoint

CONFIG_FILE = "adapter_config.json"
PEFT_PREFIX = "base_model.model."
_KEY = re.compile(r"(?P<module>.+)\.lora_(?P<ab>[AB])\.weight")


@dataclasses.dataclass
class Adapter:
  """A PEFT LoRA adapter: its scale and, per adapted module, the keys of A and B."""

  directory: str
  rank: int
  alpha: float
  dropout: float
  scale: float
  checkpoint: SafetensorsCheckpoint | torch_bin.TorchCheckpoint
  # module path without the PEFT prefix (e.g. "model.layers.0.self_attn.q_proj") -> (A key, B key)
  modules: dict[str, tuple[str, str]]

  def pair(self, module: str) -> tuple[np.ndarray, np.ndarray]:
    a_key, b_key = self.modules[module]
    return self.checkpoint.get(a_key), self.checkpoint.get(b_key)

  def delta(self, module: str) -> np.ndarray:
    """scale * B @ A, [out, in], in float32."""
    a, b = self.pair(module)
    return self.scale * (np.asarray(b, np.float32) @ np.asarray(a, np.float32))


def read_adapter(directory: str) -> Adapter:
  """Reads and checks a PEFT LoRA adapter directory."""
  config_path = os.path.join(directory, CONFIG_FILE)
  try:
    with open(config_path) as f:
      cfg = json.load(f)
  except FileNotFoundError:
    raise CheckpointError(f"{config_path}: not found; --input must be the EmoLA release directory "
                          "(a PEFT LoRA adapter)") from None
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{config_path}: malformed JSON ({e})") from None
  peft_type = cfg.get("peft_type", "LORA")
  if peft_type != "LORA":
    raise CheckpointError(f"{config_path}: peft_type {peft_type!r}; only LoRA adapters are read")
  for field, ok in [("use_dora", False), ("fan_in_fan_out", False)]:
    if cfg.get(field, ok) != ok:
      raise CheckpointError(f"{config_path}: {field}={cfg[field]!r} is not supported")
  for field in ("rank_pattern", "alpha_pattern"):
    if cfg.get(field):
      raise CheckpointError(f"{config_path}: per-module {field} is not supported")
  try:
    rank, alpha = int(cfg["r"]), float(cfg["lora_alpha"])
  except (KeyError, TypeError, ValueError) as e:
    raise CheckpointError(f"{config_path}: needs integer 'r' and numeric 'lora_alpha' "
                          f"({e})") from None
  scale = alpha / math.sqrt(rank) if cfg.get("use_rslora") else alpha / rank
  if os.path.exists(os.path.join(directory, "adapter_model.safetensors")):
    checkpoint = SafetensorsCheckpoint(directory, prefix="adapter_model")
  elif os.path.exists(os.path.join(directory, "adapter_model.bin")):
    checkpoint = torch_bin.TorchCheckpoint(directory, prefix="adapter_model")
  else:
    raise CheckpointError(f"{directory}: no adapter_model.safetensors or adapter_model.bin")
  halves: dict[str, dict[str, str]] = {}
  for key in checkpoint.keys():
    match = _KEY.fullmatch(key)
    if match is None:
      raise CheckpointError(f"{checkpoint.where(key)}: unexpected tensor {key!r}: only LoRA "
                            "A/B matrices (`...lora_A.weight`, `...lora_B.weight`) are supported")
    module = match["module"].removeprefix(PEFT_PREFIX)
    halves.setdefault(module, {})[match["ab"]] = key
  modules = {}
  for module, pair in halves.items():
    if set(pair) != {"A", "B"}:
      missing = "lora_B" if "A" in pair else "lora_A"
      raise CheckpointError(f"{checkpoint.where(next(iter(pair.values())))}: module {module!r} "
                            f"has no {missing} weight")
    a_shape, b_shape = checkpoint.shape(pair["A"]), checkpoint.shape(pair["B"])
    if a_shape[0] != rank or b_shape[1] != rank:
      raise CheckpointError(f"{checkpoint.where(pair['A'])}: tensor {pair['A']!r} has shape "
                            f"{a_shape} and {pair['B']!r} {b_shape}, but r={rank}")
    modules[module] = (pair["A"], pair["B"])
  if not modules:
    raise CheckpointError(f"{directory}: the adapter holds no LoRA weights")
  return Adapter(directory, rank, alpha, float(cfg.get("lora_dropout", 0.0)), scale, checkpoint,
                 modules)
