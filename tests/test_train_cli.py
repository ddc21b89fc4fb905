"""emola-train end to end on a tiny dataset: metrics, exact resume after SIGTERM and kill -9."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest

from tests import train_fixtures

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  return train_fixtures.make_dataset(tmp_path_factory.mktemp("train_data"))


def _cmd(workdir, dataset, *extra):
  return [sys.executable, "-m", "emola_jax.cli.train", f"--config={REPO}/configs/tiny.py",
          f"--workdir={workdir}", *train_fixtures.overrides(dataset), *extra]


def _losses(workdir) -> dict[int, float]:
  out = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      row = json.loads(line)
      if "loss" in row:
        out[row["step"]] = row["loss"]
  return out


def _run(cmd, **kw):
  return subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO, **kw)


def _interrupt(cmd, sig, after_step, workdir):
  """Starts a run and sends `sig` once metrics.jsonl has reached `after_step`."""
  proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          cwd=REPO)
  deadline = time.time() + 600
  path = os.path.join(workdir, "metrics.jsonl")
  while time.time() < deadline and proc.poll() is None:
    if os.path.exists(path) and max(_losses(workdir), default=0) >= after_step:
      proc.send_signal(sig)
      break
    time.sleep(0.05)
  out, _ = proc.communicate(timeout=600)
  return proc.returncode, out


def test_uninterrupted_and_resumed_runs_have_bitwise_equal_losses(tmp_path, dataset):
  steps = ["--config.train.num_steps=8"]
  # Evaluation does not touch the training stream, so only the reference run evaluates.
  ref = _run(_cmd(tmp_path / "ref", dataset, *steps, "--config.data.eval_splits=emotion_test",
                  "--config.eval.every_steps=4", "--config.eval.generate=True",
                  "--config.eval.max_examples=4", "--config.eval.max_new_tokens=6"))
  assert ref.returncode == 0, ref.stderr[-3000:]
  assert "trainable parameters:" in ref.stdout
  ref_losses = _losses(tmp_path / "ref")
  assert sorted(ref_losses) == list(range(1, 9))
  rows = [json.loads(l) for l in open(tmp_path / "ref" / "metrics.jsonl")]
  rows = [r for r in rows if "eval_loss" not in r]
  for key in ("step", "loss", "learning_rate", "tokens_per_second", "mfu",
              "model_tflops_per_second"):
    assert all(key in r for r in rows)
  assert os.listdir(tmp_path / "ref" / "tensorboard")
  assert os.path.isdir(tmp_path / "ref" / "final" / "params")
  evals = [json.loads(l) for l in open(tmp_path / "ref" / "metrics.jsonl") if "eval_loss" in l]
  assert [e["step"] for e in evals] == [4, 8] and all(e["eval_tokens"] > 0 for e in evals)
  # FABA-Bench scores of generated answers (a random tiny model: any value, but present).
  assert all(0 <= e["S_re_emotion"] <= 100 and "S_rege_emotion" in e for e in evals)
  best_step = min(evals, key=lambda e: e["eval_loss"])["step"]
  assert os.listdir(tmp_path / "ref" / "best") == [str(best_step)]

  # SIGTERM mid-run: a clean exit with a checkpoint, then a resume to the end.
  code, out = _interrupt(_cmd(tmp_path / "term", dataset, *steps), signal.SIGTERM, 3,
                         tmp_path / "term")
  assert code == 0, out[-3000:]
  assert "preempted" in out
  resumed = _run(_cmd(tmp_path / "term", dataset, *steps))
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "resumed from" in resumed.stdout
  assert _losses(tmp_path / "term") == ref_losses  # bitwise: JSON floats round-trip exactly

  # kill -9: resume from the last saved step (every 2 steps); the lines logged after it are
  # recomputed and must be identical.
  code, _ = _interrupt(_cmd(tmp_path / "kill", dataset, *steps), signal.SIGKILL, 5,
                       tmp_path / "kill")
  assert code == -signal.SIGKILL
  resumed = _run(_cmd(tmp_path / "kill", dataset, *steps))
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  rows = [json.loads(l) for l in open(tmp_path / "kill" / "metrics.jsonl") if "loss" in l]
  for row in rows:
    assert row["loss"] == ref_losses[row["step"]]
  assert max(r["step"] for r in rows) == 8


def test_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, dataset):
  result = _run(_cmd(tmp_path / "nan", dataset, "--config.train.num_steps=8",
                     "--config.checkpoint.every_steps=1", "--config.train.lr=1e30",
                     "--config.train.max_grad_norm=0", "--config.train.warmup_ratio=0"))
  assert result.returncode != 0
  assert "emola-train: loss is" in result.stderr and "last good checkpoint" in result.stderr
  losses = _losses(tmp_path / "nan")
  bad = min(s for s, v in losses.items() if not math.isfinite(v)) if any(
      not math.isfinite(v) for v in losses.values()) else None
  saved = sorted(int(d) for d in os.listdir(tmp_path / "nan" / "checkpoints") if d.isdigit())
  # The non-finite step itself was never logged as good nor saved.
  assert saved and all(math.isfinite(losses[s]) for s in saved)
  assert bad is None or max(saved) < bad
  assert not os.path.exists(tmp_path / "nan" / "final")
