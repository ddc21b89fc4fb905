"""Training checkpoints: Orbax `CheckpointManager`s for the train state and the data iterator.

`<workdir>/checkpoints/<step>/` holds `state` (step, trained parameters, optimizer state, RNG)
and `data` (the Grain iterator of every process), saved asynchronously and pruned to the last
`keep`. `<workdir>/best/<step>/` holds the trained parameters of the best evaluation so far.
Frozen parameters are not saved here: a run rebuilds them from `init_from` (or the seed), which
keeps a 7B LoRA checkpoint at the size of what trains.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from emola_jax.data import loader as loader_lib


class TrainCheckpoints:
  """Save / restore / prune of a run's checkpoints."""

  def __init__(self, workdir: str, *, keep: int, async_save: bool, best_metric: str,
               best_mode: str):
    workdir = os.path.abspath(workdir)
    self.manager = ocp.CheckpointManager(
        os.path.join(workdir, "checkpoints"),
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                             enable_async_checkpointing=async_save),
        item_names=("state", "data"))
    self.best_metric = best_metric
    self.best = (ocp.CheckpointManager(
        os.path.join(workdir, "best"),
        options=ocp.CheckpointManagerOptions(
            max_to_keep=1, create=True, best_fn=lambda m: m[best_metric], best_mode=best_mode,
            enable_async_checkpointing=async_save),
        item_names=("params",)) if best_metric else None)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, loader: loader_lib.LoaderIterator) -> None:
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=loader_lib.checkpoint_args(loader)))

  def restore(self, step: int, abstract_state: Any, loader: loader_lib.LoaderIterator) -> Any:
    """Restores the train state (onto the shardings of `abstract_state`) and the loader."""
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        data=loader_lib.checkpoint_args(loader, restore=True)))
    return restored.state

  def save_best(self, step: int, params: Any, metrics: dict[str, float]) -> None:
    if self.best is not None and self.best_metric in metrics:
      self.best.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(params)),
                     metrics={k: float(v) for k, v in metrics.items()})

  def wait(self) -> None:
    self.manager.wait_until_finished()
    if self.best is not None:
      self.best.wait_until_finished()

  def close(self) -> None:
    self.manager.close()
    if self.best is not None:
      self.best.close()


def abstract_of(tree: Any) -> Any:
  """ShapeDtypeStructs (with shardings) of a pytree of arrays: a restore target."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                     sharding=getattr(x, "sharding", None)), tree)
