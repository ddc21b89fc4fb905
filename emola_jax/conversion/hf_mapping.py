"""The table between our parameter paths and Hugging Face / LLaVA checkpoint keys.

One row per parameter: our path (dots; `blocks` paths are stacked over layers), the key suffix in
the checkpoint (`{i}` = layer index), the component whose prefix it takes, and how the tensor is
laid out (`linear`: torch [out, in] vs our [in, out]; `conv`: CLIP's patch convolution vs our
linear map of flattened patches; `copy`). The prefixes of each component differ between
checkpoint layouts; `find_layout` detects them from the keys present.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable

import numpy as np

from emola_jax.conversion.safetensors_io import CheckpointError


@dataclasses.dataclass(frozen=True)
class Row:
  ours: str
  theirs: str
  component: str  # vision | projector | prior_projector | text | lm_head | lora
  kind: str  # linear | conv | copy

  @property
  def stacked(self) -> bool:
    return "{i}" in self.theirs


def _rows() -> list[Row]:
  rows = [
      Row("vision_tower.patch_embed.kernel", "embeddings.patch_embedding.weight", "vision", "conv"),
      Row("vision_tower.class_embedding", "embeddings.class_embedding", "vision", "copy"),
      Row("vision_tower.position_embedding", "embeddings.position_embedding.weight", "vision",
          "copy"),
  ]
  for ours, theirs in [("pre_norm", "pre_layrnorm"), ("post_norm", "post_layernorm")]:
    rows += [Row(f"vision_tower.{ours}.scale", f"{theirs}.weight", "vision", "copy"),
             Row(f"vision_tower.{ours}.bias", f"{theirs}.bias", "vision", "copy")]
  clip_layer = "encoder.layers.{i}."
  for ours, theirs in [("q_proj", "self_attn.q_proj"), ("k_proj", "self_attn.k_proj"),
                       ("v_proj", "self_attn.v_proj"), ("o_proj", "self_attn.out_proj"),
                       ("fc1", "mlp.fc1"), ("fc2", "mlp.fc2")]:
    rows += [Row(f"vision_tower.blocks.{ours}.kernel", f"{clip_layer}{theirs}.weight", "vision",
                 "linear"),
             Row(f"vision_tower.blocks.{ours}.bias", f"{clip_layer}{theirs}.bias", "vision",
                 "copy")]
  for ours, theirs in [("ln1", "layer_norm1"), ("ln2", "layer_norm2")]:
    rows += [Row(f"vision_tower.blocks.{ours}.scale", f"{clip_layer}{theirs}.weight", "vision",
                 "copy"),
             Row(f"vision_tower.blocks.{ours}.bias", f"{clip_layer}{theirs}.bias", "vision",
                 "copy")]
  for part in ("projector", "prior_projector"):
    for n in ("linear_1", "linear_2"):
      rows += [Row(f"{part}.{n}.kernel", f"{n}.weight", part, "linear"),
               Row(f"{part}.{n}.bias", f"{n}.bias", part, "copy")]
  rows += [Row("language_model.embed_tokens", "embed_tokens.weight", "text", "copy"),
           Row("language_model.norm.scale", "norm.weight", "text", "copy"),
           Row("language_model.lm_head", "lm_head.weight", "lm_head", "linear")]
  llama_layer = "layers.{i}."
  for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
    rows += [Row(f"language_model.blocks.{name}.kernel", f"{llama_layer}self_attn.{name}.weight",
                 "text", "linear"),
             Row(f"language_model.blocks.{name}.bias", f"{llama_layer}self_attn.{name}.bias",
                 "text", "copy")]
  for name in ("gate_proj", "up_proj", "down_proj"):
    rows += [Row(f"language_model.blocks.{name}.kernel", f"{llama_layer}mlp.{name}.weight",
                 "text", "linear"),
             Row(f"language_model.blocks.{name}.bias", f"{llama_layer}mlp.{name}.bias", "text",
                 "copy")]
  rows += [Row("language_model.blocks.input_norm.scale", f"{llama_layer}input_layernorm.weight",
               "text", "copy"),
           Row("language_model.blocks.post_attention_norm.scale",
               f"{llama_layer}post_attention_layernorm.weight", "text", "copy")]
  # LoRA adapters, named as PEFT names them under the decoder (A: [r, in], B: [out, r]). Only
  # adapter imports give this component a prefix; plain checkpoints have no LoRA.
  for name in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
    sub = "mlp" if name in ("gate_proj", "up_proj", "down_proj") else "self_attn"
    rows += [Row(f"language_model.blocks.{name}.lora_a", f"{llama_layer}{sub}.{name}.lora_A.weight",
                 "lora", "linear"),
             Row(f"language_model.blocks.{name}.lora_b", f"{llama_layer}{sub}.{name}.lora_B.weight",
                 "lora", "linear")]
  return rows


ROWS = _rows()
BY_OURS = {row.ours: row for row in ROWS}

# Candidate prefixes per component, most specific first. The anchor is a key every layout has.
PREFIXES = {
    "vision": ("model.vision_tower.vision_tower.vision_model.",  # original LLaVA release
               "model.vision_tower.vision_model.", "vision_tower.vision_model.",
               "model.vision_tower.", "vision_tower.", "vision_model.", ""),
    "text": ("model.language_model.", "language_model.model.", "model."),
    "projector": ("model.multi_modal_projector.", "multi_modal_projector.", "model.mm_projector."),
    "prior_projector": ("prior_projector.", "model.prior_projector."),
    "lm_head": ("language_model.", ""),
}
ANCHORS = {
    "vision": "embeddings.patch_embedding.weight",
    "text": "embed_tokens.weight",
    "projector": "linear_1.weight",
    "prior_projector": "linear_1.weight",
    "lm_head": "lm_head.weight",
}
# The original LLaVA projector is an nn.Sequential: Linear (0), GELU (1), Linear (2), or one Linear.
MM_PROJECTOR_NAMES = {"linear_1": "0", "linear_2": "2"}
# Buffers some checkpoints carry that hold no parameters.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq", "embeddings.position_ids")


@dataclasses.dataclass(frozen=True)
class Layout:
  """Where each component lives in one checkpoint; a component absent from it maps to None."""

  prefixes: dict[str, str | None]
  mm_projector_linear: bool = False  # original LLaVA with a single-Linear projector

  def key(self, row: Row, layer: int | None = None) -> str | None:
    prefix = self.prefixes.get(row.component)
    if prefix is None:
      return None
    suffix = row.theirs.format(i=layer) if row.stacked else row.theirs
    if prefix == "model.mm_projector.":
      name, leaf = suffix.split(".")
      if self.mm_projector_linear:
        return None if name == "linear_2" else f"{prefix}{leaf}"
      suffix = f"{MM_PROJECTOR_NAMES[name]}.{leaf}"
    return prefix + suffix


def find_layout(keys: Iterable[str]) -> Layout:
  keys = set(keys)
  prefixes: dict[str, str | None] = {}
  linear_mm = False
  for component, candidates in PREFIXES.items():
    prefixes[component] = None
    for prefix in candidates:
      anchor = ANCHORS[component]
      if prefix == "model.mm_projector.":
        if prefix + "0.weight" in keys:
          prefixes[component] = prefix
          break
        if prefix + "weight" in keys:
          prefixes[component], linear_mm = prefix, True
          break
      elif prefix + anchor in keys:
        prefixes[component] = prefix
        break
  return Layout(prefixes, linear_mm)


def to_ours(row: Row, tensor: np.ndarray) -> np.ndarray:
  """A checkpoint tensor in our layout."""
  if row.kind == "linear":
    return tensor.T
  if row.kind == "conv":
    return tensor.reshape(tensor.shape[0], -1).T
  return tensor


def to_theirs(row: Row, array: np.ndarray, patch_shape: tuple[int, int, int] | None = None):
  """Our tensor in the checkpoint's layout (`patch_shape` = (channels, p, p) for the conv)."""
  if row.kind == "linear":
    return array.T
  if row.kind == "conv":
    return array.T.reshape(array.shape[1], *patch_shape)
  return array


def check_shape(row: Row, key: str, where: str, got: tuple[int, ...],
                want: tuple[int, ...]) -> None:
  if tuple(got) != tuple(want):
    raise CheckpointError(f"{where}: tensor {key!r} has shape {tuple(got)}, but the model config "
                          f"needs {tuple(want)} for {row.ours}")
