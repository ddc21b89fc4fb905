"""FLOPs of one EmoLA train step, accelerator peak throughput, and model FLOPs utilisation (MFU).

Counting rules (one multiply-add = 2 FLOPs; B = batch rows, T = sequence length, N = B*T):

* A matmul [M, K] x [K, F] costs 2*M*K*F forward. Its backward costs one more 2*M*K*F for the
  weight gradient dW = X^T dY if the weight trains, and one more for the input gradient
  dX = dY W^T if any trained parameter lies upstream of X in the data flow (so "backward = 2x
  forward" for a trained weight inside the network, 1x for a frozen weight that gradients pass
  through, 0x where nothing upstream trains). Both frameworks' autodiff skip the rest, and so
  does this count.
* LoRA on a frozen base weight is counted as it runs: y = X W + s (X A) B, i.e. the base matmul
  2*N*din*dout plus X A (2*N*din*r) and H B (2*N*r*dout), each forward; backward dB = H^T dY and
  dH = dY B^T (the B matmul, 2x), dA = X^T dH and, when gradients continue upstream, dH A^T (the
  A matmul) and dY W^T (the base, dX only). LoRA scaling and the add are elementwise.
* Attention per layer: QK^T and AV are each 2*B*heads*T*S*head_dim. The decoder is causal, so the
  model count halves them (the masked half of the scores carries no information); CLIP's are
  bidirectional and counted whole. Backward: dQ, dK (from QK^T) and dA, dV (from AV), each the
  forward cost, where the gradients are needed.
* CLIP runs forward only when frozen (the EmoLA recipe): patch embedding 2*B*P*(C*p*p)*d, then
  `layers_to_run` blocks (q, k, v, o: 4 x 2*Tv*d^2; MLP 2 x 2*Tv*d*m; attention) over
  Tv = P + 1 tokens (the class token). The projector (mlp2x_gelu: d_v -> D -> D, over the B*P
  patch features) and the prior projector (prior_dim -> D -> D, over B rows) follow the matmul
  rule above; the LLM blocks and the LM head (2*N*D*V) likewise, with GQA's narrower k and v.
  With `train.target_logits_only` (the default) the LM head runs on B*(T - 1 - image slots)
  positions, the most that can precede a target, instead of all N.
* Not counted: elementwise work (norms, activations, softmax, RoPE, dropout, the loss, the
  optimizer update), embedding gathers and the scatter of their gradient. These are a few percent
  of the step at the shapes where MFU means something; XLA's own count includes them
  (tests/test_flops.py compares).

Model FLOPs are the count above (the convention of PaLM's MFU, with causal attention halved).
Hardware FLOPs are what the step actually executes: model FLOPs plus (1) the masked part of
causal attention that runs: all of the masked half with `attention_impl` xla or cudnn (an
explicit mask), less with einsum's query blocks, which skip the keys after each block, and (2)
remat recompute: `full` (nothing saveable) re-runs each block's forward in the backward pass,
except the last matmul of each block whose output the backward never reads (XLA drops it);
`dots` saves every matmul output (no matmul recompute); `dots_no_batch` saves the weight
matmuls but re-runs the attention matmuls (they have batch dimensions). Blocks are only
recomputed when their backward runs.

MFU = model FLOPs per step / step seconds / peak FLOP/s, with the peak from `PEAK_TFLOPS` by
`jax.devices()[0].device_kind` or measured by `measured_peak_flops` (a jitted n^3 matmul).
"""

from __future__ import annotations

import collections
import dataclasses
import statistics
import time
from collections.abc import Callable, Iterable

import jax
import jax.numpy as jnp

from emola_jax.model.config import EmolaConfig
from emola_jax.training.train_step import logit_positions

# Dense (non-sparse) peak TFLOP/s per chip by dtype, from the vendors' data sheets. TPUs: bf16
# only (their fp32 matmuls are multi-pass bf16, with no single published figure). NVIDIA:
# "float32" is IEEE fp32 on CUDA cores; "tensorfloat32" is what XLA uses for fp32 matmuls on
# Ampere and later at the default precision.
PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "tpu v4": {"bfloat16": 275.0},
    "tpu v5e": {"bfloat16": 197.0},
    "tpu v5p": {"bfloat16": 459.0},
    "tpu v6e": {"bfloat16": 918.0},
    "a100": {"bfloat16": 312.0, "float16": 312.0, "tensorfloat32": 156.0, "float32": 19.5},
    "h100 sxm": {"bfloat16": 989.0, "float16": 989.0, "tensorfloat32": 494.5, "float32": 67.0},
    "h100 pcie": {"bfloat16": 756.0, "float16": 756.0, "tensorfloat32": 378.0, "float32": 51.0},
    "h200": {"bfloat16": 989.0, "float16": 989.0, "tensorfloat32": 494.5, "float32": 67.0},
}

# `device_kind` as JAX reports it -> a key of PEAK_TFLOPS. TPUs report exact names ("TPU v4 lite"
# is the inference chip v4i, deliberately absent); GPUs report the marketing name, matched by
# substring in this order (the PCIe H100 before the SXM one, which says "HBM3").
_TPU_KINDS = {"TPU v4": "tpu v4", "TPU v5 lite": "tpu v5e", "TPU v5e": "tpu v5e",
              "TPU v5": "tpu v5p", "TPU v5p": "tpu v5p", "TPU v6 lite": "tpu v6e",
              "TPU v6e": "tpu v6e"}
_GPU_SUBSTRINGS = (("h100 pcie", "h100 pcie"), ("h100", "h100 sxm"), ("h200", "h200"),
                   ("a100", "a100"))


def peak_key(device_kind: str) -> str | None:
  """The PEAK_TFLOPS key of a `device_kind` string, or None for an unknown device (e.g. CPUs)."""
  if device_kind in _TPU_KINDS:
    return _TPU_KINDS[device_kind]
  kind = device_kind.lower()
  for needle, key in _GPU_SUBSTRINGS:
    if needle in kind:
      return key
  return None


def peak_flops(device_kind: str, dtype: str = "bfloat16") -> float | None:
  """Published dense peak FLOP/s of one chip for `dtype`, or None if the table has no entry."""
  key = peak_key(device_kind)
  if key is None:
    return None
  value = PEAK_TFLOPS[key].get(dtype)
  return None if value is None else value * 1e12


def peak_probe(dtype: str = "float32", n: int = 2048, chain: int = 1) -> Callable[[], float]:
  """A compiled [n, n] x [n, n] matmul on the default device; each call times one run: FLOP/s.

  `chain` matmuls run back to back inside one call (x <- x @ w; w is scaled so that x keeps its
  magnitude), so fast accelerators are timed over more than the dispatch overhead. Calling the
  probe between the steps of a benchmark measures the peak under the same machine load.
  """
  if n < 1 or chain < 1:
    raise ValueError(f"peak_probe: n={n} and chain={chain} must be >= 1")
  ka, kw = jax.random.split(jax.random.key(0))
  x = jax.random.normal(ka, (n, n), jnp.float32).astype(dtype)
  w = (jax.random.normal(kw, (n, n), jnp.float32) / n ** 0.5).astype(dtype)
  run = jax.jit(lambda x, w: jax.lax.fori_loop(0, chain, lambda _, y: y @ w, x))
  run(x, w).block_until_ready()  # compilation, not timed

  def probe() -> float:
    start = time.perf_counter()
    run(x, w).block_until_ready()
    return 2.0 * n ** 3 * chain / (time.perf_counter() - start)

  return probe


def measured_peak_flops(dtype: str = "float32", n: int = 2048, repeats: int = 5,
                        chain: int = 1) -> float:
  """FLOP/s of a jitted n x n matmul on the default device: the median of `repeats` timed calls
  of `peak_probe` (compilation excluded)."""
  if repeats < 1:
    raise ValueError(f"measured_peak_flops: repeats={repeats} must be >= 1")
  probe = peak_probe(dtype, n, chain)
  return statistics.median(probe() for _ in range(repeats))


def mfu(step_flops: float, step_seconds: float, peak: float) -> float:
  """Model FLOPs utilisation: achieved FLOP/s over peak FLOP/s (a fraction, 0.4 = 40%)."""
  if step_seconds <= 0 or peak <= 0:
    raise ValueError(f"mfu: step_seconds={step_seconds} and peak={peak} must be positive")
  return step_flops / step_seconds / peak


@dataclasses.dataclass(frozen=True)
class StepFlops:
  """FLOPs of one train step (all micro-batches together)."""

  model: float  # the count of the module docstring, causal attention halved, no recompute
  hardware: float  # model + masked attention half + remat recompute
  tokens: int  # B * T positions through the decoder
  parts: dict[str, float]  # model FLOPs by part; sums to `model`
  extra: dict[str, float]  # hardware - model, by cause

  @property
  def model_per_token(self) -> float:
    return self.model / self.tokens


class _Count:
  """Accumulates forward/backward matmul FLOPs and the recompute of remat blocks."""

  def __init__(self):
    self.parts: dict[str, float] = collections.defaultdict(float)
    self.extra: dict[str, float] = collections.defaultdict(float)
    # Forward FLOPs of the current block that remat would recompute: only matmuls with a
    # backward. One whose operands are all constant to the differentiation (a frozen weight on
    # an input no trained parameter reaches) is computed once and kept, under any policy.
    self.block_fwd = 0.0
    self.block_attention_fwd = 0.0
    self.last_fwd = 0.0  # of those, the block's final matmul(s), whose output backward never reads

  def matmul(self, part: str, m: float, k: float, n: float, *, weight_grad: bool,
             input_grad: bool) -> float:
    """Counts one matmul; returns its forward FLOPs if its backward runs, else 0."""
    fwd = 2.0 * m * k * n
    self.parts[part] += fwd * (1 + int(weight_grad) + int(input_grad))
    recomputable = fwd if (weight_grad or input_grad) else 0.0
    self.block_fwd += recomputable
    return recomputable

  def linear(self, part: str, tokens: float, din: int, dout: int, *, trains: bool,
             grad_in: bool, lora_rank: int = 0, lora_trains: bool = False) -> None:
    """A (LoRA-)Linear: base matmul plus the A and B matmuls, forward and the needed backward."""
    last = self.matmul(part, tokens, din, dout, weight_grad=trains, input_grad=grad_in)
    if lora_rank:
      # B matmul: its input H = X A needs a gradient if A trains or X needs one.
      last += self.matmul("lora", tokens, lora_rank, dout, weight_grad=lora_trains,
                          input_grad=lora_trains or grad_in)
      self.matmul("lora", tokens, din, lora_rank, weight_grad=lora_trains, input_grad=grad_in)
    self.last_fwd = last

  def attention(self, part: str, batch: int, heads: int, t: int, s: int, head_dim: int, *,
                causal: bool, grad_q: bool, grad_k: bool, grad_v: bool,
                executed: float = 1.0) -> None:
    """QK^T and AV; causal attention counts half in the model, `executed` (the share of the
    [t, s] scores computed) in the hardware."""
    one = 2.0 * batch * heads * t * s * head_dim  # one of QK^T or AV, unmasked
    frac = 0.5 if causal else 1.0
    grad_scores = grad_q or grad_k
    passes = (1 + int(grad_q) + int(grad_k)) + (1 + int(grad_scores) + int(grad_v))
    self.parts[part] += one * frac * passes
    if causal:
      self.extra["masked_attention"] += one * (executed - frac) * passes
    if grad_q or grad_k or grad_v:
      self.block_fwd += 2 * one * executed
      self.block_attention_fwd += 2 * one * executed

  def begin_block(self) -> None:
    self.block_fwd = self.block_attention_fwd = self.last_fwd = 0.0

  def end_block(self, policy: str) -> None:
    """Adds the remat recompute of the block just counted."""
    if policy in ("none", "dots"):
      return
    if policy == "full":
      self.extra["remat_recompute"] += self.block_fwd - self.last_fwd
    elif policy == "dots_no_batch":
      self.extra["remat_recompute"] += self.block_attention_fwd
    else:
      raise ValueError(f"unknown remat policy {policy!r}")


def causal_blocks_executed(t: int, query_block: int) -> float:
  """The share of the [t, t] scores that causal attention in query blocks computes: block i
  (queries up to its end e_i) scores keys [0, e_i)."""
  if not 0 < query_block < t:
    return 1.0
  ends = [min(start + query_block, t) for start in range(0, t, query_block)]
  return sum((end - start) * end for start, end in zip(range(0, t, query_block), ends)) / t**2


def step_flops(cfg: EmolaConfig, batch: int, seq_len: int, trainable: Iterable[str],
               target_logits_only: bool = False) -> StepFlops:
  """FLOPs of one train step of `batch` rows of `seq_len` tokens (one image per row).

  `trainable`: the trained groups (`param_groups.parse_trainable(...)`). The remat policy comes
  from `cfg.remat_policy`. `target_logits_only`: the LM head runs on seq_len - 1 - image slots
  positions per row (`train.target_logits_only`), not on all seq_len.
  """
  groups = set(trainable)
  unknown = groups - {"vision", "projector", "prior_projector", "lora", "llm"}
  if unknown:
    raise ValueError(f"step_flops: unknown trainable group(s) {sorted(unknown)}")
  if seq_len < cfg.num_image_slots:
    raise ValueError(f"step_flops: seq_len={seq_len} is shorter than the {cfg.num_image_slots} "
                     "image slots of one row")
  c = _Count()
  v, t = cfg.vision, cfg.text
  policy = cfg.remat_policy

  # Vision tower over B images of P patches (+ the class token inside the blocks).
  vt = "vision" in groups
  patches = batch * v.num_patches
  tv = v.num_patches + 1
  c.matmul("vision", patches, v.num_channels * v.patch_size ** 2, v.hidden_size,
           weight_grad=vt, input_grad=False)
  for _ in range(v.layers_to_run):
    c.begin_block()
    d, m = v.hidden_size, v.intermediate_size
    rows = batch * tv
    for _ in range(3):  # q, k, v
      c.linear("vision", rows, d, d, trains=vt, grad_in=vt)
    c.attention("vision", batch, v.num_heads, tv, tv, v.head_dim, causal=False,
                grad_q=vt, grad_k=vt, grad_v=vt)
    c.linear("vision", rows, d, d, trains=vt, grad_in=vt)
    c.linear("vision", rows, d, m, trains=vt, grad_in=vt)
    c.linear("vision", rows, m, d, trains=vt, grad_in=vt)
    c.end_block(policy)

  # Projectors.
  D = t.hidden_size
  pt = "projector" in groups
  g = vt
  if cfg.projector_type == "mlp2x_gelu":
    c.linear("projector", patches, v.hidden_size, D, trains=pt, grad_in=g)
    c.linear("projector", patches, D, D, trains=pt, grad_in=g or pt)
  else:
    c.linear("projector", patches, v.hidden_size, D, trains=pt, grad_in=g)
  ppt = "prior_projector" in groups
  if cfg.has_prior:
    c.linear("prior_projector", batch, cfg.prior_dim, D, trains=ppt, grad_in=False)
    c.linear("prior_projector", batch, D, D, trains=ppt, grad_in=ppt)
  else:
    ppt = False

  # Decoder. The embedding table belongs to "llm": if it trains, gradients reach the inputs.
  lt = "llm" in groups
  rank = cfg.lora.rank
  lora_t = "lora" in groups and rank > 0
  g = vt or pt or ppt or lt
  n = batch * seq_len
  hd = t.resolved_head_dim
  q_dim, kv_dim = t.num_heads * hd, t.num_kv_heads * hd

  def lora_of(name: str) -> int:
    return rank if name in cfg.lora.targets else 0

  def trains_after(name: str) -> bool:
    """Whether a trained parameter sits in projection `name` (base weight or adapter)."""
    return lt or (lora_t and name in cfg.lora.targets)

  def lin(name: str, din: int, dout: int, grad_in: bool) -> None:
    c.linear("llm", n, din, dout, trains=lt, grad_in=grad_in, lora_rank=lora_of(name),
             lora_trains=lora_t)

  executed = (causal_blocks_executed(seq_len, cfg.attention_query_block)
              if cfg.attention_impl == "einsum" else 1.0)
  for _ in range(t.num_layers):
    c.begin_block()
    lin("q_proj", D, q_dim, g)
    lin("k_proj", D, kv_dim, g)
    lin("v_proj", D, kv_dim, g)
    gq, gk, gv = (g or trains_after(p) for p in ("q_proj", "k_proj", "v_proj"))
    c.attention("attention", batch, t.num_heads, seq_len, seq_len, hd, causal=True,
                grad_q=gq, grad_k=gk, grad_v=gv, executed=executed)
    g_attn = gq or gk or gv
    lin("o_proj", q_dim, D, g_attn)
    g_mid = g_attn or trains_after("o_proj")
    lin("gate_proj", D, t.intermediate_size, g_mid)
    lin("up_proj", D, t.intermediate_size, g_mid)
    g_mlp = g_mid or trains_after("gate_proj") or trains_after("up_proj")
    lin("down_proj", t.intermediate_size, D, g_mlp)
    g_out = g_mlp or trains_after("down_proj")
    c.end_block(policy)
    g = g_out
  head_rows = batch * logit_positions(seq_len, cfg.num_image_slots) if target_logits_only else n
  c.matmul("lm_head", head_rows, D, t.vocab_size, weight_grad=lt, input_grad=g)

  parts = {k: v for k, v in c.parts.items() if v}
  extra = {k: v for k, v in c.extra.items() if v}
  model = sum(parts.values())
  return StepFlops(model=model, hardware=model + sum(extra.values()), tokens=n, parts=parts,
                   extra=extra)
