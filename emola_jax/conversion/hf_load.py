"""Loads Hugging Face checkpoints (LLaVA, CLIP vision, LLaMA) into our Flax modules, without torch.

The model is built abstractly (`nnx.eval_shape`), each parameter is read from the memory-mapped
safetensors and cast to `param_dtype`, and only parameters the checkpoint lacks by design (a
fresh prior projector, LoRA adapters) are initialised, by a jitted init whose unused outputs XLA
drops. Every checkpoint key must be used, and every parameter found, or the load fails naming the
file and key.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from emola_jax.conversion import hf_mapping, native
from emola_jax.conversion.safetensors_io import CheckpointError, SafetensorsCheckpoint
from emola_jax.model.clip import ClipVisionTower
from emola_jax.model.config import EmolaConfig, LoraConfig, TextConfig, VisionConfig
from emola_jax.model.emola import EmolaModel
from emola_jax.model.llama import LlamaForCausalLM

# Written beside the weights by our HF export; its fields restore the prior token.
PRIOR_PROJECTOR_FILE = "prior_projector"
EMOLA_CONFIG_KEY = "emola"


def read_json(path: str) -> dict[str, Any]:
  try:
    with open(path) as f:
      return json.load(f)
  except FileNotFoundError:
    raise CheckpointError(f"{path}: file not found") from None
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{path}: malformed JSON ({e})") from None


def open_safetensors(directory: str, prefix: str = "model") -> SafetensorsCheckpoint:
  """`SafetensorsCheckpoint`, whose error for a truncated file also names the tensors cut off."""
  try:
    return SafetensorsCheckpoint(directory, prefix)
  except CheckpointError as e:
    cut = _cut_tensors(directory, prefix)
    if not cut:
      raise
    raise CheckpointError(f"{e}; tensor(s) cut off: {cut[:3]}" +
                          (f" and {len(cut) - 3} more" if len(cut) > 3 else "") +
                          ". The file is incomplete: copy or download it again.") from None


def _cut_tensors(directory: str, prefix: str) -> list[str]:
  """The keys whose bytes lie past the end of their safetensors file (a truncated copy)."""
  index = os.path.join(directory, f"{prefix}.safetensors.index.json")
  try:
    with open(index) as f:
      files = sorted(set(json.load(f)["weight_map"].values()))
  except (OSError, ValueError, KeyError, AttributeError):
    files = [f"{prefix}.safetensors"]
  cut = []
  for name in files:
    try:
      path = os.path.join(directory, name)
      size = os.path.getsize(path)
      with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(header_len)) if header_len <= size - 8 else {}
    except (OSError, ValueError):
      continue
    cut += [key for key, info in header.items() if key != "__metadata__"
            and 8 + header_len + info["data_offsets"][1] > size]
  return cut


def vision_config_from_hf(v: dict[str, Any], select_layer: int = -2) -> VisionConfig:
  return VisionConfig(hidden_size=v["hidden_size"], intermediate_size=v["intermediate_size"],
                      num_layers=v["num_hidden_layers"], num_heads=v["num_attention_heads"],
                      image_size=v["image_size"], patch_size=v["patch_size"],
                      num_channels=v.get("num_channels", 3),
                      layer_norm_eps=v.get("layer_norm_eps", 1e-5),
                      hidden_act=v.get("hidden_act", "quick_gelu"), select_layer=select_layer)


def text_config_from_hf(t: dict[str, Any]) -> TextConfig:
  rope = t.get("rope_parameters") or {}
  theta = rope.get("rope_theta", t.get("rope_theta", 10000.0))
  scaling = t.get("rope_scaling")
  if scaling is None and rope.get("rope_type", "default") != "default":
    scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
  if t.get("hidden_act", "silu") != "silu":
    raise CheckpointError(f"text_config.hidden_act={t['hidden_act']!r}: LLaMA blocks use silu")
  return TextConfig(
      vocab_size=t["vocab_size"], hidden_size=t["hidden_size"],
      intermediate_size=t["intermediate_size"], num_layers=t["num_hidden_layers"],
      num_heads=t["num_attention_heads"],
      num_kv_heads=t.get("num_key_value_heads") or t["num_attention_heads"],
      head_dim=t.get("head_dim"), rms_norm_eps=t.get("rms_norm_eps", 1e-6), rope_theta=theta,
      rope_scaling=scaling, max_position_embeddings=t.get("max_position_embeddings", 4096),
      tie_word_embeddings=bool(t.get("tie_word_embeddings", False)),
      attention_bias=bool(t.get("attention_bias", False)), mlp_bias=bool(t.get("mlp_bias", False)),
      pad_token_id=t.get("pad_token_id") or 0, bos_token_id=t.get("bos_token_id", 1),
      eos_token_id=t.get("eos_token_id", 2))


def config_from_hf(hf: dict[str, Any], **overrides) -> EmolaConfig:
  """An EmolaConfig from a `transformers` LlavaConfig dict (plus our `emola` fields if present).

  Without `emola` fields the model is plain LLaVA (`prior_position="none"`); `overrides` (dotted
  names allowed, e.g. `prior_position="after"`) change any field.
  """
  if hf.get("model_type") != "llava":
    raise CheckpointError(f"model_type {hf.get('model_type')!r} is not 'llava'")
  layer = hf.get("vision_feature_layer", -2)
  if not isinstance(layer, int):
    raise CheckpointError(f"vision_feature_layer={layer!r}: only a single layer is supported")
  if hf.get("vision_feature_select_strategy", "default") != "default":
    raise CheckpointError("vision_feature_select_strategy must be 'default' (patch tokens, no CLS)")
  if hf.get("projector_hidden_act", "gelu") != "gelu" or not hf.get("multimodal_projector_bias",
                                                                     True):
    raise CheckpointError("only LLaVA-1.5's projector (Linear-GELU-Linear with biases) is supported")
  emola = hf.get(EMOLA_CONFIG_KEY, {})
  cfg = EmolaConfig(
      vision=vision_config_from_hf(hf["vision_config"], layer),
      text=text_config_from_hf(hf["text_config"]),
      projector_type="mlp2x_gelu",
      prior_position=emola.get("prior_position", "none"),
      prior_dim=emola.get("prior_dim", 212),
      image_token_index=hf.get("image_token_index", hf.get("image_token_id", 32000)))
  return cfg.replace(**overrides) if overrides else cfg


def aligned_empty(shape: tuple[int, ...], dtype) -> np.ndarray:
  """An uninitialised array on a 64-byte boundary: `jax.device_put` on CPU then adopts its
  memory instead of copying it, so a loaded parameter exists once."""
  dtype = np.dtype(dtype)
  nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
  buffer = np.empty(nbytes + 64, np.uint8)
  start = -buffer.ctypes.data % 64
  return buffer[start:start + nbytes].view(dtype).reshape(shape)


def read_tensor(checkpoint, key: str) -> np.ndarray:
  """The tensor `key` of a source, read into memory.

  Pages of a memory map count in the process's resident memory for as long as the map is open;
  reading a safetensors tensor with plain file I/O leaves them in the page cache instead, so a
  conversion never holds the checkpoint twice. Other sources are asked with `get`.
  """
  if not isinstance(checkpoint, SafetensorsCheckpoint):
    return checkpoint.get(key)
  path = checkpoint.where(key)
  lazy = checkpoint.get(key)  # checks dtype and size; a memmap slice reads no data
  out = np.empty(lazy.shape, lazy.dtype)
  start = checkpoint.files[os.path.basename(path)].header[key]["data_offsets"][0]
  with open(path, "rb") as f:
    data_start = 8 + int.from_bytes(f.read(8), "little")
    f.seek(data_start + start)
    if f.readinto(out.reshape(-1).view(np.uint8)) != out.nbytes:
      raise CheckpointError(f"{path}: tensor {key!r} is cut off (truncated file)")
  return out


def _read_param(row: hf_mapping.Row, shape: tuple[int, ...], dtype,
                sources: list[tuple[Any, hf_mapping.Layout]], used: list[set]):
  """The parameter `row` from the first source that has it, or None if none does."""
  for (checkpoint, layout), used_keys in zip(sources, used):
    key0 = layout.key(row, 0 if row.stacked else None)
    if key0 is None or key0 not in checkpoint:
      continue
    out = aligned_empty(shape, dtype)
    for i in range(shape[0]) if row.stacked else [None]:
      key = layout.key(row, i)
      if key not in checkpoint:
        raise CheckpointError(f"{checkpoint.directory}: missing tensor {key!r} (layer {i} of "
                              f"{shape[0]})")
      tensor = hf_mapping.to_ours(row, read_tensor(checkpoint, key))
      hf_mapping.check_shape(row, key, checkpoint.where(key), tensor.shape,
                             shape[1:] if row.stacked else shape)
      if row.stacked:
        out[i] = tensor
      else:
        out[...] = tensor
      used_keys.add(key)
    return out
  return None


def build_module(make_module, sources: list[tuple[Any, hf_mapping.Layout]], dtype, fresh_ok,
                 seed: int, allowed_unused=lambda key: False, host_arrays: bool = False):
  """Builds `make_module(rngs)` with its parameters read from `sources` (first match wins).

  A source is a `SafetensorsCheckpoint` or anything with its interface (`keys`, `in`, `get`,
  `where`, `directory`), e.g. `torch_bin.TorchCheckpoint`.
  Parameters no source holds must satisfy `fresh_ok(name)`; they are initialised from `seed`.
  Every source key must be used (or be an ignorable buffer / `allowed_unused`). `host_arrays`
  keeps the parameters read from `sources` as numpy arrays in host memory (see
  `load_pretrained`).
  """
  graphdef, state = nnx.split(nnx.eval_shape(lambda: make_module(nnx.Rngs(seed))))
  flat = dict(nnx.to_flat_state(state))
  used: list[set] = [set() for _ in sources]
  fresh = []
  for path, var in flat.items():
    name = ".".join(map(str, path))
    row = hf_mapping.BY_OURS.get(name)
    value = None if row is None else _read_param(row, tuple(var.shape), dtype, sources, used)
    if value is not None:
      # device_put adopts the aligned buffer on CPU.
      flat[path] = var.replace(value if host_arrays else jax.device_put(value))
    elif fresh_ok(name):
      fresh.append(path)
    else:
      expected = [layout.key(row, 0 if row.stacked else None) for _, layout in sources] if row else []
      raise CheckpointError(f"{', '.join(c.directory for c, _ in sources)}: no tensor for "
                            f"parameter {name} (looked for {[k for k in expected if k]})")
  for (checkpoint, _), used_keys in zip(sources, used):
    unused = [k for k in checkpoint.keys() if k not in used_keys
              and not k.endswith(hf_mapping.IGNORED_SUFFIXES) and not allowed_unused(k)]
    if unused:
      raise CheckpointError(f"{checkpoint.where(unused[0])}: unexpected tensor(s) that no "
                            f"parameter of this model config uses: {unused[:5]}"
                            + (f" and {len(unused) - 5} more" if len(unused) > 5 else ""))
  for path, value in native.init_subset(make_module, seed, set(fresh)).items():
    flat[path] = flat[path].replace(value)
  if fresh:
    logging.info("initialised fresh: %s", sorted(".".join(map(str, p)) for p in fresh))
  return nnx.merge(graphdef, nnx.from_flat_state(list(flat.items())))


def _is_fresh_ok(name: str) -> bool:
  return ".lora_" in name or name.startswith("prior_projector.")


def load_pretrained(path: str, *, vision_path: str | None = None, seed: int = 0,
                    host_arrays: bool = False, **overrides) -> tuple[nnx.Module, Any]:
  """Loads a `transformers` checkpoint directory; returns (model, config).

  `path` may hold a `LlavaForConditionalGeneration` (-> `EmolaModel`, `EmolaConfig`), a
  `CLIPVisionModel` (-> `ClipVisionTower`, `VisionConfig`) or a `LlamaForCausalLM`
  (-> `LlamaForCausalLM`, `TextConfig`), saved with `save_pretrained` as one or several safetensors
  files. For a LLaMA directory, `vision_path` (a CLIP directory) composes a full EmolaModel whose
  projectors start fresh, as for LLaVA stage-1 pre-training. `overrides` change model config
  fields (for LLaVA: e.g. `prior_position="after"`, `dtype="bfloat16"`, `lora={"rank": 8}`).
  `host_arrays`: the parameters read from the checkpoint stay numpy arrays in host memory, for a
  caller that places them on a mesh itself (the trainer: `mesh.place` copies each device's
  slices only), instead of landing whole on JAX's default device (a 7B model in fp32 would
  need 28 GB on one accelerator before being sharded).
  """
  hf = read_json(os.path.join(path, "config.json"))
  model_type = hf.get("model_type")
  checkpoint = open_safetensors(path)
  layout = hf_mapping.find_layout(checkpoint.keys())
  if model_type == "llava":
    cfg = config_from_hf(hf, **_lora_override(overrides))
    sources = [(checkpoint, layout)]
    prior_file = os.path.join(path, f"{PRIOR_PROJECTOR_FILE}.safetensors")
    declared = hf.get(EMOLA_CONFIG_KEY, {}).get("prior_position", "none") != "none"
    if cfg.has_prior and os.path.exists(prior_file):
      prior = open_safetensors(path, prefix=PRIOR_PROJECTOR_FILE)
      sources.append((prior, hf_mapping.find_layout(prior.keys())))
    elif cfg.has_prior and declared:
      # The checkpoint says it has a trained prior projector: never replace it by a fresh one.
      raise CheckpointError(f"{prior_file}: not found, but {path}/config.json declares a prior "
                            f"token ({EMOLA_CONFIG_KEY}.prior_position); copy the file or "
                            "re-export the checkpoint")
    model = build_module(lambda r: EmolaModel(cfg, rngs=r), sources, cfg.param_dtype,
                         _is_fresh_ok, seed, host_arrays=host_arrays)
    return model, cfg
  if model_type in ("clip_vision_model", "clip"):
    v = hf.get("vision_config", hf) if model_type == "clip" else hf
    vcfg = vision_config_from_hf(v, overrides.pop("select_layer", -2))
    dtype = overrides.pop("param_dtype", "float32")
    kwargs = _module_kwargs(overrides)
    model = build_module(lambda r: _Holder(vision_tower=ClipVisionTower(
                             vcfg, param_dtype=jnp.dtype(dtype), rngs=r, **kwargs)),
                         [(checkpoint, _only(layout, "vision"))], dtype, lambda _: False, seed,
                         allowed_unused=lambda k: k.startswith((
                             "text_model.", "visual_projection.", "text_projection.",
                             "logit_scale")), host_arrays=host_arrays)
    return model.vision_tower, vcfg
  if model_type == "llama":
    tcfg = text_config_from_hf(hf)
    if vision_path is not None:
      vision_hf = read_json(os.path.join(vision_path, "config.json"))
      v = vision_hf.get("vision_config", vision_hf)
      cfg = EmolaConfig(vision=vision_config_from_hf(v), text=tcfg).replace(
          **_lora_override(overrides))
      vision_ckpt = open_safetensors(vision_path)
      sources = [(checkpoint, _only(layout, "text", "lm_head")),
                 (vision_ckpt, _only(hf_mapping.find_layout(vision_ckpt.keys()), "vision"))]
      fresh = lambda name: _is_fresh_ok(name) or name.startswith("projector.")
      model = build_module(lambda r: EmolaModel(cfg, rngs=r), sources, cfg.param_dtype, fresh, seed,
                           host_arrays=host_arrays)
      return model, cfg
    lora = LoraConfig(**overrides.pop("lora", {}))
    dtype = overrides.pop("param_dtype", "float32")
    kwargs = _module_kwargs(overrides)
    model = build_module(lambda r: _Holder(language_model=LlamaForCausalLM(
                             tcfg, lora, param_dtype=jnp.dtype(dtype), rngs=r, **kwargs)),
                         [(checkpoint, _only(layout, "text", "lm_head"))], dtype,
                         lambda n: ".lora_" in n, seed, host_arrays=host_arrays)
    return model.language_model, tcfg
  raise CheckpointError(f"{path}/config.json: model_type {model_type!r} is not one of llava, "
                        "clip_vision_model, clip, llama")


class _Holder(nnx.Module):
  """Holds a part under its EmolaModel attribute name, so that it shares the table's paths."""

  def __init__(self, **parts: nnx.Module):
    for name, part in parts.items():
      setattr(self, name, part)


def _module_kwargs(overrides: dict[str, Any]) -> dict[str, Any]:
  kwargs = {k: overrides.pop(k) for k in ("scan_layers", "remat_policy", "attention_impl",
                                          "attention_query_block") if k in overrides}
  if "dtype" in overrides:
    kwargs["dtype"] = jnp.dtype(overrides.pop("dtype"))
  if overrides:
    raise TypeError(f"unknown options {sorted(overrides)}")
  return kwargs


def _lora_override(overrides: dict[str, Any]) -> dict[str, Any]:
  """Turns `lora={...}` into the dotted form `EmolaConfig.replace` takes."""
  overrides = dict(overrides)
  for k, v in overrides.pop("lora", {}).items():
    overrides[f"lora.{k}"] = tuple(v) if k == "targets" else v
  return overrides


def _only(layout: hf_mapping.Layout, *components: str) -> hf_mapping.Layout:
  """The layout restricted to some components (a CLIP or LLaMA directory read for one part)."""
  return hf_mapping.Layout({c: layout.prefixes.get(c) for c in components})


def hf_to_native(path: str, out_dir: str, **overrides) -> EmolaConfig:
  """Converts a `transformers` LLaVA directory into a native checkpoint (written atomically).

  The tokenizer and processor files of `path` are carried into the checkpoint's `tokenizer/`.
  `overrides` are `load_pretrained`'s (e.g. `param_dtype="bfloat16"`).
  """
  model_type = read_json(os.path.join(path, "config.json")).get("model_type")
  if model_type != "llava":
    raise CheckpointError(f"{path}/config.json: model_type {model_type!r}; a native checkpoint "
                          "holds a full LLaVA/EmoLA model (model_type 'llava')")
  model, config = load_pretrained(path, **overrides)
  with native.atomic_dir(out_dir) as tmp:
    native.save_native(model, tmp, compress=False)
    native.copy_tokenizer_files(path, os.path.join(tmp, native.TOKENIZER_DIR))
  return config
