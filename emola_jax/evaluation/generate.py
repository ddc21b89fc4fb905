"""Batched generation for `EmolaModel`: prefill plus KV-cache decoding in jitted loops.

Prompts of different lengths are packed to the LEFT inside a (batch, length) bucket, so every row's
last prompt token sits in the same column and each decode step writes one shared cache slot.
Rotary positions come from the attention mask (`cumsum - 1`), as `transformers` does for
left-padded `generate`, so padding never shifts a row's positions. Right-padded input is accepted
and re-packed to the left on the host (any row whose mask is one contiguous run of ones is).

Decoding is a `jax.lax.while_loop` that stops as soon as every row has ended (EOS or a stop token
sequence) or `max_new_tokens` is reached. A fixed-count scan with masking would keep running to
`max_new_tokens` (2048 in the reference protocol) although EmoLA's answers end after a few hundred
tokens; the while loop pays one cheap predicate per step instead. The KV cache is created inside
the jitted function and lives in the loop carry, where XLA updates it in place. For the same
reason the cache is not sized for `max_new_tokens` up front: every step attends over all of its
slots, so it starts at twice the prompt bucket and doubles when full (`Generator.cache_growth`),
each size a loop of its own; the host looks at the carry only between sizes (whether every row
has ended), not per token.

The model is split once (`nnx.split`) and its parameters are arguments of a plain `jax.jit`
function, so a call has no NNX graph traversal and weights are not baked in as constants.
Shapes are bucketed: the prompt length is rounded up to a multiple of `length_bucket` and the
batch up to the next batch bucket (padding rows start finished), so a new prompt length or batch
size within a bucket reuses the compiled loop.
"""

from __future__ import annotations

import dataclasses
import math
import weakref
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from emola_jax.evaluation.sampling import select_tokens
from emola_jax.model.emola import EmolaModel, check_image_slots
from emola_jax.model.layers import Linear

PADDING_SIDES = ("left", "right")
# Fills the unused front of a right-aligned stop sequence; matches any token.
_ANY_TOKEN = -1
# The stop window starts with this id, which no stop sequence contains, so prompts never match.
_NO_TOKEN = -2
# Fills unused EOS and stop-sequence rows: no token and no window entry ever equals it.
_NEVER = -3
# EOS ids and stop sequences are padded to multiples of this, so that changing them rarely
# changes an array shape (which would recompile the loop).
_ID_BUCKET = 4


@dataclasses.dataclass(frozen=True)
class GenerationOutput:
  """What `generate` returns, on the host, one row per input row.

  tokens: int32 [B, max_new_tokens]; after a row's end the rest is `pad_id`.
  lengths: int32 [B]: tokens generated per row, the EOS / stop sequence included.
  content_lengths: int32 [B]: `lengths` minus the EOS / stop sequence that ended the row.
  finished: bool [B]: True if the row ended by EOS or a stop sequence, False if it reached
    `max_new_tokens`.
  logits: float32 [B, max_new_tokens, V] (only with `return_logits=True`): the next-token logits
    each generated token was chosen from (before temperature and top-p); past a row's `lengths`
    the values are meaningless (zeros once every row has ended).
  """

  tokens: np.ndarray
  lengths: np.ndarray
  content_lengths: np.ndarray
  finished: np.ndarray
  logits: np.ndarray | None = None

  def sequences(self, strip_stop: bool = True) -> list[list[int]]:
    """Each row's generated token ids, without the EOS / stop sequence if `strip_stop`."""
    ends = self.content_lengths if strip_stop else self.lengths
    return [self.tokens[b, :int(n)].tolist() for b, n in enumerate(ends)]


def truncate_at_stop_strings(text: str, stop_strings: Sequence[str]) -> str:
  """`text` up to the earliest occurrence of any stop string (the whole text if none occurs).

  Decoding stops on token sequences; a stop string can be tokenised in more than one way, so the
  decoded text is cut here as well.
  """
  cut = min((i for i in (text.find(s) for s in stop_strings if s) if i >= 0), default=len(text))
  return text[:cut]


def round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def batch_bucket(batch: int, buckets: Sequence[int] | None = None) -> int:
  """The smallest bucket >= batch; default buckets are the powers of two.

  A batch above the largest given bucket is rounded up to a multiple of that bucket.
  """
  if buckets:
    fitting = [b for b in sorted(buckets) if b >= batch]
    return fitting[0] if fitting else round_up(batch, max(buckets))
  return 1 << max(0, math.ceil(math.log2(batch)))


@dataclasses.dataclass(frozen=True)
class PackedBatch:
  """A bucketed, left-packed batch as the jitted loop takes it (host numpy arrays)."""

  input_ids: np.ndarray  # int32 [Bb, Tb]
  attention_mask: np.ndarray  # bool [Bb, Tb]
  pixel_values: np.ndarray | None  # [Bb, C, H, W]
  prior_features: np.ndarray | None  # [Bb, P]
  active: np.ndarray  # bool [Bb]: False for the rows added to fill the batch bucket
  batch: int  # the caller's batch size B


def pack_left(input_ids, attention_mask, pixel_values, prior_features, *, pad_id: int,
              padding_side: str | None, length_bucket: int,
              batch_buckets: Sequence[int] | None) -> PackedBatch:
  """Left-packs each row's tokens into a (batch bucket, length bucket) array.

  Every row's mask must be one contiguous run of ones (left or right padding, or none);
  `padding_side`, when given, is checked against the mask. Rows added to fill the batch bucket
  copy row 0 (so they are numerically harmless) and are marked inactive.
  """
  ids = np.asarray(input_ids)
  if ids.ndim != 2:
    raise ValueError(f"generate: input_ids must be [batch, length], got shape {ids.shape}")
  mask = (np.ones(ids.shape, bool) if attention_mask is None
          else np.asarray(attention_mask).astype(bool))
  if mask.shape != ids.shape:
    raise ValueError(f"generate: attention_mask shape {mask.shape} != input_ids shape {ids.shape}")
  if padding_side is not None and padding_side not in PADDING_SIDES:
    raise ValueError(f"generate: padding_side={padding_side!r} is not one of {PADDING_SIDES}")
  batch, length = ids.shape
  rows = []
  for b in range(batch):
    real = np.flatnonzero(mask[b])
    if real.size == 0:
      raise ValueError(f"generate: row {b} of attention_mask has no tokens")
    if real[-1] - real[0] + 1 != real.size:
      raise ValueError(f"generate: row {b} of attention_mask is not one contiguous run of ones "
                       "(only left or right padding is supported)")
    padded = real.size < length
    if padded and padding_side == "left" and real[-1] != length - 1:
      raise ValueError(f"generate: padding_side='left' but row {b} is padded on the right")
    if padded and padding_side == "right" and real[0] != 0:
      raise ValueError(f"generate: padding_side='right' but row {b} is padded on the left")
    rows.append(ids[b, real])
  width = round_up(max(r.size for r in rows), length_bucket)
  rows_b = batch_bucket(batch, batch_buckets)
  out_ids = np.full((rows_b, width), pad_id, np.int32)
  out_mask = np.zeros((rows_b, width), bool)
  for b in range(rows_b):
    row = rows[b] if b < batch else rows[0]
    out_ids[b, width - row.size:] = row
    out_mask[b, width - row.size:] = True

  def pad_rows(x, name):
    if x is None:
      return None
    x = np.asarray(x)
    if x.shape[0] != batch:
      raise ValueError(f"generate: {name} has {x.shape[0]} rows, input_ids has {batch}")
    return np.concatenate([x, np.repeat(x[:1], rows_b - batch, axis=0)])

  return PackedBatch(out_ids, out_mask, pad_rows(pixel_values, "pixel_values"),
                     pad_rows(prior_features, "prior_features"), np.arange(rows_b) < batch, batch)


def eos_array(eos_ids: Sequence[int]) -> np.ndarray:
  """[E] int32: the EOS ids, filled up to a multiple of `_ID_BUCKET` with an id never generated."""
  out = np.full(round_up(max(len(eos_ids), 1), _ID_BUCKET), _NEVER, np.int32)
  out[:len(eos_ids)] = eos_ids
  return out


def stop_sequence_array(stop_token_sequences: Sequence[Sequence[int]]) -> np.ndarray:
  """[N, L] int32: each sequence right-aligned and front-filled with `_ANY_TOKEN`.

  N and L are rounded up to multiples of `_ID_BUCKET` (filler rows never match); no sequences
  give shape [0, 1], which compiles the loop without the stop check.
  """
  seqs = [list(map(int, s)) for s in stop_token_sequences]
  for s in seqs:
    if not s or min(s) < 0:
      raise ValueError(f"generate: stop token sequence {s} must be non-empty token ids >= 0")
  if not seqs:
    return np.zeros((0, 1), np.int32)
  width = round_up(max(map(len, seqs)), _ID_BUCKET)
  out = np.full((round_up(len(seqs), _ID_BUCKET), width), _NEVER, np.int32)
  for i, s in enumerate(seqs):
    out[i, :width - len(s)] = _ANY_TOKEN
    out[i, width - len(s):] = s
  return out


def cache_lengths(width: int, max_new_tokens: int, growth: float | None,
                  bucket: int) -> list[int]:
  """The KV cache's slot counts, stage by stage, for a prompt bucket of `width` tokens.

  The last is `width + max_new_tokens - 1`, every slot a call can fill (the last generated token
  is never fed back). With `growth`, the cache starts at `growth x width` slots (rounded up to a
  multiple of `bucket`) and grows by that factor each time it is full.
  """
  full = width + max_new_tokens - 1
  if growth is None:
    return [full]
  lengths, size = [], width
  while size < full:
    grown = max(size + 1, round_up(math.ceil(size * growth), bucket))
    # A last step smaller than this one is taken now: one compile and one copy fewer.
    size = full if full - grown < grown - size else grown
    lengths.append(size)
  return lengths or [full]


class Generator:
  """Compiled generation for one model; call it like `generate` without the model argument.

  The parameters are read once, at construction; call `refresh(model)` after changing them (e.g.
  between training evaluations). `num_traces` counts how often a loop was traced (= compiled),
  which shows whether the buckets hold.

  `unstack_layers` (default True) keeps a decoding copy of the decoder with each layer's weights
  sliced out of the stack (`LlamaForCausalLM.for_decoding`), made at construction and at every
  `refresh`: the token loop then reads the weights where they lie, where slicing the stack
  inside the loop copied every layer's weights on every token (on a CPU, BENCHMARKS.md, most of
  a decoding step). It costs one copy of the decoder's weights for the Generator's lifetime;
  False scans the stacked weights and holds no copy.

  `transpose_kernels` (with `unstack_layers`) stores every kernel of that copy and the LM head
  [out, in] (one more copy of an untied head), so that a decoding step multiplies weights-first
  (`layers.dense`): 2-3x faster matmuls on XLA:CPU at batch 8 (BENCHMARKS.md). Default (None):
  on when JAX's backend is the CPU, the only one it was measured on.

  `merge_lora` folds LoRA adapters into the kernels of that copy (`Linear.merge_lora`, as
  PEFT's merge does): each projection is one matmul per step instead of three (12-19% faster
  decoding of a rank-128 adapter at the bench shapes on a CPU, BENCHMARKS.md). Default (None):
  with `unstack_layers`, when every adapted kernel is stored and computed at least as wide as
  its adapter (`Linear.merge_keeps_precision`; fp32 models); not with bf16 base weights, which
  would round small adapter updates away (the separate branch keeps them).

  `cache_growth` (default 2): the KV cache starts with room for `cache_growth` x the prompt
  bucket and grows by that factor whenever it is full (`cache_lengths`), so that a step's
  attention reads at most ~`cache_growth` x the slots in use. Every step attends over the whole
  cache; sized for `max_new_tokens` at once (None), a call with the reference protocol's
  `max_new_tokens=2048` reads prompt + 2047 slots per step however early its answers end (at
  the bench shapes, rows ending after 64 tokens decoded 1.9-2.1x slower, BENCHMARKS.md). Each
  size is its own compiled loop (traced when first reached); between sizes the host checks
  once whether every row has ended. While the cache grows, the old and the new one are both
  held (at most ~2x the memory of the cache allocated at once).
  """

  def __init__(self, model: EmolaModel, *, length_bucket: int = 64,
               batch_buckets: Sequence[int] | None = None, unstack_layers: bool = True,
               transpose_kernels: bool | None = None, merge_lora: bool | None = None,
               cache_growth: float | None = 2.0):
    if length_bucket < 1:
      raise ValueError(f"generate: length_bucket={length_bucket} must be >= 1")
    if cache_growth is not None and not cache_growth > 1:
      raise ValueError(f"generate: cache_growth={cache_growth} must be > 1 (or None: the whole "
                       "cache at once)")
    if transpose_kernels is None:
      transpose_kernels = unstack_layers and jax.default_backend() == "cpu"
    if merge_lora is None:
      merge_lora = unstack_layers and all(
          m.merge_keeps_precision for _, m in nnx.iter_modules(model.language_model)
          if isinstance(m, Linear))
    for name, value in (("transpose_kernels", transpose_kernels), ("merge_lora", merge_lora)):
      if value and not unstack_layers:
        raise ValueError(f"generate: {name}=True needs unstack_layers=True (it changes the "
                         "decoding copy made while unstacking)")
    self.transpose_kernels = transpose_kernels
    self.merge_lora = merge_lora
    self.config = model.config
    self.length_bucket = length_bucket
    self.batch_buckets = tuple(batch_buckets) if batch_buckets else None
    self.unstack_layers = unstack_layers
    self.cache_growth = cache_growth
    self.refresh(model)
    self.num_traces = 0
    self._start = jax.jit(self._prefill_and_decode, static_argnames=(
        "max_new_tokens", "cache_len", "do_sample", "return_logits"))
    # The carry's buffers (tokens, lengths, logits, ...) are reused; the cache is re-allocated.
    self._resume = jax.jit(self._grow_and_decode, static_argnames=("cache_len", "do_sample"),
                           donate_argnames=("carry",))

  def refresh(self, model: EmolaModel) -> None:
    """Takes the current parameters of `model` (same structure as at construction) and, with
    `unstack_layers`, makes the decoding copy of its decoder from them."""
    if self.unstack_layers:  # eagerly: the other parameters stay the model's own arrays
      model = nnx.merge(*nnx.split(model))
      model.language_model = model.language_model.for_decoding(
          transpose_kernels=self.transpose_kernels, merge_lora=self.merge_lora)
    self._graphdef, self._state = nnx.split(model)

  def __call__(self, input_ids, attention_mask=None, pixel_values=None, prior_features=None, *,
               max_new_tokens: int, eos_id: int | Sequence[int] | None, pad_id: int,
               temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
               stop_token_sequences: Sequence[Sequence[int]] = (),
               padding_side: str | None = None, return_logits: bool = False) -> GenerationOutput:
    """Generates up to `max_new_tokens` tokens per row; see the module docstring.

    Args:
      input_ids: [B, T] prompt ids with this model's image slots expanded.
      attention_mask: [B, T], 1 for real tokens; left or right padding (default: no padding).
      pixel_values: [B, C, H, W] or None for text-only prompts.
      prior_features: [B, prior_dim] landmark priors (models with a prior token).
      max_new_tokens: generated tokens per row at most (a static shape: changing it recompiles).
      eos_id: one id or several that end a row; None: rows end only by stop sequences.
      pad_id: the id written after a row has ended (and used to pad prompts).
      temperature: 0 = greedy; > 0 samples from softmax(logits / temperature).
      top_p: nucleus filtering when sampling, in (0, 1].
      seed: the sampling seed; row b of the batch always draws from key fold_in(seed, b).
      stop_token_sequences: token id sequences that end a row (included in `lengths`).
      padding_side: 'left' or 'right' to check the mask against; None accepts either.
      return_logits: also return the logits of every step ([B, max_new_tokens, V] floats).
    """
    vocab = self.config.text.vocab_size
    if max_new_tokens < 1:
      raise ValueError(f"generate: max_new_tokens={max_new_tokens} must be >= 1")
    if temperature < 0:
      raise ValueError(f"generate: temperature={temperature} must be >= 0 (0 = greedy)")
    if not 0.0 < top_p <= 1.0:
      raise ValueError(f"generate: top_p={top_p} must be in (0, 1]")
    eos_ids = [] if eos_id is None else [eos_id] if np.ndim(eos_id) == 0 else list(eos_id)
    for token in [*eos_ids, pad_id]:
      if not 0 <= int(token) < vocab:
        raise ValueError(f"generate: token id {token} (eos_id/pad_id) is outside the "
                         f"vocabulary [0, {vocab})")
    packed = pack_left(input_ids, attention_mask, pixel_values, prior_features, pad_id=pad_id,
                       padding_side=padding_side, length_bucket=self.length_bucket,
                       batch_buckets=self.batch_buckets)
    if packed.pixel_values is not None:
      check_image_slots(packed.input_ids, self.config)
    elif (packed.input_ids == self.config.image_token_index).any():
      raise ValueError(f"generate: input_ids hold image placeholders (id "
                       f"{self.config.image_token_index}) but pixel_values is None")
    lengths = cache_lengths(packed.input_ids.shape[1], max_new_tokens, self.cache_growth,
                            self.length_bucket)
    do_sample = temperature > 0
    carry, cache, fixed = self._start(
        self._state, packed.input_ids, packed.attention_mask, packed.pixel_values,
        packed.prior_features, packed.active, jax.random.key(seed),
        np.float32(max(temperature, 1e-6)), np.float32(top_p), eos_array(eos_ids),
        stop_sequence_array(stop_token_sequences), np.int32(pad_id),
        max_new_tokens=max_new_tokens, cache_len=lengths[0], do_sample=do_sample,
        return_logits=return_logits)
    # A stage before the last ends with a full cache (its size is below prompt + budget - 1)
    # or with every row ended.
    for cache_len in lengths[1:]:
      if jax.device_get(carry["finished"].all()):
        break
      carry, cache = self._resume(self._state, carry, cache, fixed, cache_len=cache_len,
                                  do_sample=do_sample)
    out = jax.device_get({k: v for k, v in carry.items() if k not in ("window", "step")})
    b = packed.batch
    return GenerationOutput(tokens=out["tokens"][:b], lengths=out["lengths"][:b],
                            content_lengths=out["content_lengths"][:b],
                            finished=out["finished"][:b],
                            logits=out["logits"][:b] if return_logits else None)

  def _prefill_and_decode(self, state, input_ids, attention_mask, pixel_values, prior_features,
                          active, key, temperature, top_p, eos_ids, stop_seqs, pad_id, *,
                          max_new_tokens: int, cache_len: int, do_sample: bool,
                          return_logits: bool):
    """Jitted, on a packed batch: the prefill, the first token, then one token per step until
    every row has ended or the cache of `cache_len` slots is full.

    Returns (carry, cache, fixed): the loop's state, the KV cache, and the per-call constants
    the later stages (`_grow_and_decode`) take.
    """
    self.num_traces += 1  # runs only while tracing
    model = nnx.merge(self._graphdef, state)
    lm = model.language_model
    rows, width = input_ids.shape

    embeds = model.embed_inputs(input_ids, pixel_values, prior_features)
    positions = jnp.maximum(jnp.cumsum(attention_mask, axis=1, dtype=jnp.int32) - 1, 0)
    cache = model.init_cache(rows, cache_len, per_layer=self.unstack_layers)
    # Prefill all but the last prompt token; their logits are unused, so XLA drops the LM head
    # over the whole prompt and only the last token's [B, 1, V] logits are computed.
    _, cache = lm(embeds[:, :-1], attention_mask=attention_mask[:, :-1],
                  positions=positions[:, :-1], cache=cache)
    logits, cache = lm(embeds[:, -1:], attention_mask=attention_mask[:, -1:],
                       positions=positions[:, -1:], cache=cache)
    fixed = dict(
        row_keys=jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, jnp.arange(rows)),
        first_new_position=positions[:, -1] + 1, temperature=temperature, top_p=top_p,
        eos_ids=eos_ids, stop_seqs=stop_seqs, pad_id=pad_id)
    carry = dict(
        tokens=jnp.full((rows, max_new_tokens), pad_id, jnp.int32),
        window=jnp.full((rows, stop_seqs.shape[1]), _NO_TOKEN, jnp.int32),
        lengths=jnp.full((rows,), max_new_tokens, jnp.int32),
        content_lengths=jnp.full((rows,), max_new_tokens, jnp.int32),
        finished=~active,
    )
    if return_logits:
      carry["logits"] = jnp.zeros((rows, max_new_tokens, logits.shape[-1]), jnp.float32)
    carry = _choose(carry, fixed, 0, logits[:, -1], do_sample)
    carry["step"] = jnp.ones((), jnp.int32)
    return (*_decode_steps(lm, carry, cache, fixed, do_sample), fixed)

  def _grow_and_decode(self, state, carry, cache, fixed, *, cache_len: int, do_sample: bool):
    """Jitted: the cache grown to `cache_len` slots, then decoding on until every row has ended
    or the cache is full again. Returns (carry, cache)."""
    self.num_traces += 1
    lm = nnx.merge(self._graphdef, state).language_model
    return _decode_steps(lm, carry, cache.grow(cache_len), fixed, do_sample)


def _choose(carry, fixed, step, logits, do_sample):
  """Picks token `step` from `logits` [B, V] and marks the rows that end with it."""
  rows = logits.shape[0]
  stop_seqs = fixed["stop_seqs"]
  step_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(fixed["row_keys"], step)
  token = select_tokens(logits, step_keys, fixed["temperature"], fixed["top_p"], do_sample)
  finished = carry["finished"]
  token = jnp.where(finished, fixed["pad_id"], token)
  window = jnp.concatenate([carry["window"][:, 1:], token[:, None]], axis=1)
  marker = jnp.zeros((rows,), jnp.int32)
  if stop_seqs.shape[0]:
    match = ((window[:, None, :] == stop_seqs[None]) | (stop_seqs[None] == _ANY_TOKEN))
    seq_lengths = (stop_seqs != _ANY_TOKEN).sum(axis=-1)
    marker = jnp.where(match.all(axis=-1), seq_lengths[None], 0).max(axis=-1)
  is_eos = (token[:, None] == fixed["eos_ids"][None]).any(axis=-1)
  marker = jnp.where(is_eos, jnp.maximum(marker, 1), marker)
  ends = ~finished & (marker > 0)
  new = dict(carry)
  new["tokens"] = carry["tokens"].at[:, step].set(token)
  new["window"] = window
  new["lengths"] = jnp.where(ends, step + 1, carry["lengths"])
  new["content_lengths"] = jnp.where(ends, step + 1 - marker, carry["content_lengths"])
  new["finished"] = finished | ends
  if "logits" in carry:
    new["logits"] = carry["logits"].at[:, step].set(logits)
  return new


def _decode_steps(lm, carry, cache, fixed, do_sample):
  """One token per step (`jax.lax.while_loop`) until every row has ended, `max_new_tokens` are
  chosen, or `cache` has no free slot. Returns (carry, cache)."""
  rows, steps = carry["tokens"].shape
  slots = cache.max_len

  def cond(state):
    carry, cache = state
    return (carry["step"] < steps) & (cache.index < slots) & ~carry["finished"].all()

  def body(state):
    carry, cache = state
    step = carry["step"]
    previous = jax.lax.dynamic_index_in_dim(carry["tokens"], step - 1, axis=1)  # [B, 1]
    logits, cache = lm(lm.embed(previous), attention_mask=jnp.ones((rows, 1), bool),
                       positions=(fixed["first_new_position"] + step - 1)[:, None], cache=cache)
    carry = _choose(carry, fixed, step, logits[:, -1], do_sample)
    carry["step"] = step + 1
    return carry, cache

  return jax.lax.while_loop(cond, body, (carry, cache))


# One compiled Generator per live model, for the functional entry point below.
_GENERATORS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def generate(model: EmolaModel, input_ids, attention_mask=None, pixel_values=None,
             prior_features=None, *, length_bucket: int = 64,
             batch_buckets: Sequence[int] | None = None, **kwargs: Any) -> GenerationOutput:
  """`Generator(model, ...)(input_ids, ...)`, reusing one compiled Generator per model.

  The model's current parameters are read on every call (so a model updated in place is seen):
  each call remakes the Generator's decoding copy (unstacked, adapters merged), so keep a
  `Generator` for many calls on unchanged weights. Keyword arguments are those of
  `Generator.__call__`.
  """
  key = (length_bucket, tuple(batch_buckets) if batch_buckets else None)
  per_model = _GENERATORS.setdefault(model, {})
  generator = per_model.get(key)
  if generator is None:
    generator = per_model[key] = Generator(model, length_bucket=length_bucket,
                                           batch_buckets=batch_buckets)
  else:
    generator.refresh(model)
  return generator(input_ids, attention_mask, pixel_values, prior_features, **kwargs)
