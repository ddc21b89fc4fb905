"""Peak memory of checkpoint conversion, measured on a random LLaVA-shaped checkpoint.

  python -m emola_jax.conversion.bench_memory --size_gb=1

Writes a random `transformers` LLaVA directory of about `--size_gb` (fp32, sharded), then runs
`emola-convert --from=hf` (HF -> native) and `emola-convert --to=hf` (native -> HF) each in a child
process, and reports each child's peak resident set size against the checkpoint size. A child that
only imports the same modules gives the fixed cost of Python + JAX, reported beside it.

The peak is the child's own high-water mark (`VmHWM` of /proc/self/status, read as it exits).
`resource.getrusage(RUSAGE_CHILDREN).ru_maxrss` would overstate it: Linux carries the parent's
high-water mark into a child across fork/exec, so every child of this (large) process would
report at least this process's own peak.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
from absl import app
from absl import flags
from flax import nnx

from emola_jax.conversion import hf_mapping, to_hf
from emola_jax.model.config import EmolaConfig, TextConfig, VisionConfig
from emola_jax.model.emola import EmolaModel

_SIZE_GB = flags.DEFINE_float("size_gb", 1.0, "Approximate checkpoint size in GB (10^9 bytes).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Where to write the checkpoints (default: a "
                               "temporary directory, removed at the end).")
_SHARD = flags.DEFINE_string("max_shard_size", "400MB", "Shard size of the random checkpoint.")

# Narrow LLaVA-1.5 proportions; the number of decoder layers sets the size.
VISION = VisionConfig(hidden_size=512, intermediate_size=2048, num_layers=12, num_heads=8,
                      image_size=336, patch_size=14)
TEXT = dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_heads=16,
            num_kv_heads=16, max_position_embeddings=2048)


def _num_params(config: EmolaConfig) -> int:
  abstract = nnx.eval_shape(lambda: EmolaModel(config, rngs=nnx.Rngs(0)))
  return sum(int(np.prod(v.shape)) for _, v in nnx.to_flat_state(nnx.state(abstract, nnx.Param)))


def config_for(size_bytes: float) -> EmolaConfig:
  """A plain-LLaVA config whose fp32 checkpoint is about `size_bytes`."""
  make = lambda layers: EmolaConfig(vision=VISION, text=TextConfig(num_layers=layers, **TEXT),
                                    prior_position="none")
  small, large = _num_params(make(1)), _num_params(make(2))
  layers = max(1, round((size_bytes / 4 - small) / (large - small)) + 1)
  return make(layers)


def write_random_hf(config: EmolaConfig, out_dir: str, max_shard_size: str) -> int:
  """A random fp32 HF LLaVA directory for `config`, written tensor by tensor; returns its bytes."""
  abstract = nnx.eval_shape(lambda: EmolaModel(config, rngs=nnx.Rngs(0)))
  patch = (config.vision.num_channels, config.vision.patch_size, config.vision.patch_size)
  rng = np.random.default_rng(0)
  tensors = []
  for path, var in nnx.to_flat_state(nnx.state(abstract, nnx.Param)):
    row = hf_mapping.BY_OURS[".".join(map(str, path))]
    shape = var.shape[1:] if row.stacked else var.shape
    for layer in range(var.shape[0]) if row.stacked else [None]:
      tensors.append((to_hf.EXPORT_LAYOUT.key(row, layer), to_hf.LazyTensor(
          to_hf.theirs_shape(row, shape, patch), np.dtype(np.float32),
          lambda s=to_hf.theirs_shape(row, shape, patch): rng.standard_normal(s, np.float32))))
  os.makedirs(out_dir)
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    json.dump(to_hf.hf_config(config, "float32"), f, indent=2)
  to_hf.write_sharded(out_dir, tensors, to_hf.parse_size(max_shard_size))
  return sum(t.nbytes for _, t in tensors)


def _dir_bytes(path: str) -> int:
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


# Runs a module as __main__ and, however it ends, writes its peak RSS (bytes) to a file.
_WRAPPER = """
import re, runpy, sys
out, module = sys.argv[1], sys.argv[2]
sys.argv = [module] + sys.argv[3:]
try:
  if module == "-":  # the baseline: the conversion's imports and a JAX backend, no work
    import jax.numpy, emola_jax.cli.convert, emola_jax.conversion.hf_load
    import emola_jax.conversion.to_hf
    jax.numpy.zeros(1).block_until_ready()
  else:
    runpy.run_module(module, run_name="__main__", alter_sys=True)
finally:
  status = open("/proc/self/status").read()
  open(out, "w").write(str(int(re.search(r"VmHWM:\\s+(\\d+) kB", status).group(1)) * 1024))
"""


def measure(module: str, args: list[str], workdir: str) -> tuple[int, float]:
  """(peak RSS in bytes, wall seconds) of `python -m module args` ("-": imports only)."""
  env = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}
  out = os.path.join(workdir, "peak_rss")
  start = time.perf_counter()
  subprocess.run([sys.executable, "-c", _WRAPPER, out, module, *args], env=env, check=True)
  seconds = time.perf_counter() - start
  with open(out) as f:
    return int(f.read()), seconds


def main(argv: list[str]) -> None:
  del argv
  workdir = _WORKDIR.value or tempfile.mkdtemp(prefix="emola_bench_memory_")
  try:
    config = config_for(_SIZE_GB.value * 1e9)
    hf_dir, native_dir, out_dir = (os.path.join(workdir, n) for n in ("hf", "native", "hf_out"))
    size = write_random_hf(config, hf_dir, _SHARD.value)
    baseline, _ = measure("-", [], workdir)
    rows = []
    for name, args, out in [
        ("hf_to_native", ["--from=hf", f"--input={hf_dir}", f"--output={native_dir}"],
         native_dir),
        ("native_to_hf", ["--from=native", "--to=hf", f"--input={native_dir}",
                          f"--output={out_dir}", "--max_shard_size=5GB"], out_dir)]:
      peak, seconds = measure("emola_jax.cli.convert", args, workdir)
      rows.append({"direction": name, "checkpoint_bytes": size, "output_bytes": _dir_bytes(out),
                   "peak_rss_bytes": peak, "peak_over_checkpoint": round(peak / size, 3),
                   "baseline_rss_bytes": baseline,
                   "above_baseline_over_checkpoint": round((peak - baseline) / size, 3),
                   "seconds": round(seconds, 1)})
    print(json.dumps({"text_layers": config.text.num_layers, "results": rows}, indent=2))
    gb = lambda b: f"{b / 1e9:.2f} GB"
    print(f"\ncheckpoint {gb(size)} (fp32, {config.text.num_layers} decoder layers); "
          f"Python + JAX alone: {gb(baseline)}")
    for r in rows:
      print(f"{r['direction']:>13}: peak RSS {gb(r['peak_rss_bytes'])} = "
            f"{r['peak_over_checkpoint']:.2f}x the checkpoint "
            f"({r['above_baseline_over_checkpoint']:.2f}x above the baseline), {r['seconds']} s")
  finally:
    if not _WORKDIR.value:
      shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
  app.run(main)
