"""Logical axis names: how parameters and activations say which dimension they are.

The model names dimensions (`embed`, `mlp`, `heads`, ...); the experiment config maps those names
to mesh axes (`data`, `fsdp`, `tensor`) with `flax.core.spmd.logical_axis_rules`. Without rules or
without a mesh every constraint here is a no-op, so the same model runs unsharded on one device.
"""

from __future__ import annotations

from typing import Sequence

import jax
from flax.core import spmd as core_spmd
from jax.sharding import PartitionSpec

# Activation layouts used at block boundaries.
BATCH_LENGTH_EMBED = ("activation_batch", "activation_length", "activation_embed")
BATCH_LENGTH_VOCAB = ("activation_batch", "activation_length", "activation_vocab")

logical_axis_rules = core_spmd.logical_axis_rules


def logical_to_spec(axes: Sequence[str | None], rules=None) -> PartitionSpec:
  """Maps logical axis names to a mesh PartitionSpec with the given or the active rules.

  Names without a rule are replicated. A mesh axis is used at most once per array: a later
  dimension that maps to an axis already taken is replicated (e.g. `embed` and `mlp` both on
  `fsdp` shard only the first), so one rule set serves every parameter shape.
  """
  rules = core_spmd.get_logical_axis_rules() if rules is None else rules
  table = dict(rules)
  used: set[str] = set()
  spec = []
  for name in axes:
    target = table.get(name) if name is not None else None
    mesh_axes = () if target is None else ((target,) if isinstance(target, str) else tuple(target))
    mesh_axes = tuple(a for a in mesh_axes if a not in used)
    used.update(mesh_axes)
    spec.append(None if not mesh_axes else mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
  return PartitionSpec(*spec)


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
  """Applies a sharding constraint by logical names when a mesh and rules are active."""
  rules = core_spmd.get_logical_axis_rules()
  mesh = jax.sharding.get_abstract_mesh()
  if not rules or mesh is None or mesh.empty:
    return x
  return jax.lax.with_sharding_constraint(x, logical_to_spec(axes, rules))
