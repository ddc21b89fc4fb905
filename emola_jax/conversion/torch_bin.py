"""Reads PyTorch `.bin` state dicts safely, with the interface of `SafetensorsCheckpoint`.

`torch.load` runs with `weights_only=True`, so a file that pickles anything other than tensors and
plain containers is refused instead of executed. Files in the zip format are memory-mapped
(`mmap=True`): a tensor costs memory only while it is used. Tensors come out as numpy arrays
(bf16 through ml_dtypes).
"""

from __future__ import annotations

import json
import os
import pickle

import ml_dtypes
import numpy as np

from emola_jax.conversion.safetensors_io import CheckpointError


def load_state_dict(path: str) -> dict[str, np.ndarray]:
  """The tensors of one `.bin` file as numpy arrays (memory-mapped where possible)."""
  import torch  # pylint: disable=import-outside-toplevel  (torch is an optional dependency)

  if not os.path.isfile(path):
    raise CheckpointError(f"{path}: file not found")
  try:
    try:
      state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as e:
      if "mmap can only be used" not in str(e):
        raise
      # The legacy (pre-zip) format cannot be memory-mapped; it is read whole.
      state = torch.load(path, map_location="cpu", weights_only=True)
  except pickle.UnpicklingError as e:
    # torch's message is long advice; keep the line that says what was found.
    lines = [l.strip() for l in str(e).splitlines() if l.strip()] or [type(e).__name__]
    first = next((l for l in lines if "Unsupported" in l), lines[0]).split(". Please")[0][:200]
    raise CheckpointError(
        f"{path}: refused: the file pickles objects other than tensors, which are never "
        f"unpickled (torch.load weights_only=True): {first}. Re-save it as a plain state dict "
        "of tensors.") from None
  except (RuntimeError, EOFError, ValueError, OSError) as e:
    raise CheckpointError(f"{path}: cannot read: the file is truncated or not a PyTorch "
                          f"checkpoint ({str(e).splitlines()[0][:200]})") from None
  if not isinstance(state, dict):
    raise CheckpointError(f"{path}: holds a {type(state).__name__}, not a state dict of tensors")
  out = {}
  for key, tensor in state.items():
    if not isinstance(tensor, torch.Tensor):
      raise CheckpointError(f"{path}: entry {key!r} is a {type(tensor).__name__}, not a tensor")
    out[key] = _to_numpy(tensor)
  return out


def _to_numpy(tensor) -> np.ndarray:
  import torch  # pylint: disable=import-outside-toplevel

  tensor = tensor.detach()
  if tensor.dtype == torch.bfloat16:
    # numpy has no bf16; reinterpret the bits (no copy) as ml_dtypes.bfloat16.
    return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
  return tensor.numpy()


class TorchCheckpoint:
  """All tensors of `{prefix}.bin`, or of the shards listed in `{prefix}.bin.index.json`."""

  def __init__(self, directory: str, prefix: str = "pytorch_model"):
    self.directory = directory
    index = os.path.join(directory, f"{prefix}.bin.index.json")
    single = os.path.join(directory, f"{prefix}.bin")
    if os.path.exists(index):
      try:
        with open(index) as f:
          self.weight_map = dict(json.load(f)["weight_map"])
      except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index}: malformed index file ({e})") from None
      files = sorted(set(self.weight_map.values()))
      missing = [f for f in files if not os.path.exists(os.path.join(directory, f))]
      if missing:
        raise CheckpointError(f"{index} lists shard(s) that are missing from {directory}: "
                              f"{missing}")
    elif os.path.exists(single):
      files, self.weight_map = [os.path.basename(single)], None
    else:
      raise CheckpointError(f"{directory}: no {prefix}.bin or {prefix}.bin.index.json")
    self.tensors: dict[str, np.ndarray] = {}
    where = {}
    for name in files:
      path = os.path.join(directory, name)
      try:
        state = load_state_dict(path)
      except CheckpointError as e:
        listed = [k for k, v in (self.weight_map or {}).items() if v == name]
        raise CheckpointError(f"{e}" + (f"; the index assigns it {listed[:3]}"
                                        + (f" and {len(listed) - 3} more" if len(listed) > 3
                                           else "") if listed else "")) from None
      for key, value in state.items():
        self.tensors[key] = value
        where[key] = name
    if self.weight_map is None:
      self.weight_map = where
    for key, name in self.weight_map.items():
      if where.get(key) != name:
        raise CheckpointError(f"{os.path.join(directory, name)}: the index says it holds "
                              f"{key!r}, but it does not")
    extra = [k for k in where if k not in self.weight_map]
    if extra:
      raise CheckpointError(f"{os.path.join(directory, where[extra[0]])}: holds {extra[:3]}, "
                            f"which {index} does not list")

  def keys(self) -> list[str]:
    return list(self.weight_map)

  def __contains__(self, key: str) -> bool:
    return key in self.weight_map

  def shape(self, key: str) -> tuple[int, ...]:
    return tuple(self.get(key).shape)

  def get(self, key: str) -> np.ndarray:
    if key not in self.tensors:
      raise CheckpointError(f"{self.directory}: no tensor named {key!r}")
    return self.tensors[key]

  def where(self, key: str) -> str:
    return os.path.join(self.directory, self.weight_map[key])
