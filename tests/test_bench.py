"""`python -m emola_jax.bench` and launch/gpu_bench.sh on the tiny model, CPU.

The PyTorch side is `transformers`' LLaVA (+ prior token) with PEFT LoRA, an implementation
independent of ours: built from our weights, its first training loss must equal ours, and its
trainable parameter count ours. The derived figures in the JSON are recomputed here from the
raw timings and the FLOP count.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys

import numpy as np
import pytest
from absl import app
from ml_collections import config_flags

from emola_jax import bench
from emola_jax.training import experiment, flops, param_groups

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs", "tiny.py")
SHAPE = ["--batch=2", "--seq_len=64", "--peak_n=256"]


def _run(args, env=None, timeout=600) -> subprocess.CompletedProcess:
  proc = subprocess.run(args, cwd=REPO, env={**os.environ, **(env or {})}, capture_output=True,
                        text=True, timeout=timeout)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  return proc


def _tiny_config():
  return config_flags.config_flags._ConfigFileParser(name="config").parse(TINY)  # pylint: disable=protected-access


def test_bench_all_parts_on_the_tiny_model(tmp_path):
  out = tmp_path / "bench.json"
  proc = _run([sys.executable, "-m", "emola_jax.bench", f"--config={TINY}",
               "--parts=peak,train,loader,decode,variants", "--steps=2", *SHAPE,
               "--loader_batches=2", "--loader_workers=0", "--decode_batch_sizes=2",
               "--decode_new_tokens=4", "--decode_repeats=1", "--decode_prompt_len=24",
               "--variant=model.remat_policy=full model.scan_layers=false",
               "--variant_steps=1", f"--json={out}"])
  for title in ("## Matmul peak", "## Train step", "## Loader", "## Greedy decoding",
                "## Train-step variants", "| emola-jax |", "| transformers |"):
    assert title in proc.stdout
  r = json.loads(out.read_text())
  train = r["train"]
  ours, theirs = train["sides"]["emola-jax"], train["sides"]["transformers"]
  # The same model, weights, batch and trainable set in both frameworks.
  assert ours["first_step_loss"] == pytest.approx(theirs["first_step_loss"], rel=1e-5)
  assert ours["trainable_parameters"] == theirs["trainable_parameters"]
  cfg = experiment.model_config(_tiny_config())
  groups = param_groups.parse_trainable("emola")
  expected = flops.step_flops(cfg, 2, 64, groups, target_logits_only=True)
  assert train["model_flops_per_step"] == pytest.approx(expected.model)
  for side in (ours, theirs):
    assert len(side["step_seconds"]) == 2
    median = statistics.median(side["step_seconds"])
    assert side["tokens_per_second"] == pytest.approx(2 * 64 / median)
    assert side["mfu_vs_measured_peak"] == pytest.approx(statistics.median(
        expected.model / (t * p)
        for t, p in zip(side["step_seconds"], side["matmul_peak_flops_per_step"])))
  assert train["speedup"] == pytest.approx(ours["tokens_per_second"] / theirs["tokens_per_second"])
  assert set(r["peak"]["measured_flops"]) == {"emola-jax", "transformers"}
  loader = r["loader"]
  assert loader["demand_samples_per_second"] == pytest.approx(ours["samples_per_second"])
  assert loader["settings"][0]["samples_per_second"] > 0
  decode = r["decode"]["batches"][0]
  assert decode["batch"] == 2 and decode["same_tokens"] == 1.0  # greedy: identical tokens
  (variant,) = r["variants"]
  assert variant["variant"] == "model.remat_policy=full model.scan_layers=false"
  full = flops.step_flops(cfg.replace(remat_policy="full"), 2, 64, groups, True)
  assert variant["hardware_flops_per_step"] == pytest.approx(full.hardware)
  assert r["meta"]["load_average_before"] and r["meta"]["load_average_after"]


def test_gpu_bench_script(tmp_path):
  """The GPU script's command, run on the CPU with the tiny config (DEVICE=cpu)."""
  script = os.path.join(REPO, "launch", "gpu_bench.sh")
  check = subprocess.run([os.path.join(os.path.dirname(sys.executable), "shellcheck"), script],
                         capture_output=True, text=True)
  assert check.returncode == 0, check.stdout
  out = tmp_path / "gpu.json"
  _run(["bash", script, "--peak_n=256"],
       env={"DEVICE": "cpu", "CONFIG": TINY, "BATCH": "2", "SEQ_LEN": "64", "STEPS": "1",
            "OUT": str(out), "EMOLA_PYTHON": sys.executable})
  r = json.loads(out.read_text())
  assert list(r["train"]["sides"]) == ["emola-jax"]  # no PyTorch side
  side = r["train"]["sides"]["emola-jax"]
  assert 0 < side["mfu_vs_measured_peak"] < 1.5
  assert r["train"]["seq_len"] == 64 and r["train"]["batch"] == 2


def test_synthetic_batch_layout():
  cfg = experiment.model_config(_tiny_config())
  b = bench.synthetic_batch(cfg, 3, 64, seed=0)
  slots = b["input_ids"] == cfg.image_token_index
  assert (slots.sum(1) == cfg.num_image_slots).all()
  assert (b["input_ids"][:, 0] == cfg.text.bos_token_id).all()
  first_target = np.argmax(b["loss_mask"][0] > 0)
  assert first_target > np.flatnonzero(slots[0]).max()  # no loss on the prompt or the image
  assert b["attention_mask"].all() and b["prior"].shape == (3, cfg.prior_dim)
  with pytest.raises(app.UsageError, match="no room for text"):
    bench.synthetic_batch(cfg, 1, 20, seed=0)


def test_parse_override():
  config = _tiny_config()
  bench.parse_override(config, "model.scan_layers=false")
  bench.parse_override(config, "model.lora.dropout=0.25")
  bench.parse_override(config, "model.remat_policy=dots")
  assert config.model.scan_layers is False
  assert config.model.lora.dropout == 0.25 and config.model.remat_policy == "dots"
  with pytest.raises(app.UsageError, match="no field 'remat'"):
    bench.parse_override(config, "model.remat=full")
  with pytest.raises(app.UsageError, match="not a boolean"):
    bench.parse_override(config, "model.scan_layers=maybe")
  with pytest.raises(app.UsageError, match="not KEY=VALUE"):
    bench.parse_override(config, "model.scan_layers")


def test_bench_decode_times_each_weight_layout_against_transformers():
  proc = _run([sys.executable, "-m", "emola_jax.evaluation.bench_decode", "--width=64",
               "--layers=1", "--vocab=500", "--new_tokens=4", "--repeats=1", "--prompt_len=24",
               "--image_size=28", "--batch_sizes=2", "--layouts=stacked,unstacked,transposed"])
  rows = [line for line in proc.stdout.splitlines() if line.startswith("| ") and "%" in line]
  assert [row.split("|")[1].strip() for row in rows] == ["stacked", "unstacked", "transposed"]
  assert all(row.rstrip().endswith("100.0% |") for row in rows)  # greedy: identical tokens
  # A LoRA-tuned model: ours with adapters (merged in the decoding copy, or not), transformers
  # with them merged into its weights; the same greedy tokens.
  proc = _run([sys.executable, "-m", "emola_jax.evaluation.bench_decode", "--width=64",
               "--layers=1", "--vocab=500", "--new_tokens=4", "--repeats=1", "--prompt_len=24",
               "--image_size=28", "--batch_sizes=2", "--lora_rank=4",
               "--layouts=default,unmerged"])
  rows = [line for line in proc.stdout.splitlines() if line.startswith("| ") and "%" in line]
  assert [row.split("|")[1].strip() for row in rows] == ["default", "unmerged"]
  assert all(row.rstrip().endswith("100.0% |") for row in rows) and "LoRA rank 4" in proc.stdout
  bad = subprocess.run([sys.executable, "-m", "emola_jax.evaluation.bench_decode",
                        "--layouts=sideways", "--layers=1", "--width=64", "--vocab=500"],
                       cwd=REPO, capture_output=True, text=True, check=False)
  assert bad.returncode != 0 and "unknown ['sideways']" in bad.stderr


def test_bench_decode_budget_above_new_tokens_ends_rows_alike_on_both_sides(tmp_path):
  from emola_jax.conversion.hf_load import load_pretrained
  from emola_jax.evaluation import bench_decode
  from emola_jax.evaluation.generate import Generator

  hf = bench_decode.build_hf_model(1, 64, 500, 28, 0)
  hf.save_pretrained(tmp_path)
  model, _ = load_pretrained(str(tmp_path))
  for cache_growth in (2.0, None):
    entry = bench_decode.compare(Generator(model, cache_growth=cache_growth), hf, batch=2,
                                 prompt_len=24, new_tokens=6, image_size=28, repeats=1, seed=0,
                                 max_new_tokens=40)
    # Each row stops at its own 4-gram: after 6 tokens, or earlier if the 4-gram came sooner
    # (transformers stopping elsewhere raises).
    assert entry["max_new_tokens"] == 40 and 2 * 4 <= entry["generated_tokens"] <= 2 * 6
    assert entry["same_tokens"] == 1.0
  with pytest.raises(ValueError, match="new_tokens=3 is too few"):
    bench_decode.compare(Generator(model), hf, batch=2, prompt_len=24, new_tokens=3,
                         image_size=28, repeats=1, seed=0, max_new_tokens=40)
