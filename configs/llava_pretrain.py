"""LLaVA-1.5 stage 1: train the visual projector alone on image-caption pairs.

lr 1e-3, global batch 256, 1 epoch, cosine with 3% warm-up, no prior token; start from Vicuna
plus CLIP (`--config.init_from` = a LLaVA directory, or compose one with emola_jax.load_pretrained
from a LLaMA and a CLIP directory and save it with `emola-convert`).

  emola-train --config=configs/llava_pretrain.py --workdir=runs/pretrain \
      --config.init_from=CKPT --config.data.dir=DATA --config.data.train_splits=train \
      --config.data.tokenizer=TOKENIZER
"""

from emola_jax.training.experiment import base_config


def get_config():
  c = base_config("llava_7b")
  c.train.trainable = "projector"
  c.train.batch_size = 256
  c.train.lr = 1e-3
  c.train.group_lrs = {}
  c.data.image_mode = "crop"  # LLaVA-1.5 pre-training does not pad images
  return c
