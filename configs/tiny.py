"""The tiny config: every code path of EmoLA LoRA tuning, in seconds on a CPU (tests, CI).

  emola-train --config=configs/tiny.py --workdir=/tmp/run \
      --config.data.dir=DATA --config.data.tokenizer=DATA/tokenizer
"""

from emola_jax.training.experiment import base_config


def get_config():
  c = base_config("tiny")
  c.model.lora.rank = 4
  c.model.lora.alpha = 8.0
  c.data.max_length = 128
  c.train.batch_size = 4
  c.train.num_steps = 6
  c.train.lr = 1e-3
  c.train.group_lrs.projector = 2e-4
  c.checkpoint.every_steps = 2
  c.checkpoint.async_save = False
  c.log.every_steps = 1
  c.log.progress_bar = False
  c.eval.batch_size = 4
  return c
