"""Which parameters train, and with which learning rate.

Every parameter belongs to one group by its path: `vision` (CLIP), `projector` (visual
projector), `prior_projector`, `lora` (adapters in the decoder) and `llm` (the decoder's own
weights, embeddings and head). A run trains a set of groups, named by a preset or listed with
commas (`--config.train.trainable=lora,projector`); each trained group may have its own learning
rate. Parameters are kept in flat dicts keyed by dotted paths so that jitted functions and Orbax
see plain pytrees.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
from flax import nnx

GROUPS = ("vision", "projector", "prior_projector", "lora", "llm")

TRAINABLE_PRESETS = {
    # LLaVA-1.5 stage 1: the visual projector alone.
    "projector": ("projector",),
    # LLaVA-1.5 stage 2: projector and the full language model.
    "projector_llm": ("projector", "llm"),
    # EmoLA: LoRA on the decoder, both projectors; CLIP and base LLM frozen.
    "emola": ("lora", "projector", "prior_projector"),
    # Ablations of the paper (Sec. 4.4).
    "prior_only": ("prior_projector",),
    "lora_and_projector_only": ("lora", "projector"),
    "all": GROUPS,
}


def group_of(path: str) -> str:
  """The group of a dotted parameter path."""
  head = path.split(".", 1)[0]
  if head == "vision_tower":
    return "vision"
  if head in ("projector", "prior_projector"):
    return head
  if head == "language_model":
    return "lora" if ".lora_" in path else "llm"
  raise ValueError(f"parameter {path!r} belongs to no group of {GROUPS}")


def parse_trainable(spec: str) -> tuple[str, ...]:
  """A preset name or a comma-separated list of groups -> the trained groups."""
  if spec in TRAINABLE_PRESETS:
    return TRAINABLE_PRESETS[spec]
  groups = tuple(g.strip() for g in spec.split(",") if g.strip())
  unknown = [g for g in groups if g not in GROUPS]
  if unknown or not groups:
    raise ValueError(f"train.trainable={spec!r}: use a preset {sorted(TRAINABLE_PRESETS)} or a "
                     f"comma-separated list of groups {list(GROUPS)}")
  return groups


def to_flat(state: nnx.State) -> dict[str, Any]:
  return {".".join(map(str, p)): v for p, v in nnx.to_flat_state(state)}


@dataclasses.dataclass
class SplitModel:
  """A model cut into (graph, trainable params, frozen params), and glued back inside jit."""

  graphdef: Any
  templates: dict[str, nnx.Variable]  # one Variable per parameter path, for its type and metadata
  trainable: dict[str, jax.Array]
  frozen: dict[str, jax.Array]

  @classmethod
  def from_model(cls, model: nnx.Module, groups: tuple[str, ...],
                 values: dict[str, Any] | None = None) -> SplitModel:
    """Splits `model` (concrete, or abstract with the parameter `values` given separately)."""
    graphdef, state = nnx.split(model)
    flat = to_flat(state)
    values = {k: v[...] for k, v in flat.items()} if values is None else values
    trainable = {k: values[k] for k in flat if group_of(k) in groups}
    frozen = {k: values[k] for k in flat if group_of(k) not in groups}
    if not trainable:
      raise ValueError(f"no parameter of this model belongs to the trained groups {groups} "
                       "(LoRA groups need model.lora.rank > 0; prior_projector needs "
                       "model.prior_position != 'none')")
    templates = {k: v.replace(jax.ShapeDtypeStruct(v.shape, v.dtype)) for k, v in flat.items()}
    return cls(graphdef, templates, trainable, frozen)

  def merge(self, trainable: dict[str, jax.Array], frozen: dict[str, jax.Array]) -> nnx.Module:
    values = {**frozen, **trainable}
    state = nnx.from_flat_state([(tuple(_path_key(p) for p in k.split(".")),
                                  self.templates[k].replace(values[k])) for k in self.templates])
    return nnx.merge(self.graphdef, state)


def _path_key(part: str):
  return int(part) if part.isdigit() else part


def count(params: dict[str, Any]) -> int:
  return sum(int(v.size) for v in params.values())


def counts_by_group(params: dict[str, Any]) -> dict[str, int]:
  out: dict[str, int] = {}
  for k, v in params.items():
    out[group_of(k)] = out.get(group_of(k), 0) + int(v.size)
  return out
