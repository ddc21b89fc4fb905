"""FLOP accounting of the train step: hand counts, XLA's own count, the peak table and MFU.

The hand counts below are written out matmul by matmul (2*M*K*N each) for one tiny config, so a
wrong rule in `flops.step_flops` (a missing backward pass, a frozen weight given a weight
gradient, attention not halved, LoRA counted as a dense delta) shows up as a number mismatch.
The XLA comparison compiles the real train step and reads `cost_analysis()["flops"]`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax
import pytest
from flax import nnx

from emola_jax.model.config import EmolaConfig
from emola_jax.model.emola import EmolaModel
from emola_jax.training import flops, param_groups, train_step

EMOLA = ("lora", "projector", "prior_projector")


def _hand_config(**changes) -> EmolaConfig:
  """CLIP 8 wide (1 of 2 layers run), 28 px / patch 14 (4 patches); LLaMA 1 layer, 16 wide,
  4 heads of 4, 2 KV heads, MLP 24, vocab 32; LoRA rank 2 on all seven projections."""
  return EmolaConfig.from_dict(dict(
      vision=dict(hidden_size=8, intermediate_size=16, num_layers=2, num_heads=2, image_size=28,
                  patch_size=14),
      text=dict(vocab_size=32, hidden_size=16, intermediate_size=24, num_layers=1, num_heads=4,
                num_kv_heads=2, max_position_embeddings=64),
      lora=dict(rank=2, alpha=4.0), prior_dim=6, image_token_index=31)).replace(**changes)


def mm(m, k, n):
  return 2 * m * k * n


# Batch 2, sequence 10: N = 20 decoder positions, 8 patch rows, 10 CLIP rows (class token).
B, T, N = 2, 10, 20
VISION_FWD = (mm(8, 3 * 14 * 14, 8)  # patch embedding
              + 4 * mm(10, 8, 8) + mm(10, 8, 16) + mm(10, 16, 8)  # q k v o, fc1, fc2
              + 2 * (2 * B * 2 * 5 * 5 * 4))  # QK^T and AV: 2 heads, 5 x 5, head dim 4
# Frozen base weights of the decoder layer, forward only.
BASE_QKV = mm(N, 16, 16) + 2 * mm(N, 16, 8)
BASE_REST = mm(N, 16, 16) + 2 * mm(N, 16, 24) + mm(N, 24, 16)  # o, gate, up, down
# LoRA matmuls forward: X A (din x 2) and H B (2 x dout) per projection.
LORA_QKV = (mm(N, 16, 2) + mm(N, 2, 16)) + 2 * (mm(N, 16, 2) + mm(N, 2, 8))
LORA_REST = ((mm(N, 16, 2) + mm(N, 2, 16)) + 2 * (mm(N, 16, 2) + mm(N, 2, 24))
             + (mm(N, 24, 2) + mm(N, 2, 16)))
ATTENTION_FULL = 2 * (2 * B * 4 * T * T * 4)  # QK^T + AV, 4 heads of 4, unmasked
LM_HEAD = mm(N, 16, 32)


def test_hand_count_emola_recipe():
  """LoRA + both projectors train: every decoder matmul needs dX; CLIP runs forward only."""
  got = flops.step_flops(_hand_config(), B, T, EMOLA)
  projector = 2 * mm(8, 8, 16) + 3 * mm(8, 16, 16)  # linear_1: fwd + dW; linear_2: + dX too
  prior = 2 * mm(2, 6, 16) + 3 * mm(2, 16, 16)
  base = 2 * (BASE_QKV + BASE_REST)  # frozen: forward + dX
  lora = 3 * (LORA_QKV + LORA_REST)  # trained: forward + dW + dX
  attention = 3 * ATTENTION_FULL / 2  # causal half; forward + two operand gradients
  lm_head = 2 * LM_HEAD
  assert got.parts == pytest.approx({"vision": VISION_FWD, "projector": projector,
                                     "prior_projector": prior, "llm": base, "lora": lora,
                                     "attention": attention, "lm_head": lm_head})
  assert got.model == pytest.approx(VISION_FWD + projector + prior + base + lora + attention
                                    + lm_head)
  assert got.model == 376_768  # the same, summed by hand
  assert got.extra == {"masked_attention": attention}  # the causal half XLA still computes
  assert got.tokens == N
  # With train.target_logits_only the LM head runs on the T - 1 - slots positions per row
  # that can precede a target.
  only = flops.step_flops(_hand_config(), B, T, EMOLA, target_logits_only=True)
  slots = _hand_config().num_image_slots
  assert only.parts["lm_head"] == 2 * mm(B * (T - 1 - slots), 16, 32)
  assert only.model == got.model - lm_head + only.parts["lm_head"]


def test_hand_count_lora_only_skips_gradients_nothing_needs():
  """Only LoRA trains: no gradient reaches the embeddings, so the first q/k/v base matmuls
  need no dX and the LoRA A matmuls there need no dX either; projectors run forward only."""
  got = flops.step_flops(_hand_config(), B, T, ("lora",))
  lora_qkv = 2 * (mm(N, 16, 2) + 2 * mm(N, 16, 2)) + 3 * (mm(N, 2, 16) + 2 * mm(N, 2, 8))
  expected = {
      "vision": VISION_FWD, "projector": mm(8, 8, 16) + mm(8, 16, 16),
      "prior_projector": mm(2, 6, 16) + mm(2, 16, 16),
      "llm": BASE_QKV + 2 * BASE_REST, "lora": lora_qkv + 3 * LORA_REST,
      "attention": 3 * ATTENTION_FULL / 2, "lm_head": 2 * LM_HEAD}
  assert got.parts == pytest.approx(expected)
  assert got.model == 339_776


def test_remat_recompute():
  """`full` re-runs the block's forward (only matmuls with a backward; the last matmul's output
  is never read); `dots` saves every matmul; `dots_no_batch` re-runs attention only."""
  none = flops.step_flops(_hand_config(), B, T, EMOLA)
  full = flops.step_flops(_hand_config(remat_policy="full"), B, T, EMOLA)
  dots = flops.step_flops(_hand_config(remat_policy="dots"), B, T, EMOLA)
  no_batch = flops.step_flops(_hand_config(remat_policy="dots_no_batch"), B, T, EMOLA)
  block = BASE_QKV + BASE_REST + LORA_QKV + LORA_REST + ATTENTION_FULL
  last = mm(N, 24, 16) + mm(N, 2, 16)  # down_proj base and its LoRA B
  assert full.model == none.model == dots.model == no_batch.model
  assert full.extra["remat_recompute"] == block - last == 91_520
  assert "remat_recompute" not in dots.extra
  assert no_batch.extra["remat_recompute"] == ATTENTION_FULL
  assert full.hardware == none.hardware + 91_520
  # LoRA only: the first q/k/v base matmuls have no backward, so they are computed once.
  lora_full = flops.step_flops(_hand_config(remat_policy="full"), B, T, ("lora",))
  assert lora_full.extra["remat_recompute"] == block - last - BASE_QKV


def test_trained_vision_tower_and_llm():
  """Everything trains: every matmul gets dW, every one with a trained input upstream dX."""
  cfg = _hand_config(**{"lora.rank": 0})
  got = flops.step_flops(cfg, B, T, param_groups.GROUPS)
  vision = (2 * mm(8, 588, 8)  # pixels need no gradient: fwd + dW
            + 3 * (4 * mm(10, 8, 8) + mm(10, 8, 16) + mm(10, 16, 8))
            + 3 * 2 * (2 * B * 2 * 5 * 5 * 4))
  assert got.parts["vision"] == vision
  assert got.parts["llm"] == 3 * (BASE_QKV + BASE_REST)
  assert got.parts["lm_head"] == 3 * LM_HEAD
  assert "lora" not in got.parts


def test_bad_arguments():
  with pytest.raises(ValueError, match="unknown trainable group"):
    flops.step_flops(_hand_config(), B, T, ("lora", "decoder"))
  with pytest.raises(ValueError, match="shorter than the 5 image slots"):
    flops.step_flops(_hand_config(), B, 4, EMOLA)
  with pytest.raises(ValueError, match="must be positive"):
    flops.mfu(1e12, 0.0, 1e12)


# ------------------------------------------------------------------------- against XLA's count


def _xla_config(**changes) -> EmolaConfig:
  """Matmul-dominated but quick to compile; layers unrolled, because XLA's cost analysis counts
  the body of a while loop (a scan) once, not once per iteration."""
  return EmolaConfig.from_dict(dict(
      vision=dict(hidden_size=128, intermediate_size=512, num_layers=2, num_heads=4,
                  image_size=56, patch_size=14),
      text=dict(vocab_size=512, hidden_size=256, intermediate_size=512, num_layers=1,
                num_heads=4, num_kv_heads=2, max_position_embeddings=128),
      lora=dict(rank=16, alpha=32.0), prior_dim=16, image_token_index=511,
      scan_layers=False)).replace(**changes)


@functools.lru_cache(maxsize=None)
def _xla_flops(cfg: EmolaConfig, groups: tuple[str, ...], batch: int, seq: int,
               target_logits_only: bool = False) -> float:
  """XLA's FLOP count of the compiled train step (cached: compiling takes seconds)."""
  abstract = nnx.eval_shape(lambda: EmolaModel(cfg, rngs=nnx.Rngs(0)))
  shapes = {k: jax.ShapeDtypeStruct(v.shape, v.dtype)
            for k, v in param_groups.to_flat(nnx.state(abstract)).items()}
  split = param_groups.SplitModel.from_model(abstract, groups, shapes)
  tx = optax.adamw(1e-3)
  state = train_step.TrainState(jax.ShapeDtypeStruct((), jnp.int32), split.trainable,
                                jax.eval_shape(tx.init, split.trainable),
                                jax.ShapeDtypeStruct((2,), jnp.uint32))
  size = cfg.vision.image_size
  batch_shapes = {"input_ids": ((batch, seq), jnp.int32),
                  "attention_mask": ((batch, seq), jnp.int32),
                  "loss_mask": ((batch, seq), jnp.float32),
                  "pixel_values": ((batch, 3, size, size), jnp.float32),
                  "prior": ((batch, cfg.prior_dim), jnp.float32)}
  batch_spec = {k: jax.ShapeDtypeStruct(*v) for k, v in batch_shapes.items()}
  step = train_step.make_train_step(split, tx, dropout=False,
                                    target_logits_only=target_logits_only)
  compiled = jax.jit(step).lower(state, split.frozen, batch_spec).compile()
  return float(compiled.cost_analysis()["flops"])


# XLA counts every elementwise op (norms, softmax, GELU/SiLU, the loss, AdamW) as FLOPs too, so
# its total is a little above our matmul count: 1-5% at these widths (256), less when wider.
XLA_OVER = (1.0, 1.06)


@pytest.mark.parametrize("remat,groups,only_targets,impl", [
    ("none", EMOLA, False, "xla"), ("none", EMOLA, True, "xla"), ("full", ("lora",), False, "xla"),
    ("none", EMOLA, True, "einsum"), ("full", ("lora",), False, "einsum")])
def test_matches_xla_cost_analysis(remat, groups, only_targets, impl):
  # einsum: query blocks of 16 over 64 tokens compute 62.5% of the scores (hand count below).
  cfg = _xla_config(remat_policy=remat, attention_impl=impl, attention_query_block=16)
  ours = flops.step_flops(cfg, 2, 64, groups, only_targets)
  xla = _xla_flops(cfg, groups, 2, 64, only_targets)
  assert XLA_OVER[0] <= xla / ours.hardware <= XLA_OVER[1], (xla, ours)


def test_remat_recompute_matches_xla_difference():
  """The extra FLOPs of remat=full over none, XLA against ours: elementwise work mostly cancels
  in the difference (only its recompute remains)."""
  none, full = _xla_config(), _xla_config(remat_policy="full")
  xla_extra = _xla_flops(full, EMOLA, 2, 64) - _xla_flops(none, EMOLA, 2, 64)
  ours = flops.step_flops(full, 2, 64, EMOLA).extra["remat_recompute"]
  assert 1.0 <= xla_extra / ours <= 1.05, (xla_extra, ours)


def test_causal_blocks_executed_share():
  assert flops.causal_blocks_executed(64, 16) == (16 * 16 + 16 * 32 + 16 * 48 + 16 * 64) / 64**2
  assert flops.causal_blocks_executed(10, 4) == (4 * 4 + 4 * 8 + 2 * 10) / 100
  assert flops.causal_blocks_executed(64, 0) == flops.causal_blocks_executed(64, 64) == 1.0


# ------------------------------------------------------------------------- peaks and MFU


@pytest.mark.parametrize("kind,dtype,tflops", [
    ("TPU v4", "bfloat16", 275), ("TPU v5 lite", "bfloat16", 197), ("TPU v5", "bfloat16", 459),
    ("TPU v6 lite", "bfloat16", 918), ("NVIDIA A100-SXM4-80GB", "bfloat16", 312),
    ("NVIDIA A100-SXM4-40GB", "float32", 19.5), ("NVIDIA H100 80GB HBM3", "bfloat16", 989),
    ("NVIDIA H100 PCIe", "bfloat16", 756), ("NVIDIA H200", "bfloat16", 989),
    ("NVIDIA H200", "float32", 67)])
def test_peak_table(kind, dtype, tflops):
  assert flops.peak_flops(kind, dtype) == pytest.approx(tflops * 1e12)


@pytest.mark.parametrize("kind,dtype", [("cpu", "float32"), ("TPU v4 lite", "bfloat16"),
                                        ("TPU v5 lite", "float32")])
def test_peak_table_unknown(kind, dtype):
  assert flops.peak_flops(kind, dtype) is None


def test_measured_peak_and_mfu():
  peak = flops.measured_peak_flops("float32", n=256, repeats=3, chain=2)
  # Any CPU this runs on does between 0.1 GFLOP/s and 100 TFLOP/s on a 256^3 fp32 matmul.
  assert 1e8 < peak < 1e14
  assert flops.mfu(3e12, 2.0, 3e12) == pytest.approx(0.5)
