"""Performance benchmark: emola-jax against the PyTorch `transformers` stack, and against the chip.

  python -m emola_jax.bench [--config=configs/bench.py] [--parts=peak,train,loader,decode]
      [--steps=5] [--batch=N] [--seq_len=N] [--json=results.json]
  python -m emola_jax.bench --parts=variants          # remat policy / scan / dropout variants
  python -m emola_jax.bench --device=gpu --config=configs/emola_lora.py --parts=peak,train \
      --batch=8 --seq_len=2048                       # a GPU: MFU of the 7B LoRA step

Parts (one process, run in this order):

* `peak`: FLOP/s of an n x n matmul in the step's compute dtype, per framework (a jitted jnp
  matmul, `flops.peak_probe`; torch.matmul), and the published peak if `flops.PEAK_TFLOPS` knows
  the chip. The probes are timed again right before every train step: on a shared machine the
  load changes from minute to minute, so each step is compared with the peak of its moment.
* `train`: our jitted, sharded, buffer-donating train step (`trainer.setup`, the one `emola-train`
  runs) against `EmolaForConditionalGeneration` (`transformers`' LLaVA plus the prior token) with
  PEFT LoRA on the same seven decoder projections, the same weights (exported from ours, LoRA A
  copied, B zero), the same trainable set (LoRA, projector, prior projector) and the same batch,
  doing forward, loss, backward, gradient clipping and `torch.optim.AdamW` (per-group learning
  rates). One warm-up step each (our compilation), then `--steps` steps each, interleaved
  (ours, theirs, ours, ...), so that load from other processes hits both alike; medians. The
  first-step losses must agree (B = 0: both run the same function), and they are printed.
  Tokens/s = batch x sequence length / step time; MFU = `flops.step_flops` model FLOPs / step
  time / the framework's own matmul peak (median over steps), and / the published peak.
* `loader`: the Grain loader (`loader.make_loader`, as in training) on FABA-like JPEG examples
  made from two real photos (random crops 300-512 px, a 212-d stored prior, an emotion question
  and a ~70-word answer; a small SentencePiece tokenizer trained here), samples/s against the
  samples/s the timed train step consumes.
* `decode`: batched greedy decoding, ours (`evaluation.generate.Generator`) against
  `transformers` `generate`, on `evaluation.bench_decode`'s random LLaVA at the config's LLaMA
  shape (its CLIP is 2 x 64, at `--decode_image_size`), interleaved, tokens/s (prefill included)
  at each batch size.
* `variants`: the train step under each `--variant` (config overrides such as the remat policy
  or scan, and XLA compiler options of the step's compilation), round-robin, median step time,
  tokens/s, MFU and hardware FLOPs utilisation.

CPU numbers are fp32 (`configs/bench.py`); XLA:CPU's bf16 dots are no faster than its fp32 ones
here. Both frameworks use all cores the process may run on: XLA:CPU sizes its thread pool by the
CPU affinity mask and ignores thread-count flags, so for one core each run under
`taskset -c 0 ... --cpu_threads=1`. The load average is recorded before and after.
"""

from __future__ import annotations

import datetime
import gc
import io
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from typing import Any, Callable

import numpy as np
from absl import app, flags
from ml_collections import config_flags

_REPO_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                            "configs", "bench.py")
PARTS = ("peak", "train", "loader", "decode", "variants")
DEFAULT_VARIANTS = (
    "model.remat_policy=none model.scan_layers=true",
    "model.remat_policy=none model.scan_layers=false",
    "model.remat_policy=full model.scan_layers=true",
    "model.remat_policy=dots model.scan_layers=true",
    "model.remat_policy=dots_no_batch model.scan_layers=true",
    "model.lora.dropout=0.0",
    "xla.xla_cpu_experimental_ynn_fusion_type=",
)

_CONFIG = config_flags.DEFINE_config_file(
    "config", _REPO_CONFIG if os.path.exists(_REPO_CONFIG) else None,
    "Experiment config (configs/*.py); override fields with --config.KEY=VALUE.",
    lock_config=True)
_PARTS = flags.DEFINE_list("parts", ["peak", "train", "loader", "decode"],
                           f"Parts to run, of {list(PARTS)}.")
_DEVICE = flags.DEFINE_enum("device", "cpu", ["cpu", "gpu"],
                            "cpu: JAX on the CPU, against PyTorch on the CPU. gpu: JAX on the "
                            "first GPU, no PyTorch side (parts peak, train, loader, variants).")
_NUM_DEVICES = flags.DEFINE_integer(
    "num_devices", 1, "Devices the train step runs on (the first N; the config's mesh spreads "
    "over them). MFU divides by N peaks.")
_STEPS = flags.DEFINE_integer("steps", 5, "Timed train steps per side, after one warm-up each.")
_BATCH = flags.DEFINE_integer("batch", 0, "Train batch rows (0: --config.train.batch_size).")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 0, "Train tokens per row (0: --config.data.max_length).")
_TORCH = flags.DEFINE_bool("torch", True, "Time the PyTorch side of the train part (CPU only).")
_CPU_THREADS = flags.DEFINE_integer(
    "cpu_threads", 0, "torch intra-op threads (0: torch's default, all cores). XLA's follow the "
    "CPU affinity mask: pin the process with taskset to give both frameworks fewer cores.")
_PEAK_N = flags.DEFINE_integer("peak_n", 0, "Matrix size of the peak measurement (0: 2048 on "
                               "CPU, 8192 on GPU).")
_PEAK_CHAIN = flags.DEFINE_integer("peak_chain", 0, "Matmuls per timed call (0: 1 on CPU, 20 "
                                   "on GPU, where one call is shorter than its dispatch).")
_LOADER_WORKERS = flags.DEFINE_list("loader_workers", ["0", "1"],
                                    "Loader worker processes to time (0: in this process).")
_LOADER_BATCHES = flags.DEFINE_integer("loader_batches", 10, "Timed loader batches per setting.")
_DECODE_BATCHES = flags.DEFINE_list("decode_batch_sizes", ["1", "8"], "Decoding batch sizes.")
_DECODE_NEW = flags.DEFINE_integer("decode_new_tokens", 64, "Generated tokens per row.")
_DECODE_PROMPT = flags.DEFINE_integer("decode_prompt_len", 64, "Prompt tokens per row (BOS, "
                                      "image slots, text).")
_DECODE_IMAGE = flags.DEFINE_integer("decode_image_size", 56, "CLIP image size of the decoding "
                                     "model (patch 14: 16 image slots at 56 px); 0: the "
                                     "config's.")
_DECODE_REPEATS = flags.DEFINE_integer("decode_repeats", 3, "Timed calls per side and batch.")
_VARIANTS = flags.DEFINE_multi_string(
    "variant", list(DEFAULT_VARIANTS), "For --parts=variants: one variant as space-separated "
    "config overrides (KEY=VALUE, keys as in --config.KEY) and XLA compiler options of the step "
    "(xla.OPTION=VALUE, e.g. xla.xla_cpu_experimental_ynn_fusion_type= for Eigen's CPU dots); "
    "repeat the flag for more; an empty one is the config as is.")
_VARIANT_STEPS = flags.DEFINE_integer("variant_steps", 3, "Timed steps per variant.")
_SEED = flags.DEFINE_integer("bench_seed", 0, "Seed of the synthetic batch and examples.")
_OUTPUT = flags.DEFINE_string("json", None, "Also write the results as JSON to this file.")


# ----------------------------------------------------------------------------- shared helpers


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
  start = time.perf_counter()
  out = fn()
  return time.perf_counter() - start, out


def load_average() -> list[float]:
  return [round(x, 2) for x in os.getloadavg()]


def synthetic_batch(cfg, batch: int, seq_len: int, seed: int) -> dict[str, np.ndarray]:
  """Full rows: BOS, 34 prompt tokens, the image slots, text; loss on the last quarter."""
  slots = cfg.num_image_slots
  head = 35
  if seq_len < head + slots + 8:
    raise app.UsageError(f"--seq_len={seq_len} leaves no room for text after the {slots} image "
                         f"slots of this model; use at least {head + slots + 8}")
  rng = np.random.default_rng(seed)
  vocab = cfg.text.vocab_size
  ids = rng.integers(3, vocab - 1, size=(batch, seq_len)).astype(np.int32)
  ids[ids == cfg.image_token_index] = 3
  ids[:, 0] = cfg.text.bos_token_id
  ids[:, head:head + slots] = cfg.image_token_index
  loss_mask = np.zeros((batch, seq_len), np.float32)
  loss_mask[:, seq_len - (seq_len - head - slots) // 4:] = 1.0
  size = cfg.vision.image_size
  out = {"input_ids": ids, "attention_mask": np.ones((batch, seq_len), np.int32),
         "loss_mask": loss_mask,
         "pixel_values": rng.normal(size=(batch, cfg.vision.num_channels, size, size)).astype(
             np.float32)}
  if cfg.has_prior:
    out["prior"] = rng.uniform(0, 1, size=(batch, cfg.prior_dim)).astype(np.float32)
  return out


def parse_override(config, text: str) -> None:
  """Applies one KEY=VALUE override to a (locked) ConfigDict, with the field's own type."""
  if "=" not in text:
    raise app.UsageError(f"--variant: {text!r} is not KEY=VALUE")
  key, value = text.split("=", 1)
  *parents, leaf = key.split(".")
  node = config
  for part in parents:
    if part not in node:
      raise app.UsageError(f"--variant: {key!r}: the config has no field {part!r}")
    node = node[part]
  if leaf not in node:
    raise app.UsageError(f"--variant: {key!r}: the config has no field {leaf!r}; fields there: "
                         f"{sorted(node.keys())}")
  old = node[leaf]
  if isinstance(old, bool):
    if value.lower() not in ("true", "false", "1", "0"):
      raise app.UsageError(f"--variant: {key}={value!r} is not a boolean")
    new: Any = value.lower() in ("true", "1")
  elif isinstance(old, (int, float, str)):
    try:
      new = type(old)(value)
    except ValueError:
      raise app.UsageError(f"--variant: {key}={value!r} is not a {type(old).__name__}") from None
  else:
    raise app.UsageError(f"--variant: {key} holds a {type(old).__name__}; only scalar fields "
                         "can be overridden here")
  with config.unlocked():
    node[leaf] = new


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
  return "\n".join(lines)


def _fmt(x: float, digits: int = 1) -> str:
  return f"{x:,.{digits}f}"


# ----------------------------------------------------------------------------- our train step


class JaxTrainer:
  """The jitted train step of `emola-train` on one fixed batch; `step()` runs one, synchronously."""

  def __init__(self, config, batch_np: dict[str, np.ndarray], devices=None,
               compiler_options: dict[str, Any] | None = None):
    import jax  # pylint: disable=import-outside-toplevel

    from emola_jax.model import sharding as logical  # pylint: disable=import-outside-toplevel
    from emola_jax.training import mesh as mesh_lib  # pylint: disable=import-outside-toplevel
    from emola_jax.training import trainer  # pylint: disable=import-outside-toplevel

    self._jax = jax
    self.config = config
    self.run = trainer.setup(config, steps=1000, devices=devices)
    self.cfg = self.run.cfg
    self._context = (jax.set_mesh(self.run.mesh), logical.logical_axis_rules(self.run.rules))
    self.state = self.run.state
    with self._context[0], self._context[1]:
      self.batch = mesh_lib.global_batch(batch_np, self.run.mesh)
      # XLA options (e.g. xla_cpu_experimental_ynn_fusion_type) apply to this compilation only,
      # so variants with different options run side by side in one process.
      self._fn = (self.run.step_fn.lower(self.state, self.run.split.frozen, self.batch).compile(
          compiler_options=compiler_options) if compiler_options else self.run.step_fn)

  def step(self) -> dict[str, float]:
    jax = self._jax
    from emola_jax.model import sharding as logical  # pylint: disable=import-outside-toplevel

    with jax.set_mesh(self.run.mesh), logical.logical_axis_rules(self.run.rules):
      self.state, metrics = self._fn(self.state, self.run.split.frozen, self.batch)
      jax.block_until_ready((self.state, metrics))
    return {k: float(v) for k, v in metrics.items()}

  def merged_model(self):
    return self.run.split.merge(self.state.params, self.run.split.frozen)

  def trainable_count(self) -> int:
    return sum(int(v.size) for v in self.state.params.values())


# ----------------------------------------------------------------------------- the torch stack


class TorchTrainer:
  """`EmolaForConditionalGeneration` + PEFT LoRA + AdamW, built from our model's weights."""

  def __init__(self, jax_trainer: JaxTrainer, batch_np: dict[str, np.ndarray], workdir: str):
    import peft  # pylint: disable=import-outside-toplevel
    import torch  # pylint: disable=import-outside-toplevel

    from emola_jax.conversion import to_hf  # pylint: disable=import-outside-toplevel
    from emola_jax.torch_emola import \
        EmolaForConditionalGeneration  # pylint: disable=import-outside-toplevel

    self._torch = torch
    cfg, config = jax_trainer.cfg, jax_trainer.config
    params = {k: np.asarray(v) for k, v in jax_trainer.state.params.items()}
    # Export writes base weights with LoRA merged in; B = 0 at the start, so merging is a no-op
    # and the base weights are exactly ours.
    if any(np.any(v) for k, v in params.items() if k.endswith(".lora_b")):
      raise RuntimeError("bench: the LoRA B matrices are not zero; build the torch side before "
                         "any train step")
    to_hf.export_model(jax_trainer.merged_model(), workdir)
    model = EmolaForConditionalGeneration.from_pretrained(workdir, dtype=torch.float32)
    lora = cfg.lora
    targets = "|".join(lora.targets)
    peft.inject_adapter_in_model(
        peft.LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                        target_modules=rf".*language_model\.layers\.\d+\..*\.({targets})",
                        bias="none"), model)
    self._copy_lora(model, params, cfg)
    trainable_prefixes = ("model.multi_modal_projector.", "prior_projector.")
    for name, p in model.named_parameters():
      p.requires_grad_(".lora_" in name or name.startswith(trainable_prefixes))
    projector = [p for n, p in model.named_parameters()
                 if p.requires_grad and n.startswith("model.multi_modal_projector.")]
    rest = [p for n, p in model.named_parameters()
            if p.requires_grad and not n.startswith("model.multi_modal_projector.")]
    train = config.train
    lr_projector = train.group_lrs.get("projector", train.lr)
    self.optimizer = torch.optim.AdamW(
        [{"params": rest, "lr": train.lr}, {"params": projector, "lr": lr_projector}],
        betas=(train.b1, train.b2), eps=train.eps, weight_decay=train.weight_decay)
    self.max_grad_norm = train.max_grad_norm
    self.params = rest + projector
    self.model = model.train()  # LoRA dropout on, as in our step
    labels = np.where(batch_np["loss_mask"] > 0, batch_np["input_ids"], -100)
    self.inputs = {
        "input_ids": torch.from_numpy(batch_np["input_ids"].astype(np.int64)),
        "attention_mask": torch.from_numpy(batch_np["attention_mask"].astype(np.int64)),
        "pixel_values": torch.from_numpy(batch_np["pixel_values"]),
        "labels": torch.from_numpy(labels.astype(np.int64))}
    if "prior" in batch_np:
      self.inputs["prior_features"] = torch.from_numpy(batch_np["prior"])

  @staticmethod
  def _copy_lora(model, params: dict[str, np.ndarray], cfg) -> None:
    """Our A [L, in, r] and B [L, r, out] into PEFT's lora_A [r, in] and lora_B [out, r]."""
    import torch  # pylint: disable=import-outside-toplevel

    layers = model.model.language_model.layers
    copied = 0
    with torch.no_grad():
      for target in cfg.lora.targets:
        a = params[f"language_model.blocks.{target}.lora_a"]
        b = params[f"language_model.blocks.{target}.lora_b"]
        for i, layer in enumerate(layers):
          owner = layer.self_attn if hasattr(layer.self_attn, target) else layer.mlp
          module = getattr(owner, target)
          module.lora_A["default"].weight.copy_(torch.from_numpy(a[i].T.copy()))
          module.lora_B["default"].weight.copy_(torch.from_numpy(b[i].T.copy()))
          copied += 1
    if copied != len(cfg.lora.targets) * cfg.text.num_layers:
      raise RuntimeError(f"bench: copied {copied} LoRA adapters into the torch model, expected "
                         f"{len(cfg.lora.targets) * cfg.text.num_layers}")

  def step(self) -> dict[str, float]:
    torch = self._torch
    loss = self.model(**self.inputs).loss
    loss.backward()
    if self.max_grad_norm > 0:
      torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
    self.optimizer.step()
    self.optimizer.zero_grad(set_to_none=True)
    return {"loss": float(loss.detach())}

  def trainable_count(self) -> int:
    return sum(p.numel() for p in self.params)


# ----------------------------------------------------------------------------- parts


class PeakProbes:
  """Matmul peak probes for each framework, sampled between benchmark steps (same load)."""

  def __init__(self, dtype: str, device: str, with_torch: bool):
    from emola_jax.training import flops  # pylint: disable=import-outside-toplevel

    self.n = _PEAK_N.value or (8192 if device == "gpu" else 2048)
    self.chain = _PEAK_CHAIN.value or (20 if device == "gpu" else 1)
    self.dtype = dtype
    self.probes: dict[str, Callable[[], float]] = {
        "emola-jax": flops.peak_probe(dtype, self.n, self.chain)}
    if with_torch:
      import torch  # pylint: disable=import-outside-toplevel

      gen = torch.Generator().manual_seed(0)
      dt = getattr(torch, dtype)
      x = torch.randn(self.n, self.n, generator=gen).to(dt)
      w = (torch.randn(self.n, self.n, generator=gen) / self.n ** 0.5).to(dt)
      n, chain = self.n, self.chain

      def torch_probe() -> float:
        start = time.perf_counter()
        y = x
        for _ in range(chain):
          y = y @ w
        return 2.0 * n ** 3 * chain / (time.perf_counter() - start)

      torch_probe()  # first call: thread pool start-up
      self.probes["transformers"] = torch_probe
    self.samples: dict[str, list[float]] = {k: [] for k in self.probes}

  def sample(self) -> None:
    for name in self.probes:
      self.probe(name)

  def probe(self, name: str) -> float | None:
    """One timed matmul of framework `name` (None if it has no probe); recorded in samples."""
    if name not in self.probes:
      return None
    value = self.probes[name]()
    self.samples[name].append(value)
    return value

  def median(self, name: str) -> float | None:
    values = self.samples.get(name)
    return statistics.median(values) if values else None


def part_peak(peaks: PeakProbes, repeats: int = 5) -> dict[str, Any]:
  import jax  # pylint: disable=import-outside-toplevel

  from emola_jax.training import flops  # pylint: disable=import-outside-toplevel

  for _ in range(repeats):
    peaks.sample()
  kind = jax.devices()[0].device_kind
  table = flops.peak_flops(kind, peaks.dtype)
  out = {"dtype": peaks.dtype, "n": peaks.n, "chain": peaks.chain, "device_kind": kind,
         "table_flops": table,
         "measured_flops": {name: peaks.median(name) for name in peaks.probes}}
  print(f"\n## Matmul peak ({kind}, {peaks.dtype}, {peaks.n} x {peaks.n}, median of {repeats}; "
        "timed again before every train step for MFU)\n")
  names = {"emola-jax": "XLA (jitted jnp matmul)", "transformers": "PyTorch (torch.matmul)"}
  rows = [[names[k], _fmt(v / 1e12, 3)] for k, v in out["measured_flops"].items()]
  if table:
    rows.append([f"published peak ({flops.peak_key(kind)})", _fmt(table / 1e12, 1)])
  print(markdown_table(["matmul", "TFLOP/s"], rows))
  return out


def _devices():
  import jax  # pylint: disable=import-outside-toplevel

  available = jax.devices()
  if not 1 <= _NUM_DEVICES.value <= len(available):
    raise app.UsageError(f"--num_devices={_NUM_DEVICES.value}: {len(available)} device(s) "
                         "available")
  return available[:_NUM_DEVICES.value]


def _train_flops(config, cfg, batch: int, seq_len: int):
  from emola_jax.training import flops, param_groups  # pylint: disable=import-outside-toplevel

  return flops.step_flops(cfg, batch, seq_len, param_groups.parse_trainable(config.train.trainable),
                          config.train.target_logits_only)


def part_train(config, batch: int, seq_len: int, peaks: PeakProbes | None,
               table_peak: float | None, use_torch: bool) -> dict[str, Any]:
  from emola_jax.training import experiment  # pylint: disable=import-outside-toplevel

  cfg = experiment.model_config(config)
  batch_np = synthetic_batch(cfg, batch, seq_len, _SEED.value)
  sides: dict[str, Any] = {}
  first: dict[str, tuple[float, Any]] = {}
  setup_s = {}
  start = time.perf_counter()
  ours = JaxTrainer(config, batch_np, devices=_devices())
  setup_s["emola-jax"] = time.perf_counter() - start
  sides["emola-jax"] = ours
  with tempfile.TemporaryDirectory() as tmp:
    if use_torch:
      start = time.perf_counter()
      sides["transformers"] = TorchTrainer(ours, batch_np, tmp)
      setup_s["transformers"] = time.perf_counter() - start
    for name, side in sides.items():
      first[name] = timed(side.step)
    times: dict[str, list[float]] = {name: [] for name in sides}
    step_peaks: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(_STEPS.value):
      for name, side in sides.items():
        # The framework's own matmul peak right before each of its steps: under a shared
        # machine's changing load, each step is compared with the peak of its moment.
        peak = peaks.probe(name) if peaks is not None else None
        if peak:
          step_peaks[name].append(peak)
        times[name].append(timed(side.step)[0])
  step_flops = _train_flops(config, cfg, batch, seq_len)
  tokens = batch * seq_len
  result: dict[str, Any] = {
      "batch": batch, "seq_len": seq_len, "tokens_per_step": tokens, "steps": _STEPS.value,
      "model_flops_per_step": step_flops.model, "hardware_flops_per_step": step_flops.hardware,
      "flops_parts": step_flops.parts, "flops_extra": step_flops.extra,
      "remat_policy": cfg.remat_policy, "scan_layers": cfg.scan_layers, "dtype": cfg.dtype,
      "trainable": config.train.trainable, "num_devices": _NUM_DEVICES.value,
      "setup_seconds": setup_s, "sides": {}}
  rows = []
  for name, side in sides.items():
    median = statistics.median(times[name])
    entry = {"step_seconds": times[name], "median_step_seconds": median,
             "min_step_seconds": min(times[name]),
             "tokens_per_second": tokens / median, "samples_per_second": batch / median,
             "first_step_seconds": first[name][0], "first_step_loss": first[name][1]["loss"],
             "trainable_parameters": side.trainable_count(),
             "model_tflops_per_second": step_flops.model / median / 1e12}
    chips = _NUM_DEVICES.value if name == "emola-jax" else 1  # peaks are per chip
    if step_peaks[name]:
      per_step = [step_flops.model / (t * p * chips) for t, p in zip(times[name], step_peaks[name])]
      entry["matmul_peak_flops_per_step"] = step_peaks[name]
      entry["matmul_peak_flops"] = statistics.median(step_peaks[name]) * chips
      entry["mfu_per_step"] = per_step
      entry["mfu_vs_measured_peak"] = statistics.median(per_step)
      entry["hfu_vs_measured_peak"] = (statistics.median(per_step) * step_flops.hardware
                                       / step_flops.model)
    if table_peak and name == "emola-jax":
      entry["mfu_vs_published_peak"] = step_flops.model / median / (table_peak * chips)
    result["sides"][name] = entry
    rows.append([name, _fmt(median, 3), _fmt(tokens / median, 0),
                 _fmt(step_flops.model / median / 1e12, 3),
                 _fmt(entry["matmul_peak_flops"] / 1e12, 3) if step_peaks[name] else "-",
                 f"{entry['mfu_vs_measured_peak']:.1%}" if step_peaks[name] else "-",
                 f"{entry['mfu_vs_published_peak']:.1%}" if "mfu_vs_published_peak" in entry
                 else "-", _fmt(first[name][0], 1), f"{entry['first_step_loss']:.6f}",
                 f"{entry['trainable_parameters']:,}"])
  if use_torch:
    ours_e, theirs_e = result["sides"]["emola-jax"], result["sides"]["transformers"]
    result["speedup"] = ours_e["tokens_per_second"] / theirs_e["tokens_per_second"]
    result["speedup_paired_median"] = statistics.median(
        t / o for o, t in zip(ours_e["step_seconds"], theirs_e["step_seconds"]))
    result["first_loss_rel_diff"] = (abs(ours_e["first_step_loss"] - theirs_e["first_step_loss"])
                                     / abs(theirs_e["first_step_loss"]))
  print(f"\n## Train step ({cfg.dtype}, batch {batch} x {seq_len} tokens, trainable "
        f"{config.train.trainable}, remat {cfg.remat_policy}, scan {cfg.scan_layers}; "
        f"median of {_STEPS.value} interleaved steps; MFU: median over steps of model FLOPs / "
        "step time / the framework's own matmul peak timed just before the step)\n")
  print(markdown_table(["stack", "step s", "tokens/s", "model TFLOP/s",
                        "own matmul peak TFLOP/s", "MFU vs measured peak",
                        "MFU vs published peak", "first step s", "first-step loss",
                        "trainable params"], rows))
  print(f"\nmodel FLOPs/step {step_flops.model:.4g} (hardware {step_flops.hardware:.4g}): "
        + ", ".join(f"{k} {v / step_flops.model:.1%}" for k, v in step_flops.parts.items()))
  if use_torch:
    print(f"emola-jax / transformers tokens/s: {result['speedup']:.2f}x (median of the per-round "
          f"ratios {result['speedup_paired_median']:.2f}x); first-step losses differ by "
          f"{result['first_loss_rel_diff']:.1e} (relative)")
  del ours, sides
  gc.collect()
  return result


def _photo_examples(n: int, prior_dim: int, seed: int) -> list[dict[str, Any]]:
  """FABA-like examples: JPEG crops (300-512 px) of two real face photos, a stored prior."""
  import matplotlib.cbook  # pylint: disable=import-outside-toplevel
  import skimage.data  # pylint: disable=import-outside-toplevel
  from PIL import Image  # pylint: disable=import-outside-toplevel

  with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as f:
    photos = [Image.fromarray(skimage.data.astronaut()), Image.open(f).convert("RGB")]
  rng = np.random.default_rng(seed)
  answer = ("The person in the image appears happy: the lip corners are pulled up into a broad "
            "smile, the cheeks are raised and the eyes narrow slightly, which together make a "
            "genuine smile. The brows are relaxed and the forehead is smooth, so the overall "
            "expression reads as warm, friendly and at ease, a clear sign of contentment.")
  out = []
  for i in range(n):
    photo = photos[i % 2]
    w, h = photo.size
    side = int(rng.integers(300, min(w, h) + 1))
    left, top = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
    buf = io.BytesIO()
    photo.crop((left, top, left + side, top + side)).save(buf, format="JPEG", quality=90)
    out.append({"id": f"bench/{i}", "source": "bench", "task": "emotion",
                "image_bytes": buf.getvalue(),
                "prior": rng.uniform(0, 1, prior_dim).astype(np.float32),
                "conversations": [
                    {"from": "human", "value": "<image>\nWhat is the emotion of this face?"},
                    {"from": "gpt", "value": answer}],
                "label": "Happiness", "gpt4": answer})
  return out


def _train_tokenizer(directory: str, examples: list[dict[str, Any]]) -> str:
  """A LLaMA-format SentencePiece tokenizer (BPE, byte fallback) trained on the examples' text."""
  import sentencepiece as spm  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel

  from emola_jax.data.conversation import SYSTEM_PROMPT  # pylint: disable=import-outside-toplevel

  text = [SYSTEM_PROMPT] + [turn["value"] for ex in examples[:2] for turn in ex["conversations"]]
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(text * 20), model_writer=model, vocab_size=1000, model_type="bpe",
      byte_fallback=True, split_digits=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
      normalization_rule_name="identity", remove_extra_whitespaces=False,
      hard_vocab_limit=False, num_threads=1, minloglevel=2)
  with open(os.path.join(directory, "tokenizer.model"), "wb") as f:
    f.write(model.getvalue())
  transformers.LlamaTokenizer.from_pretrained(directory).save_pretrained(directory)
  return directory


def part_loader(config, batch: int, seq_len: int, demand: float | None) -> dict[str, Any]:
  from emola_jax.data import loader, priors  # pylint: disable=import-outside-toplevel
  from emola_jax.training import experiment  # pylint: disable=import-outside-toplevel

  cfg = experiment.model_config(config)
  examples = _photo_examples(32, cfg.prior_dim if cfg.has_prior else 1, _SEED.value)
  provider = (priors.make_prior_provider("npy", prior_dim=cfg.prior_dim) if cfg.has_prior
              else priors.make_prior_provider("none"))
  rows, settings = [], []
  with tempfile.TemporaryDirectory() as tmp:
    tokenizer = _train_tokenizer(tmp, examples)
    for workers in (int(w) for w in _LOADER_WORKERS.value):
      start = time.perf_counter()
      it = loader.make_loader(
          examples, tokenizer=tokenizer, **loader.loader_fields_from_config(cfg),
          prior_provider=provider, batch_size=batch, max_length=seq_len,
          image_mode=config.data.image_mode, num_epochs=None, shard_index=0, shard_count=1,
          worker_count=workers, prefetch=config.data.prefetch)
      next(it)
      first = time.perf_counter() - start
      elapsed, _ = timed(lambda: [next(it) for _ in range(_LOADER_BATCHES.value)])
      it.close()
      rate = _LOADER_BATCHES.value * batch / elapsed
      entry = {"workers": workers, "samples_per_second": rate, "first_batch_seconds": first}
      if demand:
        entry["times_demand"] = rate / demand
      settings.append(entry)
      rows.append([workers, _fmt(rate, 1), _fmt(demand, 2) if demand else "-",
                   f"{rate / demand:.1f}x" if demand else "-", _fmt(first, 1)])
  print(f"\n## Loader (batch {batch}, {seq_len} tokens, {cfg.vision.image_size} px, "
        f"{_LOADER_BATCHES.value} batches after the first)\n")
  print(markdown_table(["workers", "loader samples/s", "step demand samples/s",
                        "loader / demand", "first batch s"], rows))
  return {"batch": batch, "seq_len": seq_len, "demand_samples_per_second": demand,
          "settings": settings}


def part_decode(config) -> dict[str, Any]:
  import jax  # pylint: disable=import-outside-toplevel

  from emola_jax.conversion import hf_load  # pylint: disable=import-outside-toplevel
  from emola_jax.evaluation import bench_decode  # pylint: disable=import-outside-toplevel
  from emola_jax.evaluation.generate import Generator  # pylint: disable=import-outside-toplevel
  from emola_jax.training import experiment  # pylint: disable=import-outside-toplevel

  cfg = experiment.model_config(config)
  t = cfg.text
  image_size = _DECODE_IMAGE.value or cfg.vision.image_size
  slots = (image_size // bench_decode.PATCH) ** 2
  prompt_len = _DECODE_PROMPT.value
  if prompt_len < slots + 2:
    raise app.UsageError(f"--decode_prompt_len={prompt_len} cannot hold BOS, the {slots} image "
                         f"slots of a {image_size} px image and one text token")
  n_new = _DECODE_NEW.value
  hf = bench_decode.build_hf_model(t.num_layers, t.hidden_size, t.vocab_size, image_size,
                                   _SEED.value)
  with tempfile.TemporaryDirectory() as tmp:
    hf.save_pretrained(tmp)
    model, _ = hf_load.load_pretrained(tmp)
  generator = Generator(model)
  rows, results = [], []
  for batch in (int(b) for b in _DECODE_BATCHES.value):
    entry = bench_decode.compare(generator, hf, batch=batch, prompt_len=prompt_len,
                                 new_tokens=n_new, image_size=image_size,
                                 repeats=_DECODE_REPEATS.value, seed=_SEED.value + batch)
    results.append(entry)
    rows.append([batch, _fmt(entry["ours_tokens_per_second"], 0),
                 _fmt(entry["transformers_tokens_per_second"], 0), f"{entry['speedup']:.2f}x",
                 _fmt(entry["ours_first_call_seconds"], 1),
                 _fmt(entry["transformers_first_call_seconds"], 1), f"{entry['same_tokens']:.1%}"])
  print(f"\n## Greedy decoding (fp32, {jax.devices()[0].platform}; LLaMA {t.num_layers} x "
        f"{t.hidden_size}, vocab {t.vocab_size}, CLIP 2 x 64 at {image_size} px; prompt "
        f"{prompt_len} tokens, {n_new} new tokens, prefill included; median of "
        f"{_DECODE_REPEATS.value} interleaved calls)\n")
  print(markdown_table(["batch", "emola-jax tok/s", "transformers tok/s", "speed-up",
                        "emola-jax first call s", "transformers first call s", "same tokens"],
                       rows))
  del generator, model, hf
  gc.collect()
  return {"prompt_len": prompt_len, "new_tokens": n_new, "repeats": _DECODE_REPEATS.value,
          "batches": results}


def part_variants(config, batch: int, seq_len: int, peaks: PeakProbes | None,
                  table_peak: float | None) -> list[dict[str, Any]]:
  from emola_jax.training import experiment  # pylint: disable=import-outside-toplevel

  variants = []
  for spec in _VARIANTS.value:
    variant = config.copy_and_resolve_references()
    options: dict[str, Any] = {}
    for item in spec.split():
      if item.startswith("xla."):
        key, _, value = item[len("xla."):].partition("=")
        options[key] = {"true": True, "false": False}.get(value.lower(), value)
      else:
        parse_override(variant, item)
    cfg = experiment.model_config(variant)
    batch_np = synthetic_batch(cfg, batch, seq_len, _SEED.value)
    trainer = JaxTrainer(variant, batch_np, devices=_devices(), compiler_options=options)
    first, _ = timed(trainer.step)
    variants.append({"variant": spec or "(the config as is)", "trainer": trainer, "first": first,
                     "times": [], "peaks": [], "flops": _train_flops(variant, cfg, batch, seq_len)})
  for _ in range(_VARIANT_STEPS.value):  # round-robin: load drift hits every variant alike
    for v in variants:
      peak = peaks.probe("emola-jax") if peaks is not None else None
      v["peaks"].append(peak or table_peak)
      v["times"].append(timed(v["trainer"].step)[0])
  chips = _NUM_DEVICES.value
  rows, out = [], []
  tokens = batch * seq_len
  for v in variants:
    median = statistics.median(v["times"])
    entry = {"variant": v["variant"], "median_step_seconds": median, "step_seconds": v["times"],
             "min_step_seconds": min(v["times"]), "first_step_seconds": v["first"],
             "tokens_per_second": tokens / median, "model_flops_per_step": v["flops"].model,
             "hardware_flops_per_step": v["flops"].hardware, "peak_flops_per_step": v["peaks"]}
    if all(v["peaks"]):
      per_step = [v["flops"].model / (t * p * chips) for t, p in zip(v["times"], v["peaks"])]
      entry["mfu"] = statistics.median(per_step)
      entry["hfu"] = entry["mfu"] * v["flops"].hardware / v["flops"].model
    out.append(entry)
    rows.append([v["variant"], _fmt(median, 3), _fmt(min(v["times"]), 3),
                 _fmt(tokens / median, 0), f"{entry['mfu']:.1%}" if "mfu" in entry else "-",
                 f"{entry['hfu']:.1%}" if "hfu" in entry else "-", _fmt(v["first"], 1)])
    del v["trainer"]
  gc.collect()
  source = ("the matmul peak timed just before each step" if peaks is not None else
            "the published peak" if table_peak else "no peak (add --parts=peak)")
  print(f"\n## Train-step variants (batch {batch} x {seq_len}; {_VARIANT_STEPS.value} round-robin "
        f"steps each; MFU/HFU: median over steps, against {source}; HFU counts remat recompute "
        "and the masked attention half)\n")
  print(markdown_table(["variant", "median step s", "fastest step s", "tokens/s", "MFU", "HFU",
                        "first step s"], rows))
  return out


# ----------------------------------------------------------------------------- main


def _select_device(device: str) -> None:
  """Pins JAX to the CPU, or checks that a GPU is there; must run before JAX's first use."""
  import jax  # pylint: disable=import-outside-toplevel

  if device == "cpu":
    jax.config.update("jax_platforms", "cpu")
    return
  try:
    platform_name = jax.devices()[0].platform
  except RuntimeError as e:
    raise app.UsageError(f"--device=gpu: JAX found no GPU ({e}). Install the CUDA build: "
                         "pip install -U 'jax[cuda12]'") from None
  if platform_name != "gpu":
    raise app.UsageError(f"--device=gpu: JAX's default device is a {platform_name!r}; install "
                         "the CUDA build: pip install -U 'jax[cuda12]'")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  if config is None:
    raise app.UsageError("--config is required (configs/bench.py was not found beside the "
                         "package)")
  parts = [p.strip() for p in _PARTS.value]
  unknown = sorted(set(parts) - set(PARTS))
  if unknown:
    raise app.UsageError(f"--parts: unknown part(s) {unknown}; choose from {list(PARTS)}")
  device = _DEVICE.value
  if device == "gpu" and "decode" in parts:
    raise app.UsageError("--parts=decode compares against transformers on the CPU; run it with "
                         "--device=cpu")
  if _CPU_THREADS.value > 0:
    import torch  # pylint: disable=import-outside-toplevel
    torch.set_num_threads(_CPU_THREADS.value)
  _select_device(device)

  import jax  # pylint: disable=import-outside-toplevel

  from emola_jax.training import experiment, flops  # pylint: disable=import-outside-toplevel

  cfg = experiment.model_config(config)
  batch = _BATCH.value or config.train.batch_size
  seq_len = _SEQ_LEN.value or config.data.max_length
  use_torch = _TORCH.value and device == "cpu"
  meta = {
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "command": " ".join([os.path.basename(sys.executable), "-m", "emola_jax.bench",
                           *sys.argv[1:]]),
      "device": device, "device_kind": jax.devices()[0].device_kind,
      "platform": platform.platform(), "processor": _cpu_name(), "cpu_count": os.cpu_count(),
      "jax": jax.__version__, "load_average_before": load_average(),
      "model": {"vision": f"{cfg.vision.num_layers} x {cfg.vision.hidden_size} at "
                          f"{cfg.vision.image_size} px",
                "text": f"{cfg.text.num_layers} x {cfg.text.hidden_size}, mlp "
                        f"{cfg.text.intermediate_size}, vocab {cfg.text.vocab_size}",
                "lora_rank": cfg.lora.rank, "dtype": cfg.dtype}}
  if use_torch or "decode" in parts:
    import torch  # pylint: disable=import-outside-toplevel
    import transformers  # pylint: disable=import-outside-toplevel
    meta.update(torch=torch.__version__, transformers=transformers.__version__,
                torch_threads=torch.get_num_threads())
  print(f"emola-jax bench: {meta['device_kind']} ({meta['processor']}, {meta['cpu_count']} "
        f"cores), load average {meta['load_average_before']}; config model {meta['model']}",
        flush=True)
  results: dict[str, Any] = {"meta": meta}
  table_peak = flops.peak_flops(jax.devices()[0].device_kind, cfg.dtype)
  peaks = None
  if "peak" in parts:
    peaks = PeakProbes(cfg.dtype, device, with_torch=use_torch)
    results["peak"] = part_peak(peaks)
  demand = None
  if "train" in parts:
    results["train"] = part_train(config, batch, seq_len, peaks, table_peak, use_torch)
    demand = results["train"]["sides"]["emola-jax"]["samples_per_second"]
  if "loader" in parts:
    results["loader"] = part_loader(config, batch, seq_len, demand)
  if "decode" in parts:
    results["decode"] = part_decode(config)
  if "variants" in parts:
    results["variants"] = part_variants(config, batch, seq_len, peaks, table_peak)
  meta["load_average_after"] = load_average()
  print(f"\nload average before {meta['load_average_before']}, after "
        f"{meta['load_average_after']} ({meta['cpu_count']} cores)")
  if _OUTPUT.value:
    os.makedirs(os.path.dirname(os.path.abspath(_OUTPUT.value)), exist_ok=True)
    with open(_OUTPUT.value, "w") as f:
      json.dump(results, f, indent=2, default=float)
    print(f"wrote {_OUTPUT.value}")


def _cpu_name() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "unknown CPU"


def run():
  app.run(main)


if __name__ == "__main__":
  run()
