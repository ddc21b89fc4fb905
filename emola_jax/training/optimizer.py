"""AdamW with per-group learning rates, warm-up + cosine schedule and gradient clipping.

Only trained parameters enter the optimizer at all, so frozen weights carry no Adam moments.
Groups with their own rate (EmoLA: the visual projector at 2e-5 against 1e-4 for the rest) get
their own AdamW through `optax.multi_transform`, on the same schedule shape.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import optax

from emola_jax.training.param_groups import group_of


def warmup_cosine(peak: float, total_steps: int, warmup_steps: int) -> Callable[[Any], Any]:
  """Linear warm-up from 0 to `peak`, then cosine to 0 at `total_steps` (HF's cosine schedule)."""
  if total_steps <= 0:
    raise ValueError(f"total_steps={total_steps} must be positive")
  warmup_steps = min(warmup_steps, total_steps)
  return optax.join_schedules(
      [optax.linear_schedule(0.0, peak, max(warmup_steps, 1)),
       optax.cosine_decay_schedule(peak, max(total_steps - warmup_steps, 1))],
      boundaries=[warmup_steps])


def warmup_steps_for(total_steps: int, warmup_ratio: float) -> int:
  """HF Trainer's rule: ceil(ratio * total)."""
  return math.ceil(warmup_ratio * total_steps)


def make_optimizer(params: dict[str, Any], *, lr: float, group_lrs: dict[str, float],
                   total_steps: int, warmup_ratio: float, weight_decay: float,
                   max_grad_norm: float, b1: float, b2: float, eps: float
                   ) -> tuple[optax.GradientTransformation, dict[str, Callable]]:
  """The optimizer over the trained `params` and the schedule of each group label."""
  warmup = warmup_steps_for(total_steps, warmup_ratio)
  labels = {k: (group_of(k) if group_of(k) in group_lrs else "default") for k in params}
  schedules = {name: warmup_cosine(rate, total_steps, warmup)
               for name, rate in {"default": lr, **group_lrs}.items()}
  transforms = {name: optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)
                for name, schedule in schedules.items()}
  used = set(labels.values())
  transforms = {k: v for k, v in transforms.items() if k in used}
  tx = optax.multi_transform(transforms, labels)
  if max_grad_norm > 0:
    tx = optax.chain(optax.clip_by_global_norm(max_grad_norm), tx)
  return tx, {k: v for k, v in schedules.items() if k in used}
