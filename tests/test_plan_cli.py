"""emola-plan: per-device memory of the compiled train step on a simulated mesh."""

from __future__ import annotations

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _plan(tmp_path, *mesh):
  out = tmp_path / "plan.json"
  proc = subprocess.run(
      [sys.executable, "-m", "emola_jax.cli.plan", f"--config={REPO}/configs/tiny.py",
       "--devices=8", "--config.train.batch_size=8", "--config.mesh.data=1", *mesh,
       f"--json={out}"], capture_output=True, text=True, cwd=REPO, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc.stdout, json.loads(out.read_text())


def test_fsdp_divides_the_state_and_replication_does_not(tmp_path):
  stdout, fsdp = _plan(tmp_path, "--config.mesh.fsdp=8")
  assert "| per device | GiB |" in stdout and "xla temp" in stdout
  assert fsdp["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
  assert fsdp["trainable_params"] == 7_680  # LoRA r4 + projectors of the tiny model
  per = fsdp["per_device"]
  total = per["ideal_state_bytes"] * 8
  # Sharded: close to total / 8 (a few small indivisible tensors stay whole).
  assert per["state_bytes"] < 0.2 * total
  assert per["xla_temp_bytes"] > 0 and per["peak_estimate_bytes"] >= per["xla_temp_bytes"]
  _, dp = _plan(tmp_path, "--config.mesh.fsdp=1", "--config.mesh.data=8")
  assert dp["per_device"]["state_bytes"] == dp["per_device"]["ideal_state_bytes"] * 8
