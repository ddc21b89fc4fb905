"""EmoLA's recipe (paper Sec. 4, supplementary): LoRA tuning of LLaVA-1.5-7B with the prior token.

LoRA r128 / alpha 256 / dropout 0.05 on q, k, v, o, gate, up, down of every decoder layer; the
visual projector (lr 2e-5) and the prior projector (lr 1e-4) train; CLIP and the base LLM are
frozen. AdamW, lr 1e-4, cosine with 3% warm-up, weight decay 0, global batch 64, 1 epoch, bf16,
max length 2048, seed 1.

  emola-train --config=configs/emola_lora.py --workdir=runs/emola_emotion \
      --config.init_from=/ckpt/llava-v1.5-7b-hf --config.task=emotion \
      --config.data.dir=/data/faba_prepared --config.data.tokenizer=/ckpt/llava-v1.5-7b-hf

Argument: the task, e.g. `--config=configs/emola_lora.py:au` (default emotion; `both` = the
multi-task model of supplementary Tab. 4).
"""

from emola_jax.training.experiment import base_config


def get_config(task: str = "emotion"):
  c = base_config("emola_7b")
  c.task = task
  c.model.lora.rank = 128
  c.model.lora.alpha = 256.0
  c.model.lora.dropout = 0.05
  c.model.dtype = "bfloat16"
  c.model.param_dtype = "float32"
  c.model.remat_policy = "full"
  c.train.trainable = "emola"
  c.train.batch_size = 64
  c.train.num_epochs = 1
  c.train.lr = 1e-4
  c.train.group_lrs.projector = 2e-5
  c.train.warmup_ratio = 0.03
  c.train.weight_decay = 0.0
  c.train.seed = 1
  c.train.frozen_param_dtype = "bfloat16"  # CLIP and the base LLM never train
  c.data.max_length = 2048
  c.data.prior = "npy"
  return c
