"""Imports the reference EmoLA release (a LoRA folder over LLaVA-1.5) into our model.

The release directory (`--input`) holds:
  - `adapter_config.json` + `adapter_model.safetensors|.bin`: a PEFT LoRA adapter on the decoder
    (keys `base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight`, ...);
  - `non_lora_trainables.bin`: the other trained tensors, named like the PEFT-wrapped model
    (`base_model.model.model.mm_projector.0.weight`, ...); they replace the base's tensors of the
    same name. Optional (a release that did not train the projector has none);
  - `landmark_feature_projector.bin`: the prior projector, an `nn.Sequential` Linear(212 -> 4096),
    GELU, Linear(4096 -> 4096). Accepted key names: `0.weight`, `0.bias`, `2.weight`, `2.bias`
    (the module's own state dict), the same after any prefix ending in
    `landmark_feature_projector.` (e.g. `model.landmark_feature_projector.0.weight`, or
    `base_model.model.model.landmark_feature_projector.0.weight` as a PEFT-wrapped model names
    it), or `linear_1.*` / `linear_2.*` for 0 / 2. The same tensors may also appear in
    `non_lora_trainables.bin`; they must then be equal.
The base (`--base`) is LLaVA-1.5 in the original layout: a flat LLaMA `config.json` with the `mm_*`
fields, weights `model.layers.*`, `model.embed_tokens.weight`, `model.norm.weight`,
`lm_head.weight`, `model.mm_projector.{0,2}.*` (or a single-Linear `model.mm_projector.*`), and
possibly the vision tower `model.vision_tower.vision_tower.vision_model.*`, in safetensors or
`.bin` files (sharded or not). The vision tower's config (and its weights when the base lacks
them) come from `vision_dir`, else from `mm_vision_tower` when that is a local directory, else
(config only) from the known CLIP names below.

`merge_lora=True` merges W += (alpha / r) * B @ A into the base weights; otherwise the adapter is
kept as our model's LoRA parameters (rank, alpha, dropout and targets from the adapter), so that
training can continue. `.bin` files are read with `torch.load(weights_only=True)` only.
"""

from __future__ import annotations

import os
import re
from typing import Any

import numpy as np
from absl import logging

from emola_jax.conversion import hf_load, hf_mapping, lora_merge, native, torch_bin
from emola_jax.conversion.safetensors_io import CheckpointError
from emola_jax.model import presets
from emola_jax.model.config import EmolaConfig, LoraConfig, VisionConfig
from emola_jax.model.emola import EmolaModel
from emola_jax.model.llama import LORA_TARGETS

NON_LORA_FILE = "non_lora_trainables"
LANDMARK_FILE = "landmark_feature_projector"
VISION_PREFIX = "model.vision_tower.vision_tower.vision_model."  # where the original layout has it
PRIOR_PREFIX = "prior_projector."
# Vision towers named by `mm_vision_tower` whose geometry is known without their config.json.
KNOWN_VISION_TOWERS = {
    "openai/clip-vit-large-patch14-336": presets.CLIP_L14_336,
    "openai/clip-vit-large-patch14": {**presets.CLIP_L14_336, "image_size": 224},
}
_VISION_PARTS = ("embeddings.", "pre_layrnorm.", "encoder.", "post_layernorm.")
_LANDMARK_KEY = re.compile(
    r"(?:.*landmark_feature_projector\.)?(0|2|linear_1|linear_2)\.(weight|bias)")
_DECODER_MODULE = re.compile(r"model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)")


class Overlay:
  """Tensors of several sources under one set of names; where two hold a name, the first wins.

  Each part is (source, {name here: name in the source}). `where` names the file, and the key in
  it when that differs, so that errors point at the tensor as the file spells it.
  """

  def __init__(self, parts: list[tuple[Any, dict[str, str]]]):
    self._map: dict[str, tuple[Any, str]] = {}
    for source, names in parts:
      for name, key in names.items():
        self._map.setdefault(name, (source, key))
    self.directory = ", ".join(dict.fromkeys(s.directory for s, _ in parts))

  def keys(self) -> list[str]:
    return list(self._map)

  def __contains__(self, key: str) -> bool:
    return key in self._map

  def get(self, key: str) -> np.ndarray:
    if key not in self._map:
      raise CheckpointError(f"{self.directory}: no tensor named {key!r}")
    source, name = self._map[key]
    return source.get(name)

  def shape(self, key: str) -> tuple[int, ...]:
    return tuple(self.get(key).shape)

  def where(self, key: str) -> str:
    source, name = self._map[key]
    return source.where(name) + (f" (key {name!r})" if name != key else "")


class MergedLora:
  """A source whose adapted weights come out as W + scale * B @ A (float32), one at a time."""

  def __init__(self, source, adapter: lora_merge.Adapter, targets: dict[str, str]):
    self.source, self.adapter, self.targets = source, adapter, targets
    self.directory = source.directory

  def keys(self) -> list[str]:
    return self.source.keys()

  def __contains__(self, key: str) -> bool:
    return key in self.source

  def get(self, key: str) -> np.ndarray:
    weight = self.source.get(key)
    if key not in self.targets:
      return weight
    delta = self.adapter.delta(self.targets[key])
    if delta.shape != weight.shape:
      a_key = self.adapter.modules[self.targets[key]][0]
      raise CheckpointError(f"{self.adapter.checkpoint.where(a_key)}: LoRA of {a_key!r} gives a "
                            f"{delta.shape} update, but {self.source.where(key)} has shape "
                            f"{weight.shape}")
    return np.asarray(weight, np.float32) + delta

  def shape(self, key: str) -> tuple[int, ...]:
    return self.source.shape(key)

  def where(self, key: str) -> str:
    return self.source.where(key)


def open_weights(directory: str, *, what: str):
  """The weights of a `transformers`-style directory: safetensors, else PyTorch `.bin`."""
  if any(os.path.exists(os.path.join(directory, f))
         for f in ("model.safetensors", "model.safetensors.index.json")):
    return hf_load.open_safetensors(directory)
  if any(os.path.exists(os.path.join(directory, f))
         for f in ("pytorch_model.bin", "pytorch_model.bin.index.json")):
    return torch_bin.TorchCheckpoint(directory)
  raise CheckpointError(f"{directory}: no model.safetensors(.index.json) or "
                        f"pytorch_model.bin(.index.json) for the {what}")


def _open_file(directory: str, prefix: str):
  """`{prefix}.safetensors` or `{prefix}.bin` in `directory`, or None if neither exists."""
  if os.path.exists(os.path.join(directory, f"{prefix}.safetensors")):
    return hf_load.open_safetensors(directory, prefix=prefix)
  if os.path.exists(os.path.join(directory, f"{prefix}.bin")):
    return torch_bin.TorchCheckpoint(directory, prefix=prefix)
  return None


def _reference_name(key: str) -> str | None:
  """A release key in the base's naming: PEFT prefix dropped, the landmark projector renamed."""
  key = key.removeprefix(lora_merge.PEFT_PREFIX)
  if "landmark_feature_projector." in key:
    return _landmark_name(key)
  return key


def _landmark_name(key: str) -> str | None:
  match = _LANDMARK_KEY.fullmatch(key)
  if match is None:
    return None
  layer = {"0": "linear_1", "2": "linear_2"}.get(match[1], match[1])
  return f"{PRIOR_PREFIX}{layer}.{match[2]}"


def _vision_config(base_cfg: dict[str, Any], vision_dir: str | None, select_layer: int,
                   base_dir: str) -> tuple[VisionConfig, str | None]:
  """The vision tower's config and the directory to read its weights from (if any)."""
  tower = base_cfg.get("mm_vision_tower") or base_cfg.get("vision_tower")
  candidates = [vision_dir] if vision_dir else []
  if isinstance(tower, str) and os.path.isfile(os.path.join(tower, "config.json")):
    candidates.append(tower)
  for directory in candidates:
    cfg = hf_load.read_json(os.path.join(directory, "config.json"))
    v = cfg.get("vision_config", cfg) if cfg.get("model_type") == "clip" else cfg
    if v.get("model_type", "clip_vision_model") != "clip_vision_model":
      raise CheckpointError(f"{directory}/config.json: not a CLIP (vision) model")
    return hf_load.vision_config_from_hf(v, select_layer), directory
  if tower in KNOWN_VISION_TOWERS:
    return VisionConfig(**{**KNOWN_VISION_TOWERS[tower], "select_layer": select_layer}), None
  raise CheckpointError(f"{base_dir}/config.json: mm_vision_tower={tower!r} is neither a local "
                        "directory nor a known CLIP model; pass --vision=DIR (a CLIP directory "
                        "with config.json)")


def _vision_names(directory: str) -> tuple[Any, dict[str, str]]:
  """A CLIP directory's vision-tower tensors, renamed into the original LLaVA layout."""
  checkpoint = open_weights(directory, what="vision tower")
  prefix = hf_mapping.find_layout(checkpoint.keys()).prefixes.get("vision")
  if prefix is None:
    raise CheckpointError(f"{directory}: no CLIP vision tower weights (looked for "
                          f"'...embeddings.patch_embedding.weight')")
  names = {VISION_PREFIX + k[len(prefix):]: k for k in checkpoint.keys()
           if k.startswith(prefix) and k[len(prefix):].startswith(_VISION_PARTS)}
  return checkpoint, names


def import_reference(release_dir: str, base_dir: str, *, vision_dir: str | None = None,
                     merge_lora: bool = False, prior_position: str = "after",
                     param_dtype: str = "float32", seed: int = 0) -> tuple[EmolaModel, EmolaConfig]:
  """Builds our model from the reference release over its base; returns (model, config)."""
  base_cfg = hf_load.read_json(os.path.join(base_dir, "config.json"))
  if "text_config" in base_cfg:
    raise CheckpointError(f"{base_dir}/config.json: a transformers LLaVA config, not the original "
                          "layout; convert it with --from=hf")
  if base_cfg.get("mm_vision_select_feature", "patch") != "patch":
    raise CheckpointError(f"{base_dir}/config.json: mm_vision_select_feature="
                          f"{base_cfg['mm_vision_select_feature']!r}; only 'patch' is supported")
  if base_cfg.get("mm_use_im_start_end") or base_cfg.get("mm_use_im_patch_token"):
    logging.warning("%s/config.json uses image start/end or patch tokens; EmoLA's prompts do not",
                    base_dir)
  select_layer = int(base_cfg.get("mm_vision_select_layer", -2))
  vision_cfg, vision_source = _vision_config(base_cfg, vision_dir, select_layer, base_dir)
  base = open_weights(base_dir, what="base LLaVA")
  adapter = lora_merge.read_adapter(release_dir)

  parts: list[tuple[Any, dict[str, str]]] = []
  prior: dict[str, tuple[Any, str]] = {}
  landmark = _open_file(release_dir, LANDMARK_FILE)
  if landmark is not None:
    names = {}
    for key in landmark.keys():
      name = _landmark_name(key)
      if name is None:
        raise CheckpointError(f"{landmark.where(key)}: unexpected tensor {key!r}; expected "
                              "0.weight, 0.bias, 2.weight, 2.bias of the prior projector "
                              "(optionally after a '...landmark_feature_projector.' prefix)")
      if name in names:
        raise CheckpointError(f"{landmark.where(key)}: {key!r} and {names[name]!r} are both the "
                              f"prior projector's {name}")
      names[name] = key
      prior[name] = (landmark, key)
    parts.append((landmark, names))
  non_lora = _open_file(release_dir, NON_LORA_FILE)
  if non_lora is not None:
    names = {}
    for key in non_lora.keys():
      name = _reference_name(key)
      if name is None:
        raise CheckpointError(f"{non_lora.where(key)}: unexpected tensor {key!r}")
      if name in prior:
        other, other_key = prior[name]
        if not np.array_equal(non_lora.get(key), other.get(other_key)):
          raise CheckpointError(f"{non_lora.where(key)}: tensor {key!r} differs from "
                                f"{other.where(other_key)}; which prior projector is meant is "
                                "ambiguous")
      names[name] = key
    parts.append((non_lora, names))
  else:
    logging.info("%s has no %s.bin: the base's projector is used", release_dir, NON_LORA_FILE)
  if vision_dir:
    parts.append(_vision_names(vision_dir))
    if any(k.startswith(VISION_PREFIX) for k in base.keys()):
      logging.warning("the vision tower comes from --vision=%s; the base's copy is not used",
                      vision_dir)
  parts.append((base, {k: k for k in base.keys()}))
  if not any(k.startswith(VISION_PREFIX) for k in base.keys()) and not vision_dir:
    if vision_source is None:
      raise CheckpointError(f"{base_dir}: holds no vision tower weights ({VISION_PREFIX}*); pass "
                            "--vision=DIR (the CLIP directory named by mm_vision_tower)")
    parts.append(_vision_names(vision_source))
  overlay = Overlay(parts)

  has_prior = f"{PRIOR_PREFIX}linear_1.weight" in overlay
  if prior_position != "none" and not has_prior:
    raise CheckpointError(f"{release_dir}: no {LANDMARK_FILE}.bin (the prior projector); pass "
                          "--prior_position=none to import plain LLaVA")
  if prior_position == "none" and has_prior:
    raise CheckpointError(f"{release_dir}: holds a trained prior projector, which "
                          "--prior_position=none would drop")
  prior_dim = overlay.shape(f"{PRIOR_PREFIX}linear_1.weight")[1] if has_prior else 212

  lora = LoraConfig()
  layout = hf_mapping.find_layout(overlay.keys())
  if merge_lora:
    targets = {}
    for module, (a_key, _) in adapter.modules.items():
      name = _reference_name(f"{module}.weight")
      if name is None or name not in overlay:
        raise CheckpointError(f"{adapter.checkpoint.where(a_key)}: LoRA on {module!r}, but the "
                              f"base has no weight {name or module + '.weight'!r} to merge it into")
      targets[name] = module
    source = MergedLora(overlay, adapter, targets)
    logging.info("merging LoRA (r=%d, scale %g) into %d weights", adapter.rank, adapter.scale,
                 len(targets))
  else:
    names, kinds = {}, set()
    for module, (a_key, b_key) in adapter.modules.items():
      match = _DECODER_MODULE.fullmatch(module)
      if match is None or match[3] not in LORA_TARGETS:
        raise CheckpointError(f"{adapter.checkpoint.where(a_key)}: LoRA on {module!r} cannot be "
                              "kept as trainable LoRA (our model has it on decoder projections "
                              "only); pass --merge_lora")
      names[f"{module}.lora_A.weight"], names[f"{module}.lora_B.weight"] = a_key, b_key
      kinds.add(match[3])
    overlay = Overlay([(adapter.checkpoint, names), (overlay, {k: k for k in overlay.keys()})])
    source = overlay
    layout = hf_mapping.Layout({**layout.prefixes, "lora": layout.prefixes["text"]},
                               layout.mm_projector_linear)
    # Our LoRA scale is alpha / rank; rsLoRA's alpha / sqrt(rank) is kept by rescaling alpha.
    lora = LoraConfig(rank=adapter.rank, alpha=adapter.scale * adapter.rank,
                      dropout=adapter.dropout,
                      targets=tuple(t for t in LORA_TARGETS if t in kinds))

  text_cfg = hf_load.text_config_from_hf(base_cfg)
  try:
    config = EmolaConfig(
        vision=vision_cfg, text=text_cfg, lora=lora,
        projector_type=base_cfg.get("mm_projector_type", "linear"),
        prior_position=prior_position, prior_dim=prior_dim,
        # LLaVA marks images with -200, outside the vocabulary; we use the first id past it.
        image_token_index=int(base_cfg.get("image_token_index", text_cfg.vocab_size)),
        param_dtype=param_dtype)
  except ValueError as e:
    raise CheckpointError(f"{base_dir}/config.json: {e}") from None
  if base_cfg.get("mm_hidden_size", vision_cfg.hidden_size) != vision_cfg.hidden_size:
    raise CheckpointError(f"{base_dir}/config.json: mm_hidden_size={base_cfg['mm_hidden_size']} "
                          f"but the vision tower has width {vision_cfg.hidden_size}")
  model = hf_load.build_module(lambda r: EmolaModel(config, rngs=r), [(source, layout)],
                               param_dtype, lambda name: False, seed)
  return model, config


def reference_to_native(release_dir: str, base_dir: str, out_dir: str, **kwargs) -> EmolaConfig:
  """`import_reference`, saved as a native checkpoint (atomically) with the base's tokenizer."""
  model, config = import_reference(release_dir, base_dir, **kwargs)
  with native.atomic_dir(out_dir) as tmp:
    native.save_native(model, tmp, compress=False)
    tokenizer = os.path.join(tmp, native.TOKENIZER_DIR)
    if not native.copy_tokenizer_files(release_dir, tokenizer):
      native.copy_tokenizer_files(base_dir, tokenizer)
  return config
