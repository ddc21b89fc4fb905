"""The `bench` config: EmoLA LoRA tuning at shapes where the matmuls dominate, sized for a CPU.

A 4-layer CLIP ViT-L-wide tower at 224 px (patch 14: 256 visual tokens, 3 layers run because
LLaVA reads the penultimate layer), the mlp2x_gelu projector, the prior token, and a 4-layer,
1024-wide LLaMA (16 heads, SwiGLU 2816 = LLaMA's own rule for width 1024: 2/3 x 4 x 1024 rounded
up to a multiple of 256; vocabulary 32000), sequence 512, with EmoLA's recipe (LoRA r128 /
alpha 256 / dropout 0.05 on all seven projections; LoRA, projector and prior projector train).
fp32 compute: on this CPU bf16 matmuls run in neither framework at speed. One train step is
about 1 TFLOP at batch 4. The speed options below (no remat, unrolled layers, einsum attention,
hash dropout masks) were chosen by side-by-side measurement on the 2-core CPU (BENCHMARKS.md);
none changes the function computed.

  python -m emola_jax.bench --config=configs/bench.py
  emola-train --config=configs/bench.py --workdir=/tmp/bench_run --config.data.dir=DATA \
      --config.data.tokenizer=TOKENIZER_DIR   (any prepared data; images are resized to 224 px)
"""

from emola_jax.training.experiment import base_config


def get_config():
  c = base_config("emola_7b")
  c.model.vision.num_layers = 4
  c.model.vision.image_size = 224
  c.model.text.num_layers = 4
  c.model.text.hidden_size = 1024
  c.model.text.intermediate_size = 2816
  c.model.text.num_heads = 16
  c.model.text.num_kv_heads = 16
  c.model.lora.rank = 128
  c.model.lora.alpha = 256.0
  c.model.lora.dropout = 0.05
  c.model.dtype = "float32"
  c.model.param_dtype = "float32"
  # Measured on the 2-core CPU (python -m emola_jax.bench --parts=variants): see BENCHMARKS.md.
  c.model.remat_policy = "none"
  # Unrolled: no stacking of residuals into scan buffers (4.96 vs 5.24 s side by side with the
  # hash masks below; with threefry masks the scan had been faster).
  c.model.scan_layers = False
  c.model.attention_impl = "einsum"  # heads-first, causal query blocks of 256
  c.model.lora.dropout_masks = "hash"  # ~40x cheaper masks than jax.random.bernoulli here
  c.train.trainable = "emola"
  c.train.batch_size = 4
  c.train.num_steps = 10
  c.train.lr = 1e-4
  c.train.group_lrs.projector = 2e-5
  c.data.max_length = 512
  c.log.progress_bar = False
  return c
