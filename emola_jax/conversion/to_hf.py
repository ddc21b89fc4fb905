"""Exports a model to a Hugging Face LLaVA directory that `transformers` loads without warnings.

The directory holds `config.json` (a `LlavaConfig`, plus an `emola` entry with the prior-token
fields when the model has one), the weights under the key names `save_pretrained` writes
(`model.safetensors`, or `model-0000i-of-0000n.safetensors` shards and
`model.safetensors.index.json` above `max_shard_size`), the tokenizer files of the checkpoint, and,
for EmoLA models, `prior_projector.safetensors`:

  prior_projector.linear_1.weight  [hidden, prior_dim]   (torch layout [out, in])
  prior_projector.linear_1.bias    [hidden]
  prior_projector.linear_2.weight  [hidden, hidden]
  prior_projector.linear_2.bias    [hidden]

with the safetensors metadata {"format": "pt", "prior_position": ..., "prior_dim": ...}.
`transformers.LlavaForConditionalGeneration` ignores that file (plain LLaVA without the prior
token); `emola_jax.torch_emola.EmolaForConditionalGeneration` and `load_pretrained` read it.
LoRA adapters have no place in a LLaVA checkpoint, so they are merged: W + (alpha/r) * A @ B.
Tensors are produced and written one at a time, and `native_to_hf` restores one parameter at a
time, so a conversion holds a few parameters in memory, not a second copy of the model.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any, Callable

import ml_dtypes
import numpy as np
from absl import logging
from flax import nnx

from emola_jax.conversion import hf_load, hf_mapping, native
from emola_jax.conversion.safetensors_io import INDEX_FILE, SINGLE_FILE, CheckpointError, write_file
from emola_jax.model.config import EmolaConfig
from emola_jax.model.emola import EmolaModel

# The prefixes `LlavaForConditionalGeneration.save_pretrained` writes (transformers 5).
EXPORT_LAYOUT = hf_mapping.Layout({
    "vision": "vision_tower.", "projector": "multi_modal_projector.",
    "text": "language_model.model.", "lm_head": "language_model.",
    "prior_projector": "prior_projector.",
})
DEFAULT_MAX_SHARD_SIZE = "5GB"
NUMPY_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16),
                "float16": np.dtype(np.float16)}
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str | int) -> int:
  """Bytes from an int or a string like "5GB", "500MB", "2GiB" (HF convention: GB = 10^9)."""
  if isinstance(text, int):
    return text
  match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", text.upper())
  if not match or match.group(2) not in _UNITS:
    raise ValueError(f"size {text!r}: use a number of bytes or e.g. 5GB, 500MB, 2GiB")
  return int(float(match.group(1)) * _UNITS[match.group(2)])


@dataclasses.dataclass
class LazyTensor:
  """A tensor described by shape and dtype, produced only when written.

  `write_file` reads `.shape`, `.dtype` and `.size` for the header and converts each tensor with
  `np.ascontiguousarray` while streaming the data, so at most one produced tensor is alive.
  """

  shape: tuple[int, ...]
  dtype: np.dtype
  make: Callable[[], np.ndarray]

  @property
  def size(self) -> int:
    return int(np.prod(self.shape, dtype=np.int64))

  @property
  def nbytes(self) -> int:
    return self.size * self.dtype.itemsize

  def __array__(self, dtype=None, copy=None):
    array = np.asarray(self.make(), self.dtype)
    if array.shape != self.shape:
      raise CheckpointError(f"internal error: produced shape {array.shape}, expected {self.shape}")
    return array if dtype is None else array.astype(dtype)


def hf_config(config: EmolaConfig, dtype: str) -> dict[str, Any]:
  """The `config.json` dict of a `LlavaConfig` describing `config` (plus the `emola` fields)."""
  import transformers  # pylint: disable=import-outside-toplevel  (configs only, no torch needed)

  t, v = config.text, config.vision
  rope = dict(config.text.rope_scaling or {"rope_type": "default"})
  if "type" in rope and "rope_type" not in rope:
    rope["rope_type"] = rope.pop("type")
  rope["rope_theta"] = t.rope_theta
  text = transformers.LlamaConfig(
      vocab_size=t.vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
      num_hidden_layers=t.num_layers, num_attention_heads=t.num_heads,
      num_key_value_heads=t.num_kv_heads, head_dim=t.resolved_head_dim,
      rms_norm_eps=t.rms_norm_eps, rope_parameters=rope,
      max_position_embeddings=t.max_position_embeddings,
      tie_word_embeddings=t.tie_word_embeddings, attention_bias=t.attention_bias,
      mlp_bias=t.mlp_bias, pad_token_id=t.pad_token_id, bos_token_id=t.bos_token_id,
      eos_token_id=t.eos_token_id)
  vision = transformers.CLIPVisionConfig(
      hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
      num_hidden_layers=v.num_layers, num_attention_heads=v.num_heads, image_size=v.image_size,
      patch_size=v.patch_size, num_channels=v.num_channels, layer_norm_eps=v.layer_norm_eps,
      hidden_act=v.hidden_act)
  if config.projector_type != "mlp2x_gelu":
    raise CheckpointError(f"projector_type={config.projector_type!r}: transformers' LLaVA has only "
                          "the mlp2x_gelu projector")
  llava = transformers.LlavaConfig(
      vision_config=vision, text_config=text, image_token_index=config.image_token_index,
      image_seq_length=v.num_patches, projector_hidden_act="gelu",
      vision_feature_select_strategy="default", vision_feature_layer=v.select_layer,
      multimodal_projector_bias=True, tie_word_embeddings=t.tie_word_embeddings,
      architectures=["LlavaForConditionalGeneration"], dtype=dtype)
  out = llava.to_diff_dict()
  if config.has_prior:
    out[hf_load.EMOLA_CONFIG_KEY] = {"prior_position": config.prior_position,
                                     "prior_dim": config.prior_dim}
  return out


class _Params:
  """Parameters by dotted name, fetched on demand; the last few stay cached.

  A stacked parameter is written as one tensor per layer, and a LoRA kernel needs its A and B:
  the small cache makes each parameter fetched once when the tensors are written in order.
  """

  def __init__(self, shapes: dict[str, tuple[int, ...]], fetch: Callable[[str], Any],
               cache_size: int = 3):
    self.shapes, self._fetch, self._size = shapes, fetch, cache_size
    self._cache: dict[str, np.ndarray] = {}

  def __contains__(self, name: str) -> bool:
    return name in self.shapes

  def get(self, name: str) -> np.ndarray:
    if name not in self._cache:
      if len(self._cache) >= self._size:
        del self._cache[next(iter(self._cache))]
      # On CPU np.asarray views the array's buffer: no copy.
      self._cache[name] = np.asarray(self._fetch(name))
    return self._cache[name]


def _entries(params: _Params, config: EmolaConfig,
             dtype: np.dtype) -> list[tuple[str, str, LazyTensor]]:
  """(component, key, tensor) for every parameter, LoRA merged into its kernel.

  Parameter-major order (all layers of one parameter, then the next), so that a streamed
  parameter is fetched once; `transformers` reads the shards in any order.
  """
  patch = (config.vision.num_channels, config.vision.patch_size, config.vision.patch_size)
  components = ("vision", "projector", "text", "lm_head", "prior_projector")
  entries = []
  for name, shape in params.shapes.items():
    if ".lora_" in name:
      continue  # merged into the kernel below
    row = hf_mapping.BY_OURS.get(name)
    if row is None:
      raise CheckpointError(f"parameter {name} has no Hugging Face name in the conversion table")
    owner = name.rsplit(".", 1)[0]
    lora = (f"{owner}.lora_a", f"{owner}.lora_b") if f"{owner}.lora_a" in params else None
    for layer in range(shape[0]) if row.stacked else [None]:
      make = _maker(params, row, name, layer, lora, config.lora.scale, patch)
      entries.append((row.component, EXPORT_LAYOUT.key(row, layer), LazyTensor(
          theirs_shape(row, shape[1:] if row.stacked else shape, patch), dtype, make)))
  entries.sort(key=lambda e: components.index(e[0]))  # stable: parameter order kept within
  return entries


def theirs_shape(row: hf_mapping.Row, shape: tuple[int, ...],
                 patch: tuple[int, int, int]) -> tuple[int, ...]:
  """The checkpoint-layout shape of one (per-layer) tensor of ours."""
  if row.kind == "linear":
    return tuple(reversed(shape))
  if row.kind == "conv":
    return (shape[1], *patch)
  return tuple(shape)


def _maker(params: _Params, row, name, layer, lora, scale, patch) -> Callable[[], np.ndarray]:
  def pick(n):
    x = params.get(n)
    return x if layer is None else x[layer]

  def make():
    value = pick(name)
    if lora is not None:
      a, b = (pick(n).astype(np.float32) for n in lora)
      value = value.astype(np.float32) + scale * (a @ b)
    return hf_mapping.to_theirs(row, value, patch)
  return make


def write_sharded(out_dir: str, tensors: list[tuple[str, LazyTensor]], max_shard_size: int,
                  metadata: dict[str, str] | None = None) -> list[str]:
  """Writes `model.safetensors`, or shards plus the index when the total exceeds the limit."""
  metadata = {"format": "pt", **(metadata or {})}
  total = sum(t.nbytes for _, t in tensors)
  shards: list[list[tuple[str, LazyTensor]]] = [[]]
  size = 0
  for key, tensor in tensors:
    if shards[-1] and size + tensor.nbytes > max_shard_size:
      shards.append([])
      size = 0
    shards[-1].append((key, tensor))
    size += tensor.nbytes
  if len(shards) == 1:
    write_file(os.path.join(out_dir, SINGLE_FILE), shards[0], metadata)
    return [SINGLE_FILE]
  names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
  weight_map = {}
  for name, shard in zip(names, shards):
    write_file(os.path.join(out_dir, name), shard, metadata)
    weight_map.update({key: name for key, _ in shard})
  with open(os.path.join(out_dir, INDEX_FILE), "w") as f:
    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
  return names


def export_model(model: EmolaModel, out_dir: str, *, tokenizer_dir: str | None = None,
                 max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
                 dtype: str | None = None) -> None:
  """Writes `model` as a Hugging Face LLaVA directory into `out_dir` (an existing empty dir)."""
  flat = {".".join(map(str, p)): v for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  params = _Params({n: tuple(v.shape) for n, v in flat.items()}, lambda n: flat[n][...])
  _export(params, model.config, out_dir, tokenizer_dir, max_shard_size, dtype)


def _export(params: _Params, config: EmolaConfig, out_dir: str, tokenizer_dir: str | None,
            max_shard_size: int | str, dtype: str | None) -> None:
  dtype = dtype or config.param_dtype
  if dtype not in NUMPY_DTYPES:
    raise ValueError(f"dtype {dtype!r} is not one of {sorted(NUMPY_DTYPES)}")
  entries = _entries(params, config, NUMPY_DTYPES[dtype])
  main = [(k, t) for c, k, t in entries if c != "prior_projector"]
  prior = [(k, t) for c, k, t in entries if c == "prior_projector"]
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    json.dump(hf_config(config, dtype), f, indent=2, sort_keys=True)
  files = write_sharded(out_dir, main, parse_size(max_shard_size))
  if prior:
    write_file(os.path.join(out_dir, f"{hf_load.PRIOR_PROJECTOR_FILE}.safetensors"), prior,
               {"format": "pt", "prior_position": config.prior_position,
                "prior_dim": str(config.prior_dim)})
  copied = native.copy_tokenizer_files(tokenizer_dir, out_dir) if tokenizer_dir else []
  if config.lora.rank:
    logging.info("merged LoRA (rank %d, scale %g) into %s", config.lora.rank, config.lora.scale,
                 ", ".join(config.lora.targets))
  logging.info("wrote %s%s%s", ", ".join(files), " + prior projector" if prior else "",
               f" + tokenizer files {copied}" if copied else "")


def native_to_hf(native_dir: str, out_dir: str, *, max_shard_size: int | str =
                 DEFAULT_MAX_SHARD_SIZE, dtype: str | None = None) -> None:
  """Converts a native checkpoint into a new Hugging Face directory (written atomically).

  Parameters are restored one at a time and written as they come, so memory holds a few
  parameters, not the model.
  """
  parse_size(max_shard_size)
  tokenizer_dir = os.path.join(native_dir, native.TOKENIZER_DIR)
  with native.ParamReader(native_dir) as reader:
    names = {".".join(map(str, p)): p for p in reader.abstract}
    params = _Params({n: tuple(reader.abstract[p].shape) for n, p in names.items()},
                     lambda n: reader.read(names[n]))
    with native.atomic_dir(out_dir) as tmp:
      _export(params, reader.config, tmp,
              tokenizer_dir if os.path.isdir(tokenizer_dir) else None, max_shard_size, dtype)
