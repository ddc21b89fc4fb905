"""Runs the tiny config for a few steps on several meshes (in its own process: it needs
simulated CPU devices, set before JAX starts). Prints one JSON line of losses and specs."""

from __future__ import annotations

import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"

import jax  # pylint: disable=wrong-import-position
from ml_collections import config_flags  # pylint: disable=wrong-import-position

from emola_jax.training import experiment, trainer  # pylint: disable=wrong-import-position
from emola_jax.model import sharding as logical  # pylint: disable=wrong-import-position

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MESHES = {"single": (1, 1, 1), "data8": (8, 1, 1), "fsdp8": (1, 8, 1), "fsdp4_tp2": (1, 4, 2),
          "dp2_fsdp2_tp2": (2, 2, 2)}


def main(data_dir: str, tokenizer: str, steps: int) -> None:
  config = config_flags.config_flags._ConfigFileParser(name="config").parse(  # pylint: disable=protected-access
      f"{REPO}/configs/tiny.py")
  config.data.dir, config.data.tokenizer = data_dir, tokenizer
  config.model.text.vocab_size, config.model.image_token_index = 520, 519
  config.model.prior_dim = 12
  config.train.batch_size = 8
  config.model.scan_layers = True
  out = {}
  for name, (data, fsdp, tensor) in MESHES.items():
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = data, fsdp, tensor
    devices = jax.devices()[:data * fsdp * tensor]
    run = trainer.setup(config, steps, devices=devices)
    loader, _ = trainer.make_data(config, run.cfg, experiment.train_splits(config),
                                  batch_size=8, train=True, seed=config.train.seed)
    state, losses = run.state, []
    with jax.set_mesh(run.mesh), logical.logical_axis_rules(run.rules):
      for _ in range(steps):
        state, metrics = run.step_fn(state, run.split.frozen,
                                     trainer._model_batch(next(loader), run.cfg, run.mesh))  # pylint: disable=protected-access
        losses.append(float(metrics["loss"]))
    specs = {k: [list(a) if isinstance(a, tuple) else a for a in v.sharding.spec]
             for k, v in {**state.params, **run.split.frozen}.items()}
    opt_specs = sorted({str(x.sharding.spec) for x in jax.tree.leaves(state.opt_state)
                        if getattr(x, "ndim", 0) >= 2})
    out[name] = {"losses": losses, "specs": specs, "opt_specs": opt_specs}
  print("RESULT " + json.dumps(out))


if __name__ == "__main__":
  main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
