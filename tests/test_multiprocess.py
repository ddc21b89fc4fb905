"""Multi-host training rehearsed on one machine, and restoring onto a different mesh.

Two processes x 4 simulated CPU devices, joined by jax.distributed on loopback, train the tiny
config to the losses of one process with 8 devices, and checkpoint/restore across both
processes. A checkpoint saved on (fsdp=8) continues on (fsdp=2, tensor=4) with the same losses.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import portpicker
import pytest

from tests import train_fixtures

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARGS = ["--config.train.batch_size=8", "--config.train.num_steps=6", "--config.mesh.data=1",
        "--config.mesh.fsdp=8", "--config.mesh.tensor=1"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  return train_fixtures.make_dataset(tmp_path_factory.mktemp("mp_data"), num_train=48)


def _args(workdir, dataset, *extra):
  return [f"--config={REPO}/configs/tiny.py", f"--workdir={workdir}",
          *train_fixtures.overrides(dataset), *ARGS, *extra]


def _single(workdir, dataset, *extra):
  env = dict(os.environ, EMOLA_CPU_DEVICES="8")
  proc = subprocess.run([sys.executable, "-m", "emola_jax.cli.train",
                         *_args(workdir, dataset, *extra)], env=env, cwd=REPO,
                        capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return proc


def _two_processes(workdir, dataset, logs):
  proc = subprocess.run(
      ["bash", "launch/local_multiprocess.sh", "--num_processes=2", "--devices_per_process=4",
       f"--port={portpicker.pick_unused_port()}", f"--log_dir={logs}", "--",
       *_args(workdir, dataset)],
      env=dict(os.environ, EMOLA_PYTHON=sys.executable), cwd=REPO, capture_output=True,
      text=True, timeout=900)
  logs_text = "".join(open(os.path.join(logs, f)).read()[-3000:] for f in sorted(os.listdir(logs)))
  assert proc.returncode == 0, proc.stderr[-2000:] + logs_text
  return logs_text


def _losses(workdir) -> dict[int, float]:
  """Step -> loss; a step logged twice (recomputed after a restore) keeps its last value."""
  out = {}
  for line in open(os.path.join(workdir, "metrics.jsonl")):
    row = json.loads(line)
    if "loss" in row:
      out[row["step"]] = row["loss"]
  return out


def _rewind(workdir, to_step):
  """Leaves only the checkpoints up to `to_step`, as if the run had stopped there."""
  for name in os.listdir(os.path.join(workdir, "checkpoints")):
    if name.isdigit() and int(name) > to_step:
      shutil.rmtree(os.path.join(workdir, "checkpoints", name))
  shutil.rmtree(os.path.join(workdir, "final"))


@pytest.fixture(scope="module")
def reference(dataset, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("ref") / "run"
  proc = _single(workdir, dataset)
  assert "over 8 devices, 1 process(es)" in proc.stdout
  return workdir, _losses(workdir)


def test_two_processes_train_and_restore_like_one(dataset, reference, tmp_path):
  _, ref = reference
  workdir = tmp_path / "run"
  logs = _two_processes(workdir, dataset, tmp_path / "logs")
  assert "over 8 devices, 2 process(es)" in logs
  got = _losses(workdir)
  assert sorted(got) == sorted(ref) == list(range(1, 7))
  np.testing.assert_allclose([got[s] for s in range(1, 7)], [ref[s] for s in range(1, 7)],
                             rtol=1e-5)
  # Both processes wrote their part of the checkpoint (each its own data-iterator state).
  data_dir = workdir / "checkpoints" / "4" / "data"
  assert {"process_0-of-2.json", "process_1-of-2.json"} <= set(os.listdir(data_dir))
  _rewind(workdir, 4)
  _two_processes(workdir, dataset, tmp_path / "logs2")
  got = _losses(workdir)
  np.testing.assert_allclose([got[5], got[6]], [ref[5], ref[6]], rtol=1e-5)


def test_restore_onto_another_mesh(dataset, reference, tmp_path):
  ref_dir, ref = reference
  workdir = tmp_path / "run"
  shutil.copytree(ref_dir, workdir)
  _rewind(workdir, 4)
  proc = _single(workdir, dataset, "--config.mesh.fsdp=2", "--config.mesh.tensor=4")
  assert "resumed from" in proc.stdout and "'fsdp': 2, 'tensor': 4" in proc.stdout
  got = _losses(workdir)
  np.testing.assert_allclose([got[5], got[6]], [ref[5], ref[6]], rtol=1e-5)
