"""The demo: a tiny EmoLA trained from scratch on synthetic faces, both tasks in one model, on a CPU.

Same architecture as the paper's model at toy scale: a CLIP ViT (64 px, 32 px patches: 4 visual
tokens), an MLP projector, one landmark-prior token (the synthetic 68-point prior, 136-d,
standardised) AFTER the visual tokens, and a small LLaMA decoder over a 2k-id domain tokenizer
(emola_jax/data/train_tokenizer.py). Nothing is pre-trained, so everything trains
(`trainable=all`). `python -m emola_jax.demo` (or `./demo.sh`) runs this config end to end; by
hand:

  emola-train --config=configs/demo.py --workdir=runs/demo \
      --config.data.dir=DEMO/prepared --config.data.tokenizer=DEMO/tokenizer

Ablation (plain LLaVA, no prior token): `--config.model.prior_position=none`.
"""

from emola_jax.training.experiment import base_config

# The tokenizer holds ids 0..IMAGE_TOKEN_INDEX-1, so the image placeholder is the last embedding
# row and never collides with a text id.
VOCAB_SIZE = 2048
IMAGE_TOKEN_INDEX = VOCAB_SIZE - 1
PRIOR_DIM = 136  # 68 landmarks x (x, y) of the synthetic generator


def get_config():
  c = base_config("tiny")
  m = c.model
  m.vision.image_size = 64
  # 4 visual tokens. Measured: with 16 (16 px patches) the model from scratch starts to read the
  # prior token only after ~600 steps instead of ~300, the random visual tokens drowning it.
  m.vision.patch_size = 32
  m.vision.hidden_size = 64
  m.vision.intermediate_size = 256
  m.vision.num_layers = 2
  m.vision.num_heads = 4
  m.vision.select_layer = -1  # from scratch there is no reason to skip the last layer
  m.text.vocab_size = VOCAB_SIZE
  m.text.hidden_size = 128
  m.text.intermediate_size = 384
  m.text.num_layers = 3
  m.text.num_heads = 4
  m.text.num_kv_heads = 4
  m.text.max_position_embeddings = 512
  m.image_token_index = IMAGE_TOKEN_INDEX
  m.prior_position = "after"
  m.prior_dim = PRIOR_DIM
  m.dtype = "float32"
  m.remat_policy = "none"

  c.task = "both"
  # With the demo tokenizer a sample (5 image slots included) is 35-55 ids (emotion) or 40-115
  # (AU); most mixed batches of 16 fit in 80. Two compiled shapes.
  c.data.max_length = 120
  c.data.length_buckets = (80, 120)
  c.data.prior = "npy"

  c.train.trainable = "all"
  # Measured (docs/demo.md): the model starts to read the prior token after ~200-400 steps; by
  # ~800 it names the emotion of nearly every held-out face. lr 5e-3 was slower, not faster.
  c.train.batch_size = 16
  c.train.num_steps = 1500
  c.train.lr = 3e-3
  c.train.group_lrs.projector = 3e-3
  c.train.warmup_ratio = 0.05
  c.train.weight_decay = 0.0
  c.train.seed = 0
  # 5 image slots of 120 positions: computing logits only before targets saves nothing here and
  # its gathers cost ~10% of a step (bench --parts=variants on this config: 0.291 s vs 0.261 s).
  c.train.target_logits_only = False

  c.checkpoint.every_steps = 10_000  # only the end of the run
  c.checkpoint.keep = 1
  c.checkpoint.async_save = False
  c.log.every_steps = 25
  c.log.tensorboard = False
  c.log.progress_bar = True
  c.eval.batch_size = 32
  return c
