"""LLaVA-1.5 stage 2: instruction tuning of the projector and the full language model.

lr 2e-5, global batch 128, 1 epoch, cosine with 3% warm-up, no prior token. With
`--config.model.prior_position=after` this is the fully fine-tuned EmoLA variant.

  emola-train --config=configs/llava_finetune.py --workdir=runs/finetune \
      --config.init_from=STAGE1_CKPT --config.data.dir=DATA --config.data.train_splits=train \
      --config.data.tokenizer=TOKENIZER
"""

from emola_jax.training.experiment import base_config


def get_config():
  c = base_config("llava_7b")
  c.train.trainable = "projector_llm"
  c.train.batch_size = 128
  c.train.lr = 2e-5
  c.train.group_lrs = {}
  return c
