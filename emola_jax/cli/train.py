"""`emola-train --config=configs/NAME.py --workdir=DIR [--config.KEY=VALUE ...]`.

Trains (or resumes, if DIR already holds checkpoints) one stage: projector pre-training,
instruction tuning or EmoLA LoRA tuning, as the config file says.
"""

from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file (configs/*.py[:arg]); override fields with "
    "--config.KEY=VALUE.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run folder: checkpoints, metrics.jsonl, "
                               "tensorboard/, final/. An existing one is resumed.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "Multi-process runs: HOST:PORT of process 0. Without it, SLURM "
    "jobs of several tasks are detected (and anything JAX detects with --auto_distributed); "
    "otherwise one process runs.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Multi-process runs: process count.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "Multi-process runs: this process's id.")
_AUTO_DISTRIBUTED = flags.DEFINE_bool(
    "auto_distributed", False, "Join a multi-host run whose layout JAX detects itself (Cloud TPU "
    "VM pods, GKE, SLURM); launch/tpu_pod.sh sets it.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from emola_jax.training import distributed  # pylint: disable=import-outside-toplevel
  distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                         auto=_AUTO_DISTRIBUTED.value)
  from emola_jax.training import trainer  # pylint: disable=import-outside-toplevel
  if logging.get_verbosity() == logging.INFO:  # absl's default: keep the console readable
    logging.set_verbosity(logging.WARNING)
  try:
    trainer.train(_CONFIG.value, _WORKDIR.value)
  except (trainer.NonFiniteLossError, ValueError) as e:
    # Errors of the run's own making (bad flags, data, a diverged loss): the message alone;
    # --verbosity=1 shows the traceback too.
    if logging.get_verbosity() >= logging.DEBUG:
      raise
    sys.exit(f"emola-train: {e}")


def _bad_override(argv: list[str]) -> str | None:
  """The first `--config.a.b=v` whose path is not a field of the config file, explained."""
  config_arg = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
  if config_arg is None:
    return None
  config = config_flags.config_flags._ConfigFileParser(name="config").parse(config_arg)  # pylint: disable=protected-access
  for arg in argv:
    if not arg.startswith("--config."):
      continue
    path = arg[len("--config."):].split("=", 1)[0]
    node = config
    for i, part in enumerate(path.split(".")):
      if not hasattr(node, "keys") or part not in node:
        known = sorted(node.keys()) if hasattr(node, "keys") else []
        where = ".".join(path.split(".")[:i]) or "(top level)"
        return (f"--config.{path}: {config_arg} has no field {part!r} under {where}; "
                f"fields there: {known}")
      node = node[part]
  return None


def _parse_flags(argv: list[str]) -> list[str]:
  try:
    return flags.FLAGS(argv)
  except (AttributeError, KeyError) as e:
    problem = _bad_override(argv)
    sys.exit(f"emola-train: {problem or e}")


def run():
  app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
  run()
