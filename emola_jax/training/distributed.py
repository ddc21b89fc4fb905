"""Joining a multi-process (multi-host) JAX run, before any device is touched.

Every process of a run executes the same program (JAX's multi-controller model):
`jax.distributed.initialize` connects them through the coordinator (process 0). The address,
count and id come from flags, or are detected on Cloud TPU pods and under SLURM by JAX itself.
`EMOLA_CPU_DEVICES=K` makes each process expose K simulated CPU devices that talk over gloo,
which is how multi-host runs are tested on one machine.
"""

from __future__ import annotations

import os

import jax

CPU_DEVICES_ENV = "EMOLA_CPU_DEVICES"


def _slurm_multi_task() -> bool:
  return "SLURM_JOB_ID" in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1


def initialize(coordinator_address: str | None, num_processes: int | None,
               process_id: int | None, auto: bool = False) -> None:
  """Joins the run. `auto`: let JAX detect the cluster (Cloud TPU VMs via their metadata
  server, GKE, SLURM, ...); `launch/tpu_pod.sh` passes it on every worker."""
  cpu_devices = os.environ.get(CPU_DEVICES_ENV)
  if cpu_devices:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={int(cpu_devices)}")
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  given = [coordinator_address, num_processes, process_id]
  if any(v is not None for v in given):
    if any(v is None for v in given):
      raise ValueError("--coordinator_address, --num_processes and --process_id go together")
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
  elif auto or _slurm_multi_task():
    jax.distributed.initialize()
