"""Batched generation: parity with `transformers` generate, KV-cache exactness, sampling, stops."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

import emola_jax
from emola_jax.evaluation import generate as gen_lib
from emola_jax.evaluation.sampling import nucleus_mask, sample_logits
from emola_jax.model.layers import Linear
from tests import hf_tiny

PAD = 0
N_NEW = 16
TEXT_LENGTHS = (5, 1, 9)  # three prompts of different lengths


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  model = hf_tiny.llava()
  path = tmp_path_factory.mktemp("llava")
  model.save_pretrained(path)
  return model, str(path)


@pytest.fixture(scope="module")
def ours(hf_dir):
  model, _ = emola_jax.load_pretrained(hf_dir[1])
  return model


@pytest.fixture(scope="module")
def prompts(hf_dir):
  """Right-padded ids, pixels, mask (as `hf_tiny.llava_inputs` builds them)."""
  return hf_tiny.llava_inputs(hf_dir[0], batch=3, text_len=TEXT_LENGTHS)


def to_left_padding(ids, mask):
  left_ids, left_mask = np.full_like(ids, PAD), np.zeros_like(mask)
  width = ids.shape[1]
  for b in range(ids.shape[0]):
    n = int(mask[b].sum())
    left_ids[b, width - n:] = ids[b, :n]
    left_mask[b, width - n:] = 1
  return left_ids, left_mask


def hf_greedy(model, ids, pixels, mask, eos_id, max_new_tokens=N_NEW):
  """`transformers` greedy generate on left-padded input: the new tokens only."""
  left_ids, left_mask = to_left_padding(ids, mask)
  with torch.no_grad():
    out = model.generate(input_ids=torch.from_numpy(left_ids),
                         attention_mask=torch.from_numpy(left_mask),
                         pixel_values=torch.from_numpy(pixels), do_sample=False,
                         max_new_tokens=max_new_tokens, pad_token_id=PAD, eos_token_id=eos_id)
  return out[:, ids.shape[1]:].numpy()


def greedy(model, ids, mask, pixels, eos_id, **kw):
  return gen_lib.generate(model, ids, mask, pixels, max_new_tokens=N_NEW, eos_id=eos_id,
                          pad_id=PAD, **kw)


def test_greedy_equals_transformers_generate(hf_dir, ours, prompts):
  hf_model, _ = hf_dir
  ids, pixels, mask = prompts
  ref = hf_greedy(hf_model, ids, pixels, mask, eos_id=2)
  assert ref.shape == (3, N_NEW) and 2 not in ref  # EOS never fires: every step is compared
  for row in ref:  # the random model's greedy path is not one token repeated
    assert len(set(row.tolist())) >= 3
  left_ids, left_mask = to_left_padding(ids, mask)
  for padded in [(ids, mask, "right"), (left_ids, left_mask, "left")]:
    out = greedy(ours, padded[0], padded[1], pixels, eos_id=2, padding_side=padded[2])
    np.testing.assert_array_equal(out.tokens, ref)
    np.testing.assert_array_equal(out.lengths, [N_NEW] * 3)
    assert not out.finished.any()


@pytest.mark.parametrize("options,transposed", [
    (dict(unstack_layers=False), False),  # the stacked decoder, scanned
    (dict(transpose_kernels=False), False),  # unstacked, kernels [in, out]
    (dict(), True),  # the CPU default: unstacked, kernels [out, in]
])
def test_every_decoding_layout_equals_transformers(hf_dir, ours, prompts, options, transposed):
  hf_model, _ = hf_dir
  ids, pixels, mask = prompts
  ref = hf_greedy(hf_model, ids, pixels, mask, eos_id=2)
  generator = gen_lib.Generator(ours, **options)
  assert generator.transpose_kernels == transposed
  out = generator(ids, mask, pixels, max_new_tokens=N_NEW, eos_id=2, pad_id=PAD)
  np.testing.assert_array_equal(out.tokens, ref)


def test_transposed_kernels_need_unstacked_layers(ours):
  with pytest.raises(ValueError, match="transpose_kernels=True needs unstack_layers=True"):
    gen_lib.Generator(ours, unstack_layers=False, transpose_kernels=True)
  with pytest.raises(ValueError, match="merge_lora=True needs unstack_layers=True"):
    gen_lib.Generator(ours, unstack_layers=False, merge_lora=True)


def test_greedy_equals_transformers_when_eos_fires(hf_dir, ours, prompts):
  hf_model, _ = hf_dir
  ids, pixels, mask = prompts
  free = hf_greedy(hf_model, ids, pixels, mask, eos_id=2)
  eos = int(free[1, 4])  # a token row 1 emits mid-way: some rows stop early, pad afterwards
  ref = hf_greedy(hf_model, ids, pixels, mask, eos_id=eos)
  out = greedy(ours, ids, mask, pixels, eos_id=eos)
  n = ref.shape[1]  # transformers stops once every row has ended
  np.testing.assert_array_equal(out.tokens[:, :n], ref)
  assert (out.tokens[:, n:] == PAD).all()
  assert out.finished[1] and out.lengths[1] <= 5


def prior_prompts(cfg, seed=1):
  """Left-padded prompts for a prior-token model: each holds vision patches + 1 image slots."""
  rng = np.random.default_rng(seed)
  rows = [[1, *rng.integers(3, 150, 2)] + [cfg.image_token_index] * cfg.num_image_slots
          + rng.integers(3, 150, n).tolist() for n in TEXT_LENGTHS]
  width = max(map(len, rows))
  ids, mask = np.full((3, width), PAD), np.zeros((3, width), int)
  for b, row in enumerate(rows):
    ids[b, width - len(row):], mask[b, width - len(row):] = row, 1
  size = cfg.vision.image_size
  pixels = rng.normal(size=(3, 3, size, size)).astype(np.float32)
  prior = rng.normal(size=(3, cfg.prior_dim)).astype(np.float32)
  return ids, mask, pixels, prior


# (length_bucket, cache_growth, new tokens, cache sizes for the 17-token prompts): the default
# (one stage here), one cache for the whole call, doubling, and four small stages.
@pytest.mark.parametrize("bucket,growth,n_new,stages", [
    (64, 2.0, 13, [76]), (64, None, 13, [76]), (1, 2.0, 40, [34, 56]),
    (1, 1.1, 13, [19, 21, 24, 29])])
def test_kv_cache_logits_equal_full_forward_at_every_step(hf_dir, bucket, growth, n_new, stages):
  model, cfg = emola_jax.load_pretrained(hf_dir[1], prior_position="after")
  assert model.prior_projector is not None and cfg.num_image_slots == cfg.vision.num_patches + 1
  ids, mask, pixels, prior = prior_prompts(cfg)
  generator = gen_lib.Generator(model, length_bucket=bucket, cache_growth=growth)
  out = generator(ids, mask, pixels, prior, max_new_tokens=n_new, eos_id=None, pad_id=PAD,
                  return_logits=True)
  width = gen_lib.round_up(ids.shape[1], bucket)
  assert gen_lib.cache_lengths(width, n_new, growth, bucket) == stages
  assert generator.num_traces == len(stages)
  assert out.logits.shape == (3, n_new, cfg.text.vocab_size)
  # Full forward, no cache, over prompt + generated tokens (generated ids are embedded as text).
  full_mask = np.concatenate([mask, np.ones(out.tokens.shape, int)], axis=1)
  positions = np.maximum(np.cumsum(full_mask, axis=1) - 1, 0)
  graphdef, state = nnx.split(model)

  @jax.jit
  def full_forward(state, tokens):
    m = nnx.merge(graphdef, state)
    embeds = jnp.concatenate([m.embed_inputs(ids, pixels, prior),
                              m.language_model.embed(tokens)], axis=1)
    return m.language_model(embeds, attention_mask=full_mask, positions=positions)[0]

  full = full_forward(state, out.tokens)
  for step in range(n_new):
    ref = np.asarray(full[:, ids.shape[1] - 1 + step])
    assert hf_tiny.rel_err(out.logits[:, step], ref) <= 1e-4, step
    np.testing.assert_array_equal(out.tokens[:, step], ref.argmax(-1))


def test_nucleus_mask_matches_transformers_top_p():
  logits = np.random.default_rng(0).normal(size=(4, 50)).astype(np.float32) * 3
  for top_p in (0.05, 0.3, 0.75, 0.95, 1.0):
    warped = transformers.TopPLogitsWarper(top_p)(None, torch.from_numpy(logits))
    expected = torch.isfinite(warped).numpy()
    np.testing.assert_array_equal(np.asarray(nucleus_mask(jnp.asarray(logits), top_p)), expected)


def test_sampled_frequencies_follow_truncated_distribution():
  # probs 0.5, 0.3, 0.15, 0.05; temperature 1, top_p 0.85 keeps the first three, renormalised.
  logits = jnp.log(jnp.array([0.5, 0.3, 0.15, 0.05]))
  draws = jax.vmap(lambda k: jax.random.categorical(k, sample_logits(logits, 1.0, 0.85)))(
      jax.random.split(jax.random.key(0), 20000))
  freq = np.bincount(np.asarray(draws), minlength=4) / 20000
  np.testing.assert_allclose(freq, [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0.0], atol=0.015)
  # temperature 0.5 squares then renormalises the probabilities (no top-p cut)
  draws = jax.vmap(lambda k: jax.random.categorical(k, sample_logits(logits, 0.5, 1.0)))(
      jax.random.split(jax.random.key(1), 20000))
  p2 = np.array([0.5, 0.3, 0.15, 0.05]) ** 2
  np.testing.assert_allclose(np.bincount(np.asarray(draws), minlength=4) / 20000, p2 / p2.sum(),
                             atol=0.015)


def test_sampling_is_seeded_and_tiny_top_p_is_greedy(ours, prompts):
  ids, pixels, mask = prompts
  sample = lambda seed, **kw: greedy(ours, ids, mask, pixels, eos_id=None, temperature=1.5,
                                     seed=seed, **kw)
  a, b, c = sample(7), sample(7), sample(8)
  np.testing.assert_array_equal(a.tokens, b.tokens)
  assert (a.tokens != c.tokens).any()
  # A row's draws depend on its seed and index only: more rows in the batch change nothing.
  more = gen_lib.generate(
      ours, np.concatenate([ids, ids[1:2]]), np.concatenate([mask, mask[1:2]]),
      np.concatenate([pixels, pixels[2:3]]), max_new_tokens=N_NEW, eos_id=None, pad_id=PAD,
      temperature=1.5, seed=7)
  np.testing.assert_array_equal(more.tokens[:3], a.tokens)
  tiny = sample(3, top_p=1e-6)
  np.testing.assert_array_equal(tiny.tokens, greedy(ours, ids, mask, pixels, eos_id=None).tokens)


def test_eos_and_stop_sequences_end_rows_and_pad_after(ours, prompts):
  ids, pixels, mask = prompts
  free = greedy(ours, ids, mask, pixels, eos_id=None).tokens
  eos = int(free[0, 2])
  out = greedy(ours, ids, mask, pixels, eos_id=[eos, 1])
  for b in range(3):
    hits = np.flatnonzero(np.isin(free[b], [eos, 1]))
    n = hits[0] + 1 if hits.size else N_NEW
    np.testing.assert_array_equal(out.tokens[b, :n], free[b, :n])
    assert (out.tokens[b, n:] == PAD).all()
    assert out.lengths[b] == n and out.finished[b] == bool(hits.size)
    assert out.content_lengths[b] == (n - 1 if hits.size else n)
  assert out.finished[0]  # row 0 emits `eos` by step 2 at the latest
  n0 = int(out.lengths[0])
  assert out.sequences()[0] == free[0, :n0 - 1].tolist()
  assert out.sequences(strip_stop=False)[0] == free[0, :n0].tolist()
  # Every row ends at its first token: the loop stops there (later logits were never computed).
  out = greedy(ours, ids, mask, pixels, eos_id=free[:, 0].tolist(), return_logits=True)
  np.testing.assert_array_equal(out.lengths, [1, 1, 1])
  assert (out.tokens[:, 1:] == PAD).all() and (out.logits[:, 1:] == 0).all()
  assert (out.logits[:, 0] != 0).all()
  # A two-token stop sequence taken from row 2's path ends row 2 right after it.
  seq = free[2, 5:7].tolist()
  out = greedy(ours, ids, mask, pixels, eos_id=None, stop_token_sequences=[seq, [159, 159, 159]])
  first = next(i for i in range(1, N_NEW) if free[2, i - 1:i + 1].tolist() == seq)
  assert out.lengths[2] == first + 1 and out.content_lengths[2] == first - 1
  np.testing.assert_array_equal(out.tokens[2, :first + 1], free[2, :first + 1])
  assert (out.tokens[2, first + 1:] == PAD).all()


def test_buckets_avoid_recompiling(ours, hf_dir):
  generator = gen_lib.Generator(ours, length_bucket=32)
  run = lambda ids, pixels, mask: generator(ids, mask, pixels, max_new_tokens=4, eos_id=2,
                                            pad_id=PAD)
  # prompt lengths 1 + 2 + 4 image slots + text: 10, 14 and 20 tokens (bucket 32); batches 3
  # and 4 (bucket 4)
  for batch, text_len in ((3, (3, 7)), (4, (13,)), (3, (7,))):
    run(*hf_tiny.llava_inputs(hf_dir[0], batch=batch, text_len=text_len))
  assert generator.num_traces == 1
  run(*hf_tiny.llava_inputs(hf_dir[0], batch=2, text_len=(3,)))  # batch bucket 2
  run(*hf_tiny.llava_inputs(hf_dir[0], batch=4, text_len=(30,)))  # 37 tokens: length bucket 64
  assert generator.num_traces == 3


@pytest.mark.parametrize("mask_row,side,message", [
    ([1, 0, 1, 1], None, "contiguous"),
    ([0, 0, 0, 0], None, "no tokens"),
    ([1, 1, 1, 0], "left", "padded on the right"),
    ([0, 1, 1, 1], "right", "padded on the left"),
])
def test_bad_padding_is_refused(mask_row, side, message):
  with pytest.raises(ValueError, match=message):
    gen_lib.pack_left(np.ones((1, 4), int), np.array([mask_row]), None, None, pad_id=0,
                      padding_side=side, length_bucket=8, batch_buckets=None)


def test_pack_left_and_batch_buckets():
  packed = gen_lib.pack_left(np.array([[5, 6, 7, 0], [0, 0, 8, 9]]),
                             np.array([[1, 1, 1, 0], [0, 0, 1, 1]]), None, None, pad_id=0,
                             padding_side=None, length_bucket=6, batch_buckets=(1, 3, 5))
  np.testing.assert_array_equal(packed.input_ids, [[0, 0, 0, 5, 6, 7], [0, 0, 0, 0, 8, 9],
                                                   [0, 0, 0, 5, 6, 7]])
  np.testing.assert_array_equal(packed.active, [True, True, False])
  assert [gen_lib.batch_bucket(n) for n in (1, 2, 3, 5, 8, 9)] == [1, 2, 4, 8, 8, 16]
  assert gen_lib.batch_bucket(7, (4, 6)) == 12
  assert gen_lib.truncate_at_stop_strings("a USER: b</s>", ["</s>", "USER:"]) == "a "


def test_image_placeholders_without_pixels_are_refused(ours, prompts):
  ids, _, mask = prompts
  with pytest.raises(ValueError, match="pixel_values is None"):
    gen_lib.generate(ours, ids, mask, None, max_new_tokens=2, eos_id=2, pad_id=PAD)


def test_cache_lengths():
  # Doubling from the prompt bucket, each size a multiple of the bucket; the last holds every
  # slot a call can fill (prompt + max_new_tokens - 1).
  assert gen_lib.cache_lengths(640, 2048, 2.0, 64) == [1280, 2687]  # not 2560 and then 2687
  assert gen_lib.cache_lengths(64, 2048, 2.0, 64) == [128, 256, 512, 1024, 2111]
  assert gen_lib.cache_lengths(64, 64, 2.0, 64) == [127]
  assert gen_lib.cache_lengths(64, 64, None, 64) == [127]
  assert gen_lib.cache_lengths(10, 1, 2.0, 1) == [10]  # one token: the prefill's slots only
  assert gen_lib.cache_lengths(4, 9, 1.01, 1) == [5, 6, 7, 8, 9, 10, 11, 12]  # >= 1 slot a stage
  with pytest.raises(ValueError, match="cache_growth=1 must be > 1"):
    gen_lib.Generator(None, cache_growth=1)


def test_grown_cache_equals_transformers_and_is_not_grown_after_rows_end(hf_dir, ours, prompts):
  hf_model, _ = hf_dir
  ids, pixels, mask = prompts
  ref = hf_greedy(hf_model, ids, pixels, mask, eos_id=2)
  generator = gen_lib.Generator(ours, length_bucket=1, cache_growth=1.1)
  stages = gen_lib.cache_lengths(ids.shape[1], N_NEW, 1.1, 1)
  assert len(stages) >= 3
  np.testing.assert_array_equal(generator(ids, mask, pixels, max_new_tokens=N_NEW, eos_id=2,
                                          pad_id=PAD).tokens, ref)
  assert generator.num_traces == len(stages)
  # Sampling draws the same tokens whatever the stages (keys fold in the step, not the stage).
  sample = dict(max_new_tokens=N_NEW, eos_id=None, pad_id=PAD, temperature=1.5, seed=7)
  staged = generator(ids, mask, pixels, **sample).tokens
  whole = gen_lib.Generator(ours, length_bucket=1, cache_growth=None)(ids, mask, pixels, **sample)
  np.testing.assert_array_equal(staged, whole.tokens)
  assert (staged != ref).any()  # sampled, not greedy
  # Every row ends with its first token: no later stage runs (or is compiled).
  generator = gen_lib.Generator(ours, length_bucket=1, cache_growth=1.1)
  out = generator(ids, mask, pixels, max_new_tokens=N_NEW, eos_id=ref[:, 0].tolist(), pad_id=PAD)
  np.testing.assert_array_equal(out.lengths, [1, 1, 1])
  assert generator.num_traces == 1


def test_lora_is_merged_for_decoding_only_where_it_keeps_its_precision(hf_dir):
  model, _ = emola_jax.load_pretrained(hf_dir[1], lora={"rank": 4, "alpha": 8.0})
  assert gen_lib.Generator(model).merge_lora  # fp32 kernels and adapters
  assert not gen_lib.Generator(model, unstack_layers=False).merge_lora
  for _, module in nnx.iter_modules(model):  # bf16 frozen base weights, as EmoLA LoRA trains
    if isinstance(module, Linear):
      module.kernel = module.kernel.replace(module.kernel[...].astype(jnp.bfloat16))
  assert not gen_lib.Generator(model).merge_lora
  assert gen_lib.Generator(model, merge_lora=True).merge_lora  # asked for explicitly
