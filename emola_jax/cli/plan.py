"""`emola-plan --config=configs/NAME.py --devices=N [--config.mesh.fsdp=N ...]`: memory per device.

Compiles the train step ahead of time on abstract inputs (no parameter is allocated) for the
config's mesh over N devices (simulated CPU devices unless --devices=0 uses the real ones), and
prints per-device bytes of parameters, optimizer state, batch and XLA's temporaries (activations
and workspace) from the compiled executable's memory analysis, next to the ideal total / N.
"""

from __future__ import annotations

import json
import os
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                          lock_config=True)
_DEVICES = flags.DEFINE_integer("devices", 8, "Simulated CPU devices (0: the real devices).")
_STEPS = flags.DEFINE_integer("steps", 1000, "Schedule length (does not change memory).")
_JSON = flags.DEFINE_string("json", "", "Also write the figures to this JSON file.")
flags.mark_flags_as_required(["config"])

GIB = 1024 ** 3


def _per_device_bytes(tree) -> int:
  import jax  # pylint: disable=import-outside-toplevel
  total = 0
  for leaf in jax.tree.leaves(tree):
    shape = leaf.sharding.shard_shape(leaf.shape)
    total += int(__import__("math").prod(shape)) * leaf.dtype.itemsize
  return total


def plan(config) -> dict:
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from emola_jax.training import mesh as mesh_lib  # pylint: disable=import-outside-toplevel
  from emola_jax.training import trainer  # pylint: disable=import-outside-toplevel

  run = trainer.setup(config, _STEPS.value, abstract_only=True)
  cfg = run.cfg
  b, length, size = config.train.batch_size, config.data.max_length, cfg.vision.image_size
  sharding = mesh_lib.batch_sharding(run.mesh)
  batch = {"input_ids": ((b, length), jnp.int32), "attention_mask": ((b, length), jnp.int32),
           "loss_mask": ((b, length), jnp.float32),
           "pixel_values": ((b, 3, size, size), jnp.float32)}
  if cfg.has_prior:
    batch["prior"] = ((b, cfg.prior_dim), jnp.float32)
  batch = {k: jax.ShapeDtypeStruct(s, d, sharding=sharding) for k, (s, d) in batch.items()}
  with jax.set_mesh(run.mesh), trainer.logical.logical_axis_rules(run.rules):
    compiled = run.step_fn.lower(run.state, run.split.frozen, batch).compile()
  memory = compiled.memory_analysis()
  n = jax.device_count()
  figures = {
      "mesh": dict(run.mesh.shape), "devices": n, "global_batch": b, "max_length": length,
      "trainable_params": sum(int(v.size) for v in run.split.trainable.values()),
      "frozen_params": sum(int(v.size) for v in run.split.frozen.values()),
      "per_device": {
          "trainable_param_bytes": _per_device_bytes(run.state.params),
          "frozen_param_bytes": _per_device_bytes(run.split.frozen),
          "optimizer_bytes": _per_device_bytes(run.state.opt_state),
          "batch_bytes": _per_device_bytes(batch),
          "xla_argument_bytes": int(memory.argument_size_in_bytes),
          "xla_output_bytes": int(memory.output_size_in_bytes),
          "xla_alias_bytes": int(memory.alias_size_in_bytes),
          "xla_temp_bytes": int(memory.temp_size_in_bytes),
      },
  }
  per = figures["per_device"]
  state_total = (_per_device_bytes(jax.tree.leaves((run.state.params, run.split.frozen,
                                                    run.state.opt_state))))
  global_state = sum(int(v.size) * v.dtype.itemsize for v in jax.tree.leaves(
      (run.state.params, run.split.frozen, run.state.opt_state)))
  per["state_bytes"] = state_total
  per["ideal_state_bytes"] = global_state // n
  per["peak_estimate_bytes"] = (per["xla_argument_bytes"] + per["xla_output_bytes"]
                                - per["xla_alias_bytes"] + per["xla_temp_bytes"])
  return figures


def _print(figures: dict) -> None:
  per = figures["per_device"]
  print(f"mesh {figures['mesh']} on {figures['devices']} devices; global batch "
        f"{figures['global_batch']} x {figures['max_length']} tokens; trainable "
        f"{figures['trainable_params']:,}, frozen {figures['frozen_params']:,} parameters")
  print("| per device | GiB |\n|---|---|")
  for key in ("trainable_param_bytes", "frozen_param_bytes", "optimizer_bytes", "state_bytes",
              "ideal_state_bytes", "batch_bytes", "xla_temp_bytes", "peak_estimate_bytes"):
    print(f"| {key.replace('_bytes', '').replace('_', ' ')} | {per[key] / GIB:.3f} |")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  figures = plan(_CONFIG.value)
  _print(figures)
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump(figures, f, indent=2)


def _simulate_devices(argv: list[str]) -> None:
  """Devices must be simulated before JAX starts, so the flag is read from argv directly."""
  count = 8
  for arg in argv:
    if arg.startswith("--devices="):
      count = int(arg.split("=", 1)[1])
  if count > 0:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={count}")
    os.environ["JAX_PLATFORMS"] = "cpu"


def run():
  _simulate_devices(sys.argv)
  app.run(main)


if __name__ == "__main__":
  run()
