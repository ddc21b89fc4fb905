"""The native emola-jax checkpoint: `config.json` + Orbax `params/` (+ optional `tokenizer/`).

Every command that takes a model (`emola-train --config.init_from`, `emola-infer`, `emola-eval`,
`emola-convert --to=hf`) reads this directory. Parameters are restored into an abstract model
built from the saved config, so nothing is allocated twice; `load_native(..., **overrides)` can
also change the config (add LoRA, a prior token, another dtype), keeping every saved parameter
whose path and shape still fit and initialising only the new ones. `ParamReader` reads one
parameter at a time (streaming conversions); writers go through `atomic_dir`, so a failed
conversion leaves no partial directory.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from absl import logging
from flax import nnx

from emola_jax.conversion.safetensors_io import CheckpointError
from emola_jax.model.config import EmolaConfig
from emola_jax.model.emola import EmolaModel

CONFIG_FILE = "config.json"
PARAMS_DIR = "params"
TOKENIZER_DIR = "tokenizer"
# Tokenizer and processor files of a `transformers` directory, carried through conversions.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json",
                   "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt",
                   "chat_template.json", "chat_template.jinja", "preprocessor_config.json",
                   "processor_config.json")


def is_native_checkpoint(path: str) -> bool:
  return (os.path.isfile(os.path.join(path, CONFIG_FILE))
          and os.path.isdir(os.path.join(path, PARAMS_DIR)))


def read_config(path: str) -> EmolaConfig:
  config_path = os.path.join(path, CONFIG_FILE)
  try:
    with open(config_path) as f:
      return EmolaConfig.from_json(f.read())
  except FileNotFoundError:
    raise CheckpointError(f"{config_path}: not found; is {path} an emola-jax checkpoint?") from None
  except ValueError as e:
    raise CheckpointError(f"{config_path}: {e}") from None


@contextlib.contextmanager
def atomic_dir(out_dir: str) -> Iterator[str]:
  """Yields an empty temporary directory beside `out_dir`, renamed to `out_dir` on success.

  A failed or interrupted conversion leaves no partial checkpoint behind: on any exception the
  temporary directory is removed. `out_dir` must not exist, or be an empty directory.
  """
  out_dir = os.path.abspath(out_dir)
  if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
    raise CheckpointError(f"{out_dir}: output exists and is not an empty directory; choose "
                          "another --output or remove it")
  parent = os.path.dirname(out_dir)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.partial-", dir=parent)
  try:
    yield tmp
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; a checkpoint is an ordinary directory
    os.rename(tmp, out_dir)  # POSIX rename replaces an empty directory
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def copy_tokenizer_files(src_dir: str, dst_dir: str) -> list[str]:
  """Copies the TOKENIZER_FILES present in `src_dir` into `dst_dir`; returns their names."""
  names = [n for n in TOKENIZER_FILES if os.path.isfile(os.path.join(src_dir, n))]
  if names:
    os.makedirs(dst_dir, exist_ok=True)
  for name in names:
    shutil.copyfile(os.path.join(src_dir, name), os.path.join(dst_dir, name))
  return names


def save_native(model: EmolaModel, out_dir: str, *, tokenizer_dir: str | None = None,
                compress: bool = True) -> None:
  """Writes `model` (its config, all its parameters, and a tokenizer copy if given).

  `compress=False` stores the arrays without zstd: Orbax's compression buffers hold about one more
  copy of the parameters while saving, and trained float weights shrink little. Conversions use
  it to stay near one copy of the checkpoint in memory; `load_native` reads both forms.
  """
  out_dir = os.path.abspath(out_dir)
  if os.path.exists(out_dir) and os.listdir(out_dir):
    raise CheckpointError(f"{out_dir}: output directory exists and is not empty")
  # Every process of a multi-host run takes part in the Orbax save (each writes its shards);
  # the small files are written by process 0 alone, after all have checked the folder.
  multihost_utils.sync_global_devices("emola_save_native_checked")
  main = jax.process_index() == 0
  if main:
    os.makedirs(out_dir, exist_ok=True)
  params = nnx.state(model, nnx.Param)
  if compress:
    with ocp.StandardCheckpointer() as checkpointer:
      checkpointer.save(os.path.join(out_dir, PARAMS_DIR), params)
      checkpointer.wait_until_finished()
  else:
    with ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_compression=False)) as checkpointer:
      checkpointer.save(os.path.join(out_dir, PARAMS_DIR), args=ocp.args.PyTreeSave(params))
  if main:
    if tokenizer_dir:
      shutil.copytree(tokenizer_dir, os.path.join(out_dir, TOKENIZER_DIR))
    with open(os.path.join(out_dir, CONFIG_FILE), "w") as f:
      f.write(model.config.to_json())
  multihost_utils.sync_global_devices("emola_save_native_done")


def init_subset(make_module: Callable[[nnx.Rngs], nnx.Module], seed: int,
                paths: set[tuple]) -> dict[tuple, jax.Array]:
  """Initialises only the parameters at `paths`: XLA drops the rest of the jitted init."""

  @jax.jit
  def init():
    module = make_module(nnx.Rngs(seed))
    return {p: v[...] for p, v in nnx.to_flat_state(nnx.state(module)) if p in paths}

  return init() if paths else {}


def load_native(path: str, *, seed: int = 0, host_arrays: bool = False,
                **overrides: Any) -> tuple[EmolaModel, EmolaConfig]:
  """Restores a native checkpoint; `overrides` (dotted names allowed) change the model config.

  `host_arrays`: the restored parameters stay numpy arrays in host memory (for a caller that
  places them on a mesh itself, e.g. the trainer: `mesh.place` copies each device's slices
  only), instead of landing whole on JAX's default device.
  """
  saved_config = read_config(path)
  params_dir = os.path.join(os.path.abspath(path), PARAMS_DIR)
  abstract = nnx.eval_shape(lambda: EmolaModel(saved_config, rngs=nnx.Rngs(0)))
  saved_abstract = nnx.state(abstract, nnx.Param)
  try:
    if host_arrays:
      restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray),
                                  saved_abstract)
      with ocp.PyTreeCheckpointer() as checkpointer:
        saved = checkpointer.restore(params_dir, args=ocp.args.PyTreeRestore(
            item=saved_abstract, restore_args=restore_args))
    else:
      with ocp.StandardCheckpointer() as checkpointer:
        saved = checkpointer.restore(params_dir, saved_abstract)
  except (FileNotFoundError, ValueError, KeyError) as e:
    raise CheckpointError(f"{params_dir}: cannot restore the parameters ({e})") from None
  config = saved_config.replace(**overrides) if overrides else saved_config
  if config == saved_config:
    graphdef, _, rest = nnx.split(nnx.eval_shape(lambda: EmolaModel(config, rngs=nnx.Rngs(0))),
                                  nnx.Param, ...)
    return nnx.merge(graphdef, saved, rest), config
  return transplant(dict(nnx.to_flat_state(saved)), config, seed=seed,
                    host_arrays=host_arrays), config


def transplant(params: dict[tuple, Any], config: EmolaConfig, *, seed: int = 0,
               host_arrays: bool = False) -> EmolaModel:
  """A model of `config` holding `params` where path and shape fit; the rest initialised fresh.

  Values are cast to the config's `param_dtype` (kept as host numpy arrays with `host_arrays`).
  A saved parameter the new config has no place for (e.g. a prior projector when
  `prior_position="none"`) is an error, never silently dropped.
  """
  make = lambda rngs: EmolaModel(config, rngs=rngs)
  graphdef, state = nnx.split(nnx.eval_shape(lambda: make(nnx.Rngs(seed))))
  flat = dict(nnx.to_flat_state(state))
  dtype = jnp.dtype(config.param_dtype)
  dropped = [p for p in params if p not in flat]
  if dropped:
    raise CheckpointError(f"the new model config has no place for saved parameter(s) "
                          f"{['.'.join(map(str, p)) for p in dropped[:5]]}")
  fresh = set()
  for path, var in flat.items():
    if path in params:
      value = params[path]
      value = value[...] if isinstance(value, nnx.Variable) else value
      if tuple(value.shape) != tuple(var.shape):
        raise CheckpointError(f"saved parameter {'.'.join(map(str, path))} has shape "
                              f"{tuple(value.shape)}, the model config needs {tuple(var.shape)}")
      flat[path] = var.replace((np.asarray if host_arrays else jnp.asarray)(value, dtype))
    elif isinstance(var, nnx.Param):
      fresh.add(path)
  for path, value in init_subset(make, seed, fresh).items():
    flat[path] = flat[path].replace(value)
  if fresh:
    logging.info("initialised fresh: %s", sorted(".".join(map(str, p)) for p in fresh))
  return nnx.merge(graphdef, nnx.from_flat_state(list(flat.items())))


class ParamReader:
  """Reads a native checkpoint's parameters one at a time (Orbax partial restore), on the CPU.

  For streaming conversions: only the parameters asked for are in memory, never the whole tree.
  Use as a context manager, or call `close()`.
  """

  def __init__(self, path: str):
    self.config = read_config(path)
    self.params_dir = os.path.join(os.path.abspath(path), PARAMS_DIR)
    if not os.path.isdir(self.params_dir):
      raise CheckpointError(f"{self.params_dir}: not found; is {path} an emola-jax checkpoint?")
    abstract = nnx.eval_shape(lambda: EmolaModel(self.config, rngs=nnx.Rngs(0)))
    self.abstract = dict(nnx.to_flat_state(nnx.state(abstract, nnx.Param)))
    self._sharding = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
    self._checkpointer = ocp.Checkpointer(ocp.PyTreeCheckpointHandler())

  def shapes(self) -> dict[tuple, tuple[int, ...]]:
    return {p: tuple(v.shape) for p, v in self.abstract.items()}

  def read(self, path: tuple) -> jax.Array:
    """The parameter at `path` (a flat-state path) as a CPU array."""
    item = nnx.from_flat_state([(path, self.abstract[path])])
    restore_args = jax.tree.map(lambda _: ocp.ArrayRestoreArgs(sharding=self._sharding), item)
    try:
      restored = self._checkpointer.restore(self.params_dir, args=ocp.args.PyTreeRestore(
          item, restore_args=restore_args, partial_restore=True))
    except (FileNotFoundError, ValueError, KeyError) as e:
      raise CheckpointError(f"{self.params_dir}: cannot restore parameter "
                            f"{'.'.join(map(str, path))} ({e})") from None
    (leaf,) = jax.tree.leaves(restored)
    return leaf

  def close(self) -> None:
    self._checkpointer.close()

  def __enter__(self) -> ParamReader:
    return self

  def __exit__(self, *exc) -> None:
    self.close()
