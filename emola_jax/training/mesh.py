"""Device mesh and shardings from the experiment config.

`config.mesh` names the axis sizes (`data`, `fsdp`, `tensor`; -1 takes the remaining devices) and
`config.sharding_rules` maps the model's logical axis names onto them. One rule set serves every
preset: an axis of size 1 shards nothing, so pure data parallelism is `data=-1`, FSDP (ZeRO-3) is
`fsdp=-1` and FSDP + tensor parallelism is `fsdp=-1, tensor=T`. Parameters are placed with these
shardings as they are created or loaded, never gathered whole on one device.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import numpy as np
from absl import logging
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from emola_jax.model import sharding as logical

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# logical name -> mesh axes. Batch rows go over data and fsdp (each fsdp shard sees its own rows
# and gathers the weights it needs); weights' embedding dimension is split over fsdp; heads,
# MLP width and vocabulary over tensor.
RULES = {
    "fsdp_tp": (("activation_batch", BATCH_AXES), ("activation_length", None),
                ("activation_embed", None), ("activation_vocab", "tensor"),
                ("embed", "fsdp"), ("mlp", "tensor"), ("heads", "tensor"), ("kv", "tensor"),
                ("vocab", "tensor"), ("layers", None), ("norm", None), ("patch", None),
                ("positions", None), ("prior", None)),
}
RULES["fsdp"] = RULES["fsdp_tp"]  # with tensor=1 the tensor entries are no-ops
RULES["dp"] = tuple((name, BATCH_AXES if name == "activation_batch" else None)
                    for name, _ in RULES["fsdp_tp"])


def rules_from_config(config) -> tuple[tuple[str, Any], ...]:
  """`config.sharding_rules`: a preset name (`dp`, `fsdp`, `fsdp_tp`) or explicit pairs."""
  rules = config.sharding_rules
  if isinstance(rules, str):
    if rules not in RULES:
      raise ValueError(f"--config.sharding_rules={rules!r}: use one of {sorted(RULES)} or a "
                       "list of (logical name, mesh axis) pairs")
    return RULES[rules]
  return tuple((name, tuple(axes) if isinstance(axes, list) else axes) for name, axes in rules)


def mesh_shape(config, num_devices: int) -> tuple[int, ...]:
  sizes = [int(config.mesh[a]) for a in MESH_AXES]
  unknown = [a for a, s in zip(MESH_AXES, sizes) if s == -1]
  if len(unknown) > 1:
    raise ValueError(f"--config.mesh: only one axis may be -1, got {unknown}")
  known = math.prod(s for s in sizes if s != -1)
  if unknown:
    if num_devices % known:
      raise ValueError(f"--config.mesh: {num_devices} devices are not divisible by {known}")
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ValueError(f"--config.mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} "
                     f"devices, but {num_devices} are available")
  return tuple(sizes)


def make_mesh(config, devices=None) -> jax.sharding.Mesh:
  devices = jax.devices() if devices is None else devices
  shape = mesh_shape(config, len(devices))
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                       devices=devices)


def spec_for(shape: tuple[int, ...], axes: tuple[str | None, ...] | None, mesh, rules
             ) -> PartitionSpec:
  """The spec of one parameter: its logical axes through the rules; an indivisible dim is
  replicated. A parameter the rules leave off `fsdp` (e.g. LoRA B, whose output dimension maps
  to `tensor`) is split over `fsdp` along its largest free divisible dimension, as ZeRO-3 splits
  every parameter."""
  axes = tuple(axes) if axes else (None,) * len(shape)
  spec = list(logical.logical_to_spec(axes, rules))
  for i, entry in enumerate(spec):
    if entry is None:
      continue
    # Axes of size 1 shard nothing; leaving them out keeps specs readable.
    kept = tuple(a for a in ((entry,) if isinstance(entry, str) else entry) if mesh.shape[a] > 1)
    entry = spec[i] = None if not kept else kept[0] if len(kept) == 1 else kept
    if entry is None:
      continue
    size = math.prod(mesh.shape[a] for a in kept)
    if shape[i] % size:
      logging.warning("dimension %d (%s, size %d) of a %s array is not divisible by %s=%d: "
                      "replicated", i, axes[i], shape[i], shape, entry, size)
      spec[i] = None
  fsdp = mesh.shape.get("fsdp", 1)
  used = {a for e in spec if e for a in ((e,) if isinstance(e, str) else e)}
  if fsdp > 1 and "fsdp" not in used:
    free = [i for i, e in enumerate(spec)
            if e is None and axes[i] != "layers" and shape[i] % fsdp == 0]
    if free:
      spec[max(free, key=lambda i: shape[i])] = "fsdp"
  return PartitionSpec(*spec)


def param_shardings(abstract_state: nnx.State, mesh, rules) -> dict[str, NamedSharding]:
  """Sharding of each parameter (dotted path -> NamedSharding) from its logical axis names."""
  out = {}
  for path, var in nnx.to_flat_state(abstract_state):
    axes = var.get_metadata().get("out_sharding")
    out[".".join(map(str, path))] = NamedSharding(mesh, spec_for(tuple(var.shape), axes, mesh,
                                                                 rules))
  return out


def place(values: dict[str, Any], shardings: dict[str, NamedSharding]) -> dict[str, jax.Array]:
  """Host arrays -> global arrays; each process reads only the slices its devices hold."""
  out = {}
  for k, v in values.items():
    if isinstance(v, jax.Array) and v.sharding == shardings[k]:
      out[k] = v
      continue
    host = v if isinstance(v, np.ndarray) else np.asarray(v)
    out[k] = jax.make_array_from_callback(host.shape, shardings[k], lambda idx, h=host: h[idx])
  return out


def init_sharded(make_module: Callable[[nnx.Rngs], nnx.Module], seed: int,
                 shardings: dict[str, NamedSharding]) -> dict[str, jax.Array]:
  """Initialises every parameter directly into its sharding (a jitted init, `out_shardings`)."""

  def init():
    state = nnx.state(make_module(nnx.Rngs(seed)))
    return {".".join(map(str, p)): v[...] for p, v in nnx.to_flat_state(state)}

  return jax.jit(init, out_shardings=shardings)()


def batch_sharding(mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def global_batch(local: dict[str, np.ndarray], mesh) -> dict[str, jax.Array]:
  """This process's rows -> arrays over the whole mesh (rows split over data x fsdp)."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}
