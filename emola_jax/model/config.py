"""Model configuration: the shapes and switches of an EmoLA model.

One frozen dataclass per part, nested in `EmolaConfig`. They serialise to plain JSON (saved beside
every native checkpoint) and are built from `ml_collections` experiment configs or from a Hugging
Face `config.json`.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

PRIOR_POSITIONS = ("after", "before", "none")
PROJECTOR_TYPES = ("linear", "mlp2x_gelu")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
ATTENTION_IMPLS = ("xla", "cudnn", "einsum")
DROPOUT_MASKS = ("bernoulli", "hash")
DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  """CLIP ViT vision tower (pre-LayerNorm, class token, quick-GELU MLP)."""

  hidden_size: int = 1024
  intermediate_size: int = 4096
  num_layers: int = 24
  num_heads: int = 16
  image_size: int = 336
  patch_size: int = 14
  num_channels: int = 3
  layer_norm_eps: float = 1e-5
  hidden_act: str = "quick_gelu"
  # Which hidden state feeds the projector, counted like `hidden_states[select_layer]` in
  # `transformers` (index 0 = embeddings). -2 = penultimate layer: the last layer is never run.
  select_layer: int = -2

  @property
  def num_patches(self) -> int:
    return (self.image_size // self.patch_size) ** 2

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @property
  def layers_to_run(self) -> int:
    """How many encoder layers produce `hidden_states[select_layer]`."""
    n = self.num_layers + 1 + self.select_layer if self.select_layer < 0 else self.select_layer
    if not 0 <= n <= self.num_layers:
      raise ValueError(
          f"vision.select_layer={self.select_layer} is out of range for {self.num_layers} layers")
    return n


@dataclasses.dataclass(frozen=True)
class TextConfig:
  """LLaMA decoder (RMSNorm, RoPE, grouped-query attention, SwiGLU)."""

  vocab_size: int = 32000
  hidden_size: int = 4096
  intermediate_size: int = 11008
  num_layers: int = 32
  num_heads: int = 32
  num_kv_heads: int = 32
  head_dim: int | None = None
  rms_norm_eps: float = 1e-5
  rope_theta: float = 10000.0
  # `transformers`-style rope_scaling dict, e.g. {"rope_type": "linear", "factor": 2.0}.
  rope_scaling: dict[str, Any] | None = None
  max_position_embeddings: int = 4096
  tie_word_embeddings: bool = False
  attention_bias: bool = False
  mlp_bias: bool = False
  pad_token_id: int = 0
  bos_token_id: int = 1
  eos_token_id: int = 2

  @property
  def resolved_head_dim(self) -> int:
    return self.head_dim or self.hidden_size // self.num_heads


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """Low-rank adapters on decoder projections; rank 0 switches them off."""

  rank: int = 0
  alpha: float = 16.0
  dropout: float = 0.0
  targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                              "down_proj")
  # Where dropout masks come from: "bernoulli" draws them with jax.random from the step's key
  # (train.rng_impl); "hash" hashes each element's index with a seed drawn from that key, ~40x
  # cheaper on a CPU, the same keep probability, and the same masks under any sharding.
  dropout_masks: str = "bernoulli"

  @property
  def scale(self) -> float:
    return self.alpha / self.rank if self.rank else 0.0


@dataclasses.dataclass(frozen=True)
class EmolaConfig:
  """A LLaVA-1.5 model plus EmoLA's landmark prior token."""

  vision: VisionConfig = dataclasses.field(default_factory=VisionConfig)
  text: TextConfig = dataclasses.field(default_factory=TextConfig)
  lora: LoraConfig = dataclasses.field(default_factory=LoraConfig)
  projector_type: str = "mlp2x_gelu"
  # Where the prior token goes relative to the visual tokens; "none" is plain LLaVA-1.5.
  prior_position: str = "after"
  prior_dim: int = 212
  # The id that marks image slots in `input_ids` (one id per embedding, the HF convention).
  image_token_index: int = 32000
  param_dtype: str = "float32"
  dtype: str = "float32"
  scan_layers: bool = True
  remat_policy: str = "none"
  # "xla" uses jax.nn.dot_product_attention with implementation chosen by XLA; "cudnn" forces the
  # fused cuDNN kernel on GPUs (bf16/fp16 only); "einsum" writes it out heads-first, with causal
  # query blocks (faster on XLA:CPU; see model/attention.py).
  attention_impl: str = "xla"
  # "einsum" only: the decoder's causal self-attention runs in blocks of this many queries, each
  # skipping the keys after its last query; 0 = one block.
  attention_query_block: int = 256

  def __post_init__(self):
    _check_choice("prior_position", self.prior_position, PRIOR_POSITIONS)
    _check_choice("projector_type", self.projector_type, PROJECTOR_TYPES)
    _check_choice("remat_policy", self.remat_policy, REMAT_POLICIES)
    _check_choice("param_dtype", self.param_dtype, DTYPES)
    _check_choice("dtype", self.dtype, DTYPES)
    _check_choice("attention_impl", self.attention_impl, ATTENTION_IMPLS)
    _check_choice("lora.dropout_masks", self.lora.dropout_masks, DROPOUT_MASKS)
    if self.attention_query_block < 0:
      raise ValueError(f"attention_query_block={self.attention_query_block} must be >= 0 "
                       "(0 = one block)")
    t = self.text
    if t.num_heads % t.num_kv_heads:
      raise ValueError(f"text.num_heads={t.num_heads} must be a multiple of "
                       f"text.num_kv_heads={t.num_kv_heads}")
    if self.vision.image_size % self.vision.patch_size:
      raise ValueError(f"vision.image_size={self.vision.image_size} is not a multiple of "
                       f"vision.patch_size={self.vision.patch_size}")
    self.vision.layers_to_run  # pylint: disable=pointless-statement  (validates select_layer)

  @property
  def has_prior(self) -> bool:
    return self.prior_position != "none"

  @property
  def num_image_slots(self) -> int:
    """Placeholder ids one image occupies in `input_ids`: visual tokens plus the prior token."""
    return self.vision.num_patches + int(self.has_prior)

  def replace(self, **changes) -> EmolaConfig:
    """Returns a copy with top-level fields or dotted nested fields (`text.num_layers`) changed."""
    nested: dict[str, dict[str, Any]] = {}
    top = {}
    for key, value in changes.items():
      if "." in key:
        part, field = key.split(".", 1)
        nested.setdefault(part, {})[field] = value
      else:
        top[key] = value
    for part, fields in nested.items():
      top[part] = dataclasses.replace(getattr(self, part), **fields)
    return dataclasses.replace(self, **top)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), indent=2, sort_keys=True)

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> EmolaConfig:
    d = dict(d)
    parts = {"vision": VisionConfig, "text": TextConfig, "lora": LoraConfig}
    for name, part_cls in parts.items():
      if name in d and not isinstance(d[name], part_cls):
        sub = dict(d[name])
        _reject_unknown(part_cls, sub, name)
        if name == "lora" and "targets" in sub:
          sub["targets"] = tuple(sub["targets"])
        d[name] = part_cls(**sub)
    _reject_unknown(cls, d, "model")
    return cls(**d)

  @classmethod
  def from_json(cls, text: str) -> EmolaConfig:
    return cls.from_dict(json.loads(text))


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
  if value not in choices:
    raise ValueError(f"model config: {name}={value!r} is not one of {choices}")


def _reject_unknown(cls, d: dict[str, Any], where: str) -> None:
  known = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(d) - known)
  if unknown:
    raise ValueError(f"model config: unknown field(s) {unknown} in {where!r}; known: {sorted(known)}")
