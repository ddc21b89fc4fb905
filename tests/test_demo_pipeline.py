"""The main job's pipeline, short: synthetic faces -> tokenizer -> shards -> training -> scoring.

A few hundred steps on the demo config (both the model and the data are the README's main
command's, smaller): the loss must fall well below its start and emotion S_re must beat chance
(> 30 of 100 on 7 classes) on held-out faces never seen in training.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_short_demo_learns(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "emola_jax.demo", f"--workdir={tmp_path / 'demo'}",
       "--num_train=400", "--num_test=60", "--steps=450", "--eval_limit=60",
       "--nophotos", "--workers=1"],
      capture_output=True, text=True, cwd=REPO, timeout=1200)
  assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
  report = json.load(open(tmp_path / "demo" / "report.json"))
  (run,) = report["runs"]
  assert run["prior_position"] == "after"
  emotion = run["scores"]["emotion"]
  assert emotion["n"] == 60
  assert emotion["S_re"] > 30, emotion
  losses = [json.loads(line)["loss"] for line in open(run["metrics"]) if '"loss"' in line]
  assert losses[-1] < 0.3 * losses[0], (losses[0], losses[-1])
