"""The experiment config every file in `configs/` starts from, and its checks.

Every field has a sane default and every ablation is a field, overridable on the command line
(`--config.train.trainable=prior_only`, `--config.model.prior_position=before`,
`--config.model.lora.rank=64`, `--config.data.prior=dlib`). Unknown fields fail at parse time
(ml_collections' locked ConfigDict).
"""

from __future__ import annotations

import ml_collections

from emola_jax.model import presets
from emola_jax.model.config import EmolaConfig

TASKS = ("emotion", "au", "both")
# Model fields an experiment may change on top of an `init_from` checkpoint; the shapes of the
# vision tower and decoder always come from the checkpoint.
TRAINING_MODEL_FIELDS = ("lora", "prior_position", "prior_dim", "dtype", "param_dtype",
                         "remat_policy", "scan_layers", "attention_impl", "attention_query_block")


def base_config(model_preset: str = "tiny") -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  # Every model field, so that each can be overridden from the command line.
  c.model = ml_collections.ConfigDict(presets.get(model_preset).to_dict())
  # A native emola-jax checkpoint or a Hugging Face LLaVA directory; "" = fresh init from `seed`.
  c.init_from = ""
  c.task = "emotion"

  c.data = ml_collections.ConfigDict()
  c.data.dir = ""  # output folder of emola-prepare
  c.data.train_splits = ""  # comma-separated; "" = "<task>_train" ("emotion_train,au_train")
  c.data.eval_splits = ""  # "" = no evaluation
  c.data.tokenizer = ""  # a `transformers` tokenizer folder (LLaMA SentencePiece)
  c.data.max_length = 2048
  c.data.length_buckets = ()
  c.data.image_mode = "pad"  # pad | crop
  c.data.prior = "npy"  # npy | dlib | face_alignment
  c.data.prior_weights = ""  # face_alignment FAN weights file
  c.data.detect_faces = False
  c.data.worker_count = 0
  c.data.prefetch = 2

  c.train = ml_collections.ConfigDict()
  c.train.trainable = "emola"  # a preset of param_groups.TRAINABLE_PRESETS or "lora,projector"
  c.train.batch_size = 64  # global, over all processes and micro-batches
  c.train.micro_batches = 1  # gradient accumulation
  c.train.num_epochs = 1
  c.train.num_steps = 0  # > 0 overrides num_epochs
  c.train.lr = 1e-4
  c.train.group_lrs = ml_collections.ConfigDict({"projector": 2e-5})
  c.train.warmup_ratio = 0.03
  c.train.weight_decay = 0.0
  c.train.max_grad_norm = 1.0
  c.train.b1 = 0.9
  c.train.b2 = 0.999
  c.train.eps = 1e-8
  c.train.seed = 1
  # The LM head (and softmax) only at positions whose next token is a target: the same loss, at
  # most T - 1 - image slots positions per row. False: every position, as `transformers` does.
  c.train.target_logits_only = True
  # The PRNG behind LoRA dropout: "threefry2x32" (JAX's default: the same masks under any
  # sharding), "rbg" or "unsafe_rbg" (XLA's RngBitGenerator, MaxText's default; no consistent
  # gain on the 2-core CPU, BENCHMARKS.md). model.lora.dropout_masks=hash bypasses its bits.
  # Checkpoints keep the key data, so resume with the same choice.
  c.train.rng_impl = "threefry2x32"
  # dtype of the frozen weights ("" = model.param_dtype); "bfloat16" halves their memory while
  # what trains keeps fp32 master weights.
  c.train.frozen_param_dtype = ""

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every_steps = 500
  c.checkpoint.keep = 3
  c.checkpoint.async_save = True
  c.checkpoint.best_metric = "eval_loss"
  c.checkpoint.best_mode = "min"

  c.log = ml_collections.ConfigDict()
  c.log.every_steps = 10
  c.log.tensorboard = True
  c.log.progress_bar = True
  # Peak TFLOP/s of one device for the logged MFU; 0 = the published figure of the accelerator
  # for model.dtype, or a measured matmul peak where none is published (CPUs).
  c.log.peak_tflops = 0.0

  # Device mesh (-1 = the remaining devices) and logical-axis rules (emola_jax/training/mesh.py):
  # data=-1 is data parallel, fsdp=-1 is FSDP (ZeRO-3), fsdp=-1 with tensor=T adds tensor
  # parallelism.
  c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
  c.sharding_rules = "fsdp_tp"

  c.eval = ml_collections.ConfigDict()
  c.eval.every_steps = 0  # 0 = only at the end (when eval_splits is set)
  c.eval.max_batches = 0  # 0 = the whole eval split
  c.eval.batch_size = 8
  # Also generate answers and score them with the FABA-Bench rules (S_re_<task>, S_ge_<task>,
  # S_rege_<task>); e.g. --config.checkpoint.best_metric=S_rege_emotion --config.checkpoint.best_mode=max
  c.eval.generate = False
  c.eval.max_examples = 64  # per eval split, for generate; 0 = all
  c.eval.max_new_tokens = 256
  return c


def model_config(config: ml_collections.ConfigDict) -> EmolaConfig:
  try:
    return EmolaConfig.from_dict(config.model.to_dict())
  except (TypeError, ValueError) as e:
    raise ValueError(f"--config.model: {e}") from None


def train_splits(config: ml_collections.ConfigDict) -> list[str]:
  if config.task not in TASKS:
    raise ValueError(f"--config.task={config.task!r} is not one of {TASKS}")
  if config.data.train_splits:
    return [s.strip() for s in config.data.train_splits.split(",") if s.strip()]
  tasks = ("emotion", "au") if config.task == "both" else (config.task,)
  return [f"{t}_train" for t in tasks]


def eval_splits(config: ml_collections.ConfigDict) -> list[str]:
  return [s.strip() for s in config.data.eval_splits.split(",") if s.strip()]
