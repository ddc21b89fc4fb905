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
import functools
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
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from emola_jax.conversion import hf_load, native
from emola_jax.data import loader as loader_lib
from emola_jax.data import priors as priors_lib
from emola_jax.data import shards
from emola_jax.model.config import EmolaConfig
from emola_jax.model import sharding as logical
from emola_jax.model.emola import EmolaModel
from emola_jax.training import checkpointing, experiment, optimizer, param_groups, train_step
from emola_jax.training import flops as flops_lib
from emola_jax.training import mesh as mesh_lib
from emola_jax.training.metrics_log import MetricsLog


class NonFiniteLossError(RuntimeError):
  """The loss became NaN or infinite."""


def build_model(config: ml_collections.ConfigDict) -> tuple[EmolaModel, EmolaConfig]:
  """`config.init_from` loaded with the training-side fields of `config.model`.

  The loaded weights stay in host memory (`host_arrays`) until `build_split` places them: each
  device then receives its own slices, never the whole model.
  """
  cfg = experiment.model_config(config)
  overrides = {f: getattr(cfg, f) for f in experiment.TRAINING_MODEL_FIELDS}
  path = config.init_from
  if native.is_native_checkpoint(path):
    return native.load_native(path, seed=config.train.seed, host_arrays=True, **overrides)
  if os.path.isfile(os.path.join(path, "config.json")):
    overrides["lora"] = dataclasses.asdict(cfg.lora)
    model, loaded = hf_load.load_pretrained(path, seed=config.train.seed, host_arrays=True,
                                            **overrides)
    if not isinstance(model, EmolaModel):
      raise ValueError(f"--config.init_from={path} is not a LLaVA/EmoLA checkpoint")
    return model, loaded
  raise ValueError(f"--config.init_from={path}: neither an emola-jax checkpoint (config.json + "
                   "params/) nor a Hugging Face directory (config.json + safetensors)")


def build_split(config: ml_collections.ConfigDict, mesh, rules, *, abstract_only: bool = False
                ) -> tuple[param_groups.SplitModel, EmolaConfig, dict]:
  """The model's parameters placed on the mesh, cut into trained and frozen parts.

  Returns (split, model config, sharding of each parameter). A fresh model is initialised
  straight into its shardings; `abstract_only` returns shapes without allocating anything.
  """
  groups = param_groups.parse_trainable(config.train.trainable)
  if config.init_from and not abstract_only:
    model, cfg = build_model(config)
    shardings = mesh_lib.param_shardings(nnx.state(model), mesh, rules)
    split = param_groups.SplitModel.from_model(model, groups)
    split.trainable = mesh_lib.place(split.trainable, shardings)
    split.frozen = _cast(mesh_lib.place(split.frozen, shardings), config.train.frozen_param_dtype)
    return split, cfg, shardings
  cfg = experiment.model_config(config) if not config.init_from else _saved_config(config)
  make = lambda rngs: EmolaModel(cfg, rngs=rngs)
  abstract = nnx.eval_shape(lambda: make(nnx.Rngs(config.train.seed)))
  shardings = mesh_lib.param_shardings(nnx.state(abstract), mesh, rules)
  values = None
  if not abstract_only:
    values = mesh_lib.init_sharded(make, config.train.seed, shardings)
  else:
    values = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=shardings[k])
              for k, v in param_groups.to_flat(nnx.state(abstract)).items()}
  split = param_groups.SplitModel.from_model(abstract, groups, values)
  split.frozen = _cast(split.frozen, config.train.frozen_param_dtype)
  return split, cfg, shardings


def _cast(params: dict[str, Any], dtype: str) -> dict[str, Any]:
  """Frozen weights in another dtype (e.g. bf16: half the memory of fp32 for what never trains)."""
  if not dtype:
    return params
  return {k: (jax.ShapeDtypeStruct(v.shape, jnp.dtype(dtype), sharding=v.sharding)
              if isinstance(v, jax.ShapeDtypeStruct) else v.astype(dtype))
          for k, v in params.items()}


def _saved_config(config) -> EmolaConfig:
  """The model config an `init_from` checkpoint will have, without loading its weights."""
  cfg = experiment.model_config(config)
  overrides = {f: getattr(cfg, f) for f in experiment.TRAINING_MODEL_FIELDS}
  if native.is_native_checkpoint(config.init_from):
    return native.read_config(config.init_from).replace(**overrides)
  hf = hf_load.read_json(os.path.join(config.init_from, "config.json"))
  return hf_load.config_from_hf(hf).replace(**overrides)


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


def _model_batch(batch: dict[str, np.ndarray], cfg: EmolaConfig, mesh) -> dict[str, jax.Array]:
  """The arrays the step reads, as global arrays over the mesh."""
  out = {k: batch[k] for k in train_step.BATCH_KEYS if k in batch}
  if not cfg.has_prior:
    out.pop("prior", None)
  return mesh_lib.global_batch(out, mesh)


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
  """Whether to save and stop after this step because the job is being preempted (SIGTERM).

  One process: a SIGTERM handler sets a flag. Several processes: JAX's distributed runtime
  already watches for SIGTERM, and `reached_preemption_sync_point` makes every process agree on
  the same step, so all of them save that step together.
  """

  def __init__(self):
    self.requested = False
    self._multi = jax.process_count() > 1
    self._previous = None if self._multi else signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):  # pylint: disable=unused-argument
    logging.warning("SIGTERM received: saving a checkpoint after this step, then exiting")
    self.requested = True

  def check(self, step: int) -> bool:
    if self._multi:
      self.requested = multihost_utils.reached_preemption_sync_point(step)
    return self.requested

  def restore(self):
    if not self._multi:
      signal.signal(signal.SIGTERM, self._previous)


def _check_scored(unscored: float, where: str) -> None:
  if unscored:
    raise ValueError(
        f"{where}: {int(unscored)} target token(s) fell outside the positions "
        "--config.train.target_logits_only computes logits for (a row without its image slots "
        "but with more targets than T - 1 - image slots); set "
        "--config.train.target_logits_only=False for such data")


def evaluate(run: TrainSetup, params, frozen, config) -> dict[str, float]:
  """Mean token loss over the eval splits (padded to full batches: one compiled shape), and
  with `eval.generate` the FABA-Bench scores of generated answers (`S_re_<task>`, ...)."""
  loader, _ = make_data(config, run.cfg, experiment.eval_splits(config),
                        batch_size=config.eval.batch_size, train=False, seed=0)
  total, count = 0.0, 0.0
  for i, batch in enumerate(loader):
    if config.eval.max_batches and i >= config.eval.max_batches:
      break
    batch = _pad_rows(batch, config.eval.batch_size // jax.process_count())
    s, (c, unscored) = run.eval_fn(params, frozen, _model_batch(batch, run.cfg, run.mesh))
    _check_scored(float(unscored), f"eval batch {i}")
    total, count = total + float(s), count + float(c)
  scores = {"eval_loss": total / max(count, 1.0), "eval_tokens": count}
  if config.eval.generate:
    scores.update(generated_scores(run, params, frozen, config))
  return scores


def generated_scores(run: TrainSetup, params, frozen, config) -> dict[str, float]:
  """FABA-Bench scores (reference protocol) of greedy answers on the first
  `eval.max_examples` examples of each eval split, as emola-eval computes them."""
  # pylint: disable=import-outside-toplevel
  import transformers
  from emola_jax.cli import eval as eval_cli
  from emola_jax.evaluation import predict, scoring

  if jax.process_count() > 1:
    logging.warning("eval.generate runs on single-process jobs only; score the saved model "
                    "with emola-eval")
    return {}
  model = run.split.merge(params, frozen)
  tokenizer = transformers.AutoTokenizer.from_pretrained(config.data.tokenizer)
  loaded = predict.LoadedCheckpoint(model, run.cfg, tokenizer, "<training>",
                                    config.data.tokenizer, "native")
  predictor = predict.Predictor(loaded, batch_size=config.eval.batch_size,
                                max_new_tokens=config.eval.max_new_tokens)
  prompts = predict.PromptBuilder(tokenizer, run.cfg)
  out: dict[str, float] = {}
  for split in experiment.eval_splits(config):
    source = shards.ExampleSource(config.data.dir, [split])
    tasks = {source[i]["task"] for i in range(min(len(source), 4))}
    if len(tasks) != 1:
      raise ValueError(f"eval split {split!r} mixes tasks {sorted(tasks)}; use one split per task")
    task = tasks.pop()
    provider = make_prior_provider(config, run.cfg, source.prior_dim)
    preparer = eval_cli.ExamplePreparer(source, split, task, run.cfg, prompts, provider,
                                        record_prompt=False, image_mode=config.data.image_mode)
    n = min(len(source), config.eval.max_examples or len(source))
    records = [scoring.make_record({"prediction": o.text, "label": o.info["label"],
                                    "reference": o.info["reference"]}, f"{split}:{i}")
               for i, o in enumerate(predictor.run(range(n), preparer, desc=f"eval {split}",
                                                   progress=False))
               if o.status == predict.OK]
    result = (scoring.score_emotion(records, "reference") if task == "emotion"
              else scoring.score_au(records, "reference"))
    for key in ("S_re", "S_ge", "S_rege"):
      if result.get(key) is not None:
        out[f"{key}_{task}"] = float(result[key])
  return out


RNG_IMPLS = ("threefry2x32", "rbg", "unsafe_rbg")


@dataclasses.dataclass
class TrainSetup:
  """Everything the loop (or `emola-plan`) needs, placed on the mesh."""

  mesh: Any
  rules: Any
  cfg: EmolaConfig
  split: param_groups.SplitModel
  state: train_step.TrainState
  schedules: dict
  step_fn: Any  # jitted train step
  eval_fn: Any  # jitted eval step


def setup(config: ml_collections.ConfigDict, steps: int, *, abstract_only: bool = False,
          devices=None) -> TrainSetup:
  """Mesh, sharded parameters and optimizer state, and the jitted steps for `steps` steps."""
  if config.train.rng_impl not in RNG_IMPLS:
    raise ValueError(f"--config.train.rng_impl={config.train.rng_impl!r} is not one of "
                     f"{RNG_IMPLS}")
  mesh = mesh_lib.make_mesh(config, devices)
  rules = mesh_lib.rules_from_config(config)
  with jax.set_mesh(mesh), logical.logical_axis_rules(rules):
    split, cfg, _ = build_split(config, mesh, rules, abstract_only=abstract_only)
    tx, schedules = optimizer.make_optimizer(
        split.trainable, lr=config.train.lr, group_lrs=dict(config.train.group_lrs),
        total_steps=steps, warmup_ratio=config.train.warmup_ratio,
        weight_decay=config.train.weight_decay, max_grad_norm=config.train.max_grad_norm,
        b1=config.train.b1, b2=config.train.b2, eps=config.train.eps)
    replicated = NamedSharding(mesh, PartitionSpec())
    # Adam's moments take the sharding of their parameter; counters are replicated. (XLA cannot
    # infer this: zeros_like does not depend on the parameter's data.)
    opt_sh = _optimizer_shardings(jax.eval_shape(tx.init, split.trainable), split.trainable,
                                  replicated)
    init_opt = jax.jit(tx.init, out_shardings=opt_sh)
    opt_state = (jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
                              jax.eval_shape(tx.init, split.trainable), opt_sh)
                 if abstract_only else init_opt(split.trainable))
    step0 = (jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated) if abstract_only
             else jax.device_put(jnp.zeros((), jnp.int32), replicated))
    key_data = jax.random.key_data(jax.random.key(config.train.seed, impl=config.train.rng_impl))
    rng = (jax.ShapeDtypeStruct(key_data.shape, key_data.dtype, sharding=replicated)
           if abstract_only else jax.device_put(key_data, replicated))
    state = train_step.TrainState(step0, split.trainable, opt_state, rng)
  state_sh = jax.tree.map(lambda x: x.sharding, state)
  frozen_sh = jax.tree.map(lambda x: x.sharding, split.frozen)
  batch_sh = mesh_lib.batch_sharding(mesh)
  only_targets = config.train.target_logits_only
  step_fn = jax.jit(train_step.make_train_step(split, tx, config.train.micro_batches,
                                               target_logits_only=only_targets,
                                               rng_impl=config.train.rng_impl),
                    in_shardings=(state_sh, frozen_sh, batch_sh),
                    out_shardings=(state_sh, replicated), donate_argnums=(0,))
  eval_fn = jax.jit(train_step.make_eval_step(split, only_targets),
                    in_shardings=(state_sh.params, frozen_sh, batch_sh),
                    out_shardings=replicated)
  return TrainSetup(mesh, rules, cfg, split, state, schedules, step_fn, eval_fn)


def _peak_flops(config, cfg: EmolaConfig) -> float:
  """Peak FLOP/s of one device for MFU: `log.peak_tflops`, else the published figure of this
  accelerator for the compute dtype, else (CPUs, unknown chips) a measured matmul peak."""
  if config.log.peak_tflops > 0:
    return config.log.peak_tflops * 1e12
  published = flops_lib.peak_flops(jax.devices()[0].device_kind, cfg.dtype)
  return published or flops_lib.measured_peak_flops(cfg.dtype, n=1024, repeats=3)


def _optimizer_shardings(abstract_opt_state, params, replicated):
  """Each optimizer leaf stored under a parameter's name and shape gets that parameter's sharding."""

  def sharding_of(path, leaf):
    for key in path:
      name = getattr(key, "key", None)
      if name in params and params[name].shape == leaf.shape:
        return params[name].sharding
    return replicated

  return jax.tree_util.tree_map_with_path(sharding_of, abstract_opt_state)


def train(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs (or resumes) training; returns the last logged metrics."""
  os.makedirs(workdir, exist_ok=True)
  is_main = jax.process_index() == 0
  cfg = experiment.model_config(config) if not config.init_from else _saved_config(config)
  train_loader, num_examples = make_data(config, cfg, experiment.train_splits(config),
                                         batch_size=config.train.batch_size, train=True,
                                         seed=config.train.seed)
  steps = total_steps(config, num_examples)
  run = setup(config, steps)
  cfg, split, state = run.cfg, run.split, run.state
  counts = param_groups.counts_by_group(split.trainable)
  if is_main:
    print(f"trainable parameters: {sum(counts.values()):,} "
          f"({', '.join(f'{k} {v:,}' for k, v in counts.items())}); mesh "
          f"{dict(run.mesh.shape)} over {jax.device_count()} devices, "
          f"{jax.process_count()} process(es)", flush=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))
  frozen = split.frozen
  ckpt = checkpointing.TrainCheckpoints(
      workdir, keep=config.checkpoint.keep, async_save=config.checkpoint.async_save,
      best_metric=config.checkpoint.best_metric if experiment.eval_splits(config) else "",
      best_mode=config.checkpoint.best_mode)
  start = ckpt.latest_step()
  if start is not None:
    state = ckpt.restore(start, checkpointing.abstract_of(state), train_loader)
    if is_main:
      print(f"resumed from {workdir}/checkpoints/{start}", flush=True)
  start = int(state.step)

  log = MetricsLog(workdir, enabled=is_main, tensorboard=config.log.tensorboard,
                   progress=config.log.progress_bar, total=steps, initial=start)
  groups = param_groups.parse_trainable(config.train.trainable)
  peak = _peak_flops(config, cfg) * jax.device_count()
  step_flops = functools.lru_cache(maxsize=None)(
      lambda seq_len: flops_lib.step_flops(cfg, config.train.batch_size, seq_len, groups,
                                           config.train.target_logits_only).model)
  preemption = _Preemption()
  pending = None  # (step, metrics on device, tokens) of the step before the current one
  last: dict[str, Any] = {}
  window_tokens, window_flops, window_start = 0, 0.0, time.perf_counter()
  schedules = run.schedules

  def check(item) -> None:
    nonlocal last, window_tokens, window_flops, window_start
    step, metrics, tokens, seq_len = item
    metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
    if not (np.isfinite(metrics["loss"]) and np.isfinite(metrics["grad_norm"])):
      raise NonFiniteLossError(
          f"loss is {metrics['loss']} (gradient norm {metrics['grad_norm']}) at step {step}; "
          "stopping. The last good checkpoint is "
          f"{workdir}/checkpoints/{ckpt.latest_step()} (nothing after it was saved). Lower "
          "--config.train.lr, check the data, or use --config.model.dtype=float32.")
    _check_scored(metrics["unscored_targets"], f"step {step}")
    window_tokens += tokens
    window_flops += step_flops(seq_len)
    log.advance()
    if step % config.log.every_steps == 0 or step == steps:
      elapsed = time.perf_counter() - window_start
      last = {"step": step, **metrics,
              "learning_rate": float(schedules["default"](step - 1)),
              **{f"learning_rate_{g}": float(s(step - 1)) for g, s in schedules.items()
                 if g != "default"},
              "tokens_per_second": window_tokens / max(elapsed, 1e-9),
              "model_tflops_per_second": window_flops / max(elapsed, 1e-9) / 1e12,
              "mfu": window_flops / max(elapsed, 1e-9) / peak}
      log.write(last)
      window_tokens, window_flops, window_start = 0, 0.0, time.perf_counter()

  try:
    with jax.set_mesh(run.mesh), logical.logical_axis_rules(run.rules):
      for step in range(start + 1, steps + 1):
        batch = next(train_loader)
        tokens = int(batch["attention_mask"].sum()) * jax.process_count()
        state, metrics = run.step_fn(state, frozen, _model_batch(batch, cfg, run.mesh))
        if pending is not None:
          check(pending)
        pending = (step, metrics, tokens, batch["input_ids"].shape[1])
        boundary = (step % config.checkpoint.every_steps == 0 or step == steps
                    or preemption.check(step))
        do_eval = bool(experiment.eval_splits(config)) and (
            (config.eval.every_steps and step % config.eval.every_steps == 0) or step == steps)
        if boundary or do_eval:
          check(pending)
          pending = None
        if do_eval:
          scores = evaluate(run, state.params, frozen, config)
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
      if not os.path.exists(os.path.join(final_dir, native.CONFIG_FILE)):
        native.save_native(split.merge(state.params, frozen), final_dir,
                           tokenizer_dir=config.data.tokenizer or None)
      log.message(f"done: {steps} steps; model in {final_dir}")
      return last
  finally:
    preemption.restore()
    ckpt.close()
    log.close()
