"""A stack of identical blocks stored with a leading `layers` axis, run by scan or by a loop.

The parameter layout is the same whether or not the stack is scanned, so checkpoints do not
depend on `scan_layers`; `jax.lax.scan` keeps compile time flat in depth, and the remat policy
decides what the backward pass recomputes.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
from flax import nnx

REMAT = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def create_stack(make_block: Callable[[nnx.Rngs], nnx.Module], num: int,
                 rngs: nnx.Rngs) -> nnx.Module:
  """Creates `num` blocks whose parameters are stacked on a leading `layers` axis."""

  @nnx.split_rngs(splits=num)
  @nnx.vmap(in_axes=(0,), out_axes=0, axis_size=num,
            transform_metadata={nnx.PARTITION_NAME: "layers"})
  def create(rngs):
    return make_block(rngs)

  return create(rngs)


def unstack(blocks: nnx.Module, num: int) -> list[nnx.Module]:
  """The first `num` blocks as separate modules, each holding its own slice of the weights.

  This copies the weights once (eagerly, or once per call inside `jit`). A loop that runs the
  stack many times (token-by-token decoding) then reads them in place, where slicing the stacked
  weights in the loop body would copy every layer's weights on every iteration.
  """
  graphdef, state = nnx.split(blocks)
  return [nnx.merge(graphdef, jax.tree.map(lambda p, i=i: p[i], state)) for i in range(num)]


def run_stack(blocks: nnx.Module | list[nnx.Module], carry: Any, xs: Any, body: Callable, *,
              num: int, scan: bool, remat_policy: str) -> tuple[Any, Any]:
  """Runs the first `num` blocks: `body(block, carry, x_i) -> (carry, y_i)`; returns (carry, ys).

  `blocks`: the stacked blocks, or the list `unstack` made (run one after the other, no remat:
  for loops without gradients).
  `xs` holds per-layer inputs with a leading axis of at least `num` (or None).
  """
  if isinstance(blocks, list):
    ys = []
    for i, block in enumerate(blocks[:num]):
      carry, y = body(block, carry, None if xs is None else jax.tree.map(lambda x: x[i], xs))
      ys.append(y)
    return carry, _stack_outputs(ys)
  graphdef, state = nnx.split(blocks)
  state = jax.tree.map(lambda p: p[:num], state)
  if xs is not None:
    xs = jax.tree.map(lambda x: x[:num], xs)

  def step(carry, layer):
    layer_state, x = layer
    return body(nnx.merge(graphdef, layer_state), carry, x)

  if remat_policy != "none":
    step = jax.checkpoint(step, policy=REMAT[remat_policy], prevent_cse=not scan)
  if scan:
    return jax.lax.scan(step, carry, (state, xs))
  ys = []
  for i in range(num):
    carry, y = step(carry, jax.tree.map(lambda a: a[i], (state, xs)))
    ys.append(y)
  return carry, _stack_outputs(ys)


def _stack_outputs(ys: list[Any]) -> Any:
  return None if not ys or ys[0] is None else jax.tree.map(lambda *a: jax.numpy.stack(a), *ys)
