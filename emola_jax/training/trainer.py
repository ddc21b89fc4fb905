"""The training loop behind `emola-train`: model, data, optimizer, checkpoints, metrics.

One loop serves every stage; the config says what trains. Order of work per step: fetch a
batch, dispatch the jitted step, then read the *previous* step's metrics (so the host never
waits on the step it just queued). A non-finite loss stops the run before anything is saved,
so the last checkpoint on disk is the last good one. SIGTERM (preemption) finishes the current
step, saves, and exits cleanly; a restart on the same workdir resumes from the latest checkpoint
with the same data stream, RNG and optimizer state.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import nnx

from emola_jax.conversion import hf_load, native
from emola_jax.data import loader as loader_lib
from emola_jax.data import priors as priors_lib
from emola_jax.data import shards
from emola_jax.model.config import EmolaConfig
from emola_jax.model.emola import EmolaModel
from emola_jax.training import checkpointing, experiment, optimizer, param_groups, train_step
from emola_jax.training.metrics_log import MetricsLog


class NonFiniteLossError(RuntimeError):
  """The loss became NaN or infinite."""


def build_model(config: ml_collections.ConfigDict) -> tuple[EmolaModel, EmolaConfig]:
  """A fresh model from `config.model`, or `config.init_from` with the training-side fields."""
  cfg = experiment.model_config(config)
  if not config.init_from:
    return EmolaModel(cfg, rngs=nnx.Rngs(config.train.seed)), cfg
  overrides = {f: getattr(cfg, f) for f in experiment.TRAINING_MODEL_FIELDS}
  path = config.init_from
  if native.is_native_checkpoint(path):
    return native.load_native(path, seed=config.train.seed, **overrides)
  if os.path.isfile(os.path.join(path, "config.json")):
    overrides["lora"] = dataclasses.asdict(cfg.lora)
    model, loaded = hf_load.load_pretrained(path, seed=config.train.seed, **overrides)
    if not isinstance(model, EmolaModel):
      raise ValueError(f"--config.init_from={path} is not a LLaVA/EmoLA checkpoint")
    return model, loaded
  raise ValueError(f"--config.init_from={path}: neither an emola-jax checkpoint (config.json + "
                   "params/) nor a Hugging Face directory (config.json + safetensors)")


def trainable_counts(config: ml_collections.ConfigDict,
                     cfg: EmolaConfig | None = None) -> dict[str, int]:
  """Trained parameters per group, from shapes alone (nothing is allocated)."""
  cfg = experiment.model_config(config) if cfg is None else cfg
  abstract = nnx.eval_shape(lambda: EmolaModel(cfg, rngs=nnx.Rngs(0)))
  groups = param_groups.parse_trainable(config.train.trainable)
  return param_groups.counts_by_group(
      {k: v for k, v in param_groups.to_flat(nnx.state(abstract)).items()
       if param_groups.group_of(k) in groups})


def make_data(config, cfg: EmolaConfig, splits: list[str], *, batch_size: int, train: bool,
              seed: int) -> tuple[loader_lib.LoaderIterator, int]:
  """(the loader for this process, number of examples in the splits)."""
  if not config.data.dir:
    raise ValueError("--config.data.dir is empty: point it at the output folder of emola-prepare")
  if not config.data.tokenizer:
    raise ValueError("--config.data.tokenizer is empty: a transformers tokenizer folder")
  source = shards.ExampleSource(config.data.dir, splits)
  provider = make_prior_provider(config, cfg, source.prior_dim)
  if batch_size % jax.process_count():
    raise ValueError(f"batch size {batch_size} is not divisible by {jax.process_count()} processes")
  loader = loader_lib.make_loader(
      source, tokenizer=config.data.tokenizer, **loader_lib.loader_fields_from_config(cfg),
      prior_provider=provider, batch_size=batch_size // jax.process_count(),
      max_length=config.data.max_length, image_mode=config.data.image_mode, seed=seed,
      shuffle=train, num_epochs=None if train else 1, drop_remainder=train,
      length_buckets=tuple(config.data.length_buckets), worker_count=config.data.worker_count,
      prefetch=config.data.prefetch)
  return loader, len(source)


def make_prior_provider(config, cfg: EmolaConfig, stored_dim: int) -> priors_lib.PriorProvider:
  """The configured prior provider, checked against the model's prior_dim."""
  name = config.data.prior if cfg.has_prior else "none"
  kwargs = {}
  if name == "npy":
    kwargs["prior_dim"] = stored_dim
  elif name in ("dlib", "face_alignment"):
    kwargs["detect"] = config.data.detect_faces
    if name == "face_alignment":
      kwargs["weights_path"] = config.data.prior_weights or None
  provider = priors_lib.make_prior_provider(name, **kwargs)
  if cfg.has_prior and provider.prior_dim != cfg.prior_dim:
    raise ValueError(f"the {name!r} prior has {provider.prior_dim} dimensions (data: "
                     f"{config.data.dir}) but --config.model.prior_dim={cfg.prior_dim}")
  return provider


def total_steps(config, num_examples: int) -> int:
  if config.train.num_steps > 0:
    return config.train.num_steps
  steps = config.train.num_epochs * num_examples // config.train.batch_size
  if steps < 1:
    raise ValueError(f"{num_examples} training examples make no full batch of "
                     f"{config.train.batch_size}; lower --config.train.batch_size")
  return steps


def _device_batch(batch: dict[str, np.ndarray], cfg: EmolaConfig) -> dict[str, jax.Array]:
  out = {k: batch[k] for k in train_step.BATCH_KEYS if k in batch}
  if not cfg.has_prior:
    out.pop("prior", None)
  return jax.device_put(out)


def _pad_rows(batch: dict[str, np.ndarray], rows: int) -> dict[str, np.ndarray]:
  """Fills a short last batch with copies of its first row that carry no loss."""
  missing = rows - len(batch["input_ids"])
  if missing <= 0:
    return batch
  out = {k: np.concatenate([v, np.repeat(v[:1], missing, axis=0)]) for k, v in batch.items()
         if isinstance(v, np.ndarray) and v.ndim >= 1 and len(v) == rows - missing}
  out["loss_mask"][rows - missing:] = 0
  return out


class _Preemption:
  """Turns SIGTERM into a flag the loop checks after each step."""

  def __init__(self):
    self.requested = False
    self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):  # pylint: disable=unused-argument
    logging.warning("SIGTERM received: saving a checkpoint after this step, then exiting")
    self.requested = True

  def restore(self):
    signal.signal(signal.SIGTERM, self._previous)


def evaluate(eval_step, params, frozen, config, cfg, splits) -> dict[str, float]:
  """Mean token loss over the eval splits (padded to full batches: one compiled shape)."""
  loader, _ = make_data(config, cfg, splits, batch_size=config.eval.batch_size, train=False,
                        seed=0)
  total, count = 0.0, 0.0
  for i, batch in enumerate(loader):
    if config.eval.max_batches and i >= config.eval.max_batches:
      break
    batch = _pad_rows(batch, config.eval.batch_size)
    s, c = eval_step(params, frozen, _device_batch(batch, cfg))
    total, count = total + float(s), count + float(c)
  return {"eval_loss": total / max(count, 1.0), "eval_tokens": count}


def train(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs (or resumes) training; returns the last logged metrics."""
  os.makedirs(workdir, exist_ok=True)
  is_main = jax.process_index() == 0
  model, cfg = build_model(config)
  groups = param_groups.parse_trainable(config.train.trainable)
  split = param_groups.SplitModel.from_model(model, groups)
  del model
  counts = param_groups.counts_by_group(split.trainable)
  logging.info("trainable parameters: %s = %s (groups %s)", f"{sum(counts.values()):,}",
               {k: f"{v:,}" for k, v in counts.items()}, groups)
  if is_main:
    print(f"trainable parameters: {sum(counts.values()):,} "
          f"({', '.join(f'{k} {v:,}' for k, v in counts.items())})", flush=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))

  train_loader, num_examples = make_data(config, cfg, experiment.train_splits(config),
                                         batch_size=config.train.batch_size, train=True,
                                         seed=config.train.seed)
  steps = total_steps(config, num_examples)
  tx, schedules = optimizer.make_optimizer(
      split.trainable, lr=config.train.lr, group_lrs=dict(config.train.group_lrs),
      total_steps=steps, warmup_ratio=config.train.warmup_ratio,
      weight_decay=config.train.weight_decay, max_grad_norm=config.train.max_grad_norm,
      b1=config.train.b1, b2=config.train.b2, eps=config.train.eps)
  state = train_step.TrainState(jnp.zeros((), jnp.int32), split.trainable,
                                tx.init(split.trainable),
                                jax.random.PRNGKey(config.train.seed))
  frozen = split.frozen
  ckpt = checkpointing.TrainCheckpoints(
      workdir, keep=config.checkpoint.keep, async_save=config.checkpoint.async_save,
      best_metric=config.checkpoint.best_metric if experiment.eval_splits(config) else "",
      best_mode=config.checkpoint.best_mode)
  start = ckpt.latest_step()
  if start is not None:
    state = ckpt.restore(start, checkpointing.abstract_of(state), train_loader)
    logging.info("resumed from step %d", start)
    if is_main:
      print(f"resumed from {workdir}/checkpoints/{start}", flush=True)
  start = int(state.step)

  step_fn = jax.jit(train_step.make_train_step(split, tx, config.train.micro_batches),
                    donate_argnums=(0,))
  eval_fn = jax.jit(train_step.make_eval_step(split))
  log = MetricsLog(workdir, enabled=is_main, tensorboard=config.log.tensorboard,
                   progress=config.log.progress_bar, total=steps, initial=start)
  preemption = _Preemption()
  pending = None  # (step, metrics on device, tokens) of the step before the current one
  last: dict[str, Any] = {}
  window_tokens, window_start = 0, time.perf_counter()

  def check(item) -> None:
    nonlocal last, window_tokens, window_start
    step, metrics, tokens = item
    metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
    if not np.isfinite(metrics["loss"]):
      raise NonFiniteLossError(
          f"loss is {metrics['loss']} at step {step}; stopping. The last good checkpoint is "
          f"{workdir}/checkpoints/{ckpt.latest_step()} (nothing after it was saved). Lower "
          "--config.train.lr, check the data, or use --config.model.dtype=float32.")
    window_tokens += tokens
    log.advance()
    if step % config.log.every_steps == 0 or step == steps:
      elapsed = time.perf_counter() - window_start
      last = {"step": step, **metrics,
              "learning_rate": float(schedules["default"](step - 1)),
              **{f"learning_rate_{g}": float(s(step - 1)) for g, s in schedules.items()
                 if g != "default"},
              "tokens_per_second": window_tokens / max(elapsed, 1e-9)}
      log.write(last)
      window_tokens, window_start = 0, time.perf_counter()

  try:
    for step in range(start + 1, steps + 1):
      batch = next(train_loader)
      tokens = int(batch["attention_mask"].sum()) * jax.process_count()
      state, metrics = step_fn(state, frozen, _device_batch(batch, cfg))
      if pending is not None:
        check(pending)
      pending = (step, metrics, tokens)
      boundary = (step % config.checkpoint.every_steps == 0 or step == steps
                  or preemption.requested)
      do_eval = (experiment.eval_splits(config) and
                 ((config.eval.every_steps and step % config.eval.every_steps == 0)
                  or step == steps))
      if boundary or do_eval:
        check(pending)
        pending = None
      if do_eval:
        scores = evaluate(eval_fn, state.params, frozen, config, cfg,
                          experiment.eval_splits(config))
        log.write({"step": step, **scores})
        ckpt.save_best(step, state.params, scores)
      if boundary:
        ckpt.save(step, state, train_loader)
      if preemption.requested:
        ckpt.wait()
        log.message(f"preempted: saved step {step}; rerun the same command to resume")
        return last
    if pending is not None:
      check(pending)
    ckpt.wait()
    final_dir = os.path.join(workdir, "final")
    if not os.path.exists(final_dir):
      native.save_native(split.merge(state.params, frozen), final_dir,
                         tokenizer_dir=config.data.tokenizer or None)
    log.message(f"done: {steps} steps; model in {final_dir}")
    return last
  finally:
    preemption.restore()
    ckpt.close()
    log.close()
