"""Decoding throughput: our jitted generation loop against `transformers` `generate`, greedy, fp32.

Both run the same random LLaVA (built with `transformers`, saved, and loaded into our model), on
the same prompts, in the same process, interleaved (ours, theirs, ours, theirs, ...) so that drift
in machine load hits both alike. Tokens/s = generated tokens / wall time of one whole call
(prefill included), median over the repeats; the first call of each (compilation for ours) is
timed apart and not counted. EOS is disabled on both sides, so every row generates exactly
`--new_tokens` tokens; with a larger `--max_new_tokens` budget, each row ends instead by a stop
sequence, after `--new_tokens` tokens or earlier, the same on both sides (see `compare`).

  python -m emola_jax.evaluation.bench_decode [--batch_sizes=1,8] [--new_tokens=64] ...
  python -m emola_jax.evaluation.bench_decode --width=1024 --image_size=56 --threads=0 \
      --layouts=stacked,unstacked,transposed      # the Generator's weight layouts side by side
  python -m emola_jax.evaluation.bench_decode --width=1024 --image_size=56 --threads=0 \
      --max_new_tokens=2048 --layouts=default,full_cache   # rows end after 64 of a 2048 budget
  python -m emola_jax.evaluation.bench_decode --width=1024 --image_size=56 --threads=0 \
      --lora_rank=128 --layouts=default,unmerged       # a LoRA-tuned model, adapters merged or not

Needs torch (the `torch` extra).
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time

import jax
import numpy as np
from absl import app, flags
from flax import nnx

from emola_jax.conversion.hf_load import load_pretrained
from emola_jax.conversion.to_hf import export_model
from emola_jax.evaluation.generate import Generator
from emola_jax.model.layers import Linear

FLAGS = flags.FLAGS
flags.DEFINE_list("batch_sizes", ["1", "8"], "Batch sizes to time.")
flags.DEFINE_integer("new_tokens", 64, "Tokens generated per row.")
flags.DEFINE_integer("max_new_tokens", 0, "Budget of new tokens per row given to both sides; "
                     "above --new_tokens, rows end by a stop sequence after ~--new_tokens (as "
                     "answers end by EOS under the reference protocol's budget of 2048). 0: "
                     "--new_tokens.")
flags.DEFINE_integer("prompt_len", 64, "Prompt tokens per row (BOS + image slots + text).")
flags.DEFINE_integer("repeats", 5, "Timed calls per side and batch size (after one warm-up).")
flags.DEFINE_integer("layers", 4, "LLaMA decoder layers.")
flags.DEFINE_integer("width", 512, "LLaMA hidden size.")
flags.DEFINE_integer("vocab", 32000, "Vocabulary size (LLaMA-2's by default).")
flags.DEFINE_integer("image_size", 56, "CLIP image size; patch 14, so (size / 14)^2 image slots.")
flags.DEFINE_integer("seed", 0, "Seed of the random weights and prompts.")
flags.DEFINE_list("layouts", ["default"], "Generator layouts to time, each against "
                  "transformers in this process: default (the Generator's own choice), stacked "
                  "(unstack_layers=False), unstacked (transpose_kernels=False), transposed, "
                  "full_cache (cache_growth=None: a KV cache for the whole budget up front), "
                  "unmerged (merge_lora=False: LoRA adapters run as three matmuls).")
flags.DEFINE_integer("lora_rank", 0, "Give our model LoRA adapters of this rank on every "
                     "decoder projection (as a LoRA-tuned EmoLA is evaluated); transformers gets "
                     "the same weights merged. 0: none.")
flags.DEFINE_integer(
    "threads", 1, "CPU threads per framework (torch intra-op threads, XLA CPU intra-op "
    "threads); 0 keeps both frameworks' defaults. One thread each is the fair setting on a "
    "shared machine: an oversubscribed torch thread pool slows down several-fold.")

PATCH = 14
STOP_LENGTH = 4  # tokens of the stop sequence that ends a row under a budget (`compare`)
LAYOUTS = {"default": {}, "stacked": {"unstack_layers": False},
           "unstacked": {"transpose_kernels": False}, "transposed": {"transpose_kernels": True},
           "full_cache": {"cache_growth": None}, "unmerged": {"merge_lora": False}}


def build_hf_model(layers: int, width: int, vocab: int, image_size: int, seed: int):
  """A random `transformers` LLaVA: LLaMA `layers` x `width`, a 2-layer 64-wide CLIP."""
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel

  text = transformers.LlamaConfig(
      vocab_size=vocab, hidden_size=width, intermediate_size=width * 11 // 4,
      num_hidden_layers=layers, num_attention_heads=max(1, width // 64),
      num_key_value_heads=max(1, width // 64), max_position_embeddings=4096, rms_norm_eps=1e-5)
  vision = transformers.CLIPVisionConfig(
      hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
      image_size=image_size, patch_size=PATCH, projection_dim=64)
  cfg = transformers.LlavaConfig(vision_config=vision, text_config=text,
                                 image_token_index=vocab - 1)
  torch.manual_seed(seed)
  model = transformers.LlavaForConditionalGeneration(cfg).eval()
  with torch.no_grad():  # wider than the 0.02 default, so logits are far from uniform
    for p in model.parameters():
      if p.ndim > 1:
        p.normal_(0.0, 1.0 / p.shape[-1] ** 0.5)
  model.generation_config.eos_token_id = None  # every row runs to max_new_tokens
  return model


def make_prompts(batch: int, prompt_len: int, vocab: int, image_size: int, seed: int):
  """Left-padded input_ids (rows 0..batch-1 of slightly different lengths), mask, pixels."""
  rng = np.random.default_rng(seed)
  slots = (image_size // PATCH) ** 2
  ids = np.zeros((batch, prompt_len), np.int64)
  mask = np.zeros((batch, prompt_len), np.int64)
  for b in range(batch):
    n = prompt_len - (b % 4)  # different lengths exercise the padding path on both sides
    text = rng.integers(3, vocab - 1, size=n - 1 - slots)
    row = np.concatenate([[1], np.full(slots, vocab - 1), text])
    ids[b, prompt_len - n:], mask[b, prompt_len - n:] = row, 1
  pixels = rng.normal(size=(batch, 3, image_size, image_size)).astype(np.float32)
  return ids, mask, pixels


def timed(fn):
  start = time.perf_counter()
  out = fn()
  return time.perf_counter() - start, out


def set_threads(threads: int) -> None:
  """Limits both frameworks to `threads` CPU threads; must run before JAX's first computation."""
  import torch  # pylint: disable=import-outside-toplevel

  if threads <= 0:
    return
  torch.set_num_threads(threads)
  xla = (f"--xla_cpu_multi_thread_eigen={'true' if threads > 1 else 'false'} "
         f"intra_op_parallelism_threads={threads}")
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {xla}".strip()


def compare(generator: Generator, hf, *, batch: int, prompt_len: int, new_tokens: int,
            image_size: int, repeats: int, seed: int, max_new_tokens: int | None = None) -> dict:
  """Times `generator` (ours) against `hf.generate` on the same prompts, interleaved.

  Every row generates `new_tokens` tokens. With a larger `max_new_tokens` (the reference
  protocol allows 2048 while answers end by EOS after a few hundred), both sides get that budget
  and each row ends by a stop sequence instead: its last four tokens of a first greedy run of
  `new_tokens` (ours: `stop_token_sequences`; `transformers`: a `StoppingCriteria`), so the two
  still generate the same tokens.

  Returns tokens/s (generated tokens / wall time of a whole call, median), every timed call,
  the first calls (compilation for ours) and the share of identical generated tokens.
  """
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel

  vocab = hf.config.text_config.vocab_size
  ids, mask, pixels = make_prompts(batch, prompt_len, vocab, image_size, seed)
  budget = max(max_new_tokens or new_tokens, new_tokens)
  stops = []
  if budget > new_tokens:
    if new_tokens < STOP_LENGTH:
      raise ValueError(f"bench_decode: a budget above new_tokens ends rows by their last "
                       f"{STOP_LENGTH} tokens; new_tokens={new_tokens} is too few")
    free = generator(ids, mask, pixels, max_new_tokens=new_tokens, eos_id=None, pad_id=0)
    stops = [row[-STOP_LENGTH:].tolist() for row in free.tokens]
  stops_torch = torch.tensor(stops).reshape(len(stops), STOP_LENGTH)

  class EndsWithStop(transformers.StoppingCriteria):
    """Ends a row whose last generated tokens are one of `stops` (prompt tokens never count,
    as in our window)."""

    def __call__(self, input_ids, scores, **kwargs):
      del scores, kwargs
      if input_ids.shape[1] - ids.shape[1] < STOP_LENGTH:
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
      last = input_ids[:, None, -STOP_LENGTH:]
      return (last == stops_torch.to(input_ids.device)[None]).all(dim=-1).any(dim=-1)

  def ours():
    return generator(ids, mask, pixels, max_new_tokens=budget, eos_id=None, pad_id=0,
                     stop_token_sequences=stops)

  def theirs():
    with torch.no_grad():
      out = hf.generate(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                        pixel_values=torch.from_numpy(pixels), do_sample=False,
                        max_new_tokens=budget, pad_token_id=0,
                        stopping_criteria=transformers.StoppingCriteriaList(
                            [EndsWithStop()] if stops else []))
    return out[:, ids.shape[1]:].numpy()

  warm_ours, out_ours = timed(ours)
  warm_theirs, tokens_theirs = timed(theirs)
  lengths = out_ours.lengths
  if not stops and (out_ours.tokens.shape != (batch, new_tokens)
                    or tokens_theirs.shape != (batch, new_tokens)):
    raise RuntimeError(f"bench_decode: expected {new_tokens} new tokens per row, got "
                       f"{out_ours.tokens.shape} (ours) and {tokens_theirs.shape} (transformers)")
  if stops and tokens_theirs.shape[1] != lengths.max():
    raise RuntimeError(f"bench_decode: transformers generated {tokens_theirs.shape[1]} tokens "
                       f"per row, ours stopped every row by {lengths.max()}: the stop "
                       "sequences did not end its rows alike")
  # Both checks above leave transformers at least as many columns as any row of ours.
  same = [np.mean(out_ours.tokens[b, :n] == tokens_theirs[b, :n]) for b, n in enumerate(lengths)]
  t_ours, t_theirs = [], []
  for _ in range(repeats):
    t_ours.append(timed(ours)[0])
    t_theirs.append(timed(theirs)[0])
  tokens = int(lengths.sum())
  entry = {"batch": batch, "max_new_tokens": budget, "generated_tokens": tokens,
           "ours_tokens_per_second": tokens / statistics.median(t_ours),
           "transformers_tokens_per_second": tokens / statistics.median(t_theirs),
           "ours_seconds": t_ours, "transformers_seconds": t_theirs,
           "ours_first_call_seconds": warm_ours, "transformers_first_call_seconds": warm_theirs,
           "same_tokens": float(np.mean(same))}
  entry["speedup"] = entry["ours_tokens_per_second"] / entry["transformers_tokens_per_second"]
  return entry


def with_random_adapters(hf_dir: str, rank: int, seed: int):
  """Ours from `hf_dir` with rank-`rank` LoRA adapters (alpha 2 x rank, random non-zero B) on
  every decoder projection, and `transformers` with the same function as one LLaVA, the
  adapters merged (exported by `to_hf`): the fastest form the PyTorch side can take."""
  import transformers  # pylint: disable=import-outside-toplevel

  model, _ = load_pretrained(hf_dir, lora={"rank": rank, "alpha": 2.0 * rank})
  rng = np.random.default_rng(seed)
  for _, module in nnx.iter_modules(model):
    if isinstance(module, Linear) and module.lora_b is not None:
      module.lora_b[...] = rng.normal(0.0, 0.01, module.lora_b.shape).astype(np.float32)
  merged_dir = os.path.join(hf_dir, "merged")
  os.makedirs(merged_dir)
  export_model(model, merged_dir)
  hf = transformers.LlavaForConditionalGeneration.from_pretrained(merged_dir).eval()
  hf.generation_config.eos_token_id = None
  return model, hf


def main(argv):
  del argv
  unknown = set(FLAGS.layouts) - set(LAYOUTS)
  if unknown:
    raise app.UsageError(f"--layouts: unknown {sorted(unknown)}; choose from {sorted(LAYOUTS)}")
  set_threads(FLAGS.threads)
  hf = build_hf_model(FLAGS.layers, FLAGS.width, FLAGS.vocab, FLAGS.image_size, FLAGS.seed)
  with tempfile.TemporaryDirectory() as tmp:
    hf.save_pretrained(tmp)
    if not FLAGS.lora_rank:
      model, _ = load_pretrained(tmp)
    else:
      model, hf = with_random_adapters(tmp, FLAGS.lora_rank, FLAGS.seed)
  rows = []
  for layout in FLAGS.layouts:
    generator = Generator(model, **LAYOUTS[layout])
    for batch in map(int, FLAGS.batch_sizes):
      rows.append(dict(compare(generator, hf, batch=batch, prompt_len=FLAGS.prompt_len,
                               new_tokens=FLAGS.new_tokens, image_size=FLAGS.image_size,
                               repeats=FLAGS.repeats, seed=FLAGS.seed + batch,
                               max_new_tokens=FLAGS.max_new_tokens), layout=layout))

  budget = (f" (budget {rows[0]['max_new_tokens']}: rows end by a stop sequence after that "
            "many or fewer)" if FLAGS.max_new_tokens > FLAGS.new_tokens else "")
  print(f"\nGreedy decoding, fp32, {jax.devices()[0].platform.upper()} "
        f"({os.cpu_count()} cores visible, threads per framework: "
        f"{FLAGS.threads or 'default'}); LLaMA {FLAGS.layers} layers x {FLAGS.width}, vocab "
        f"{FLAGS.vocab}{f', LoRA rank {FLAGS.lora_rank}' if FLAGS.lora_rank else ''}, CLIP 2 x "
        f"64 at {FLAGS.image_size}px; prompt {FLAGS.prompt_len} tokens, "
        f"{FLAGS.new_tokens} new tokens{budget}; median of {FLAGS.repeats} interleaved calls.\n")
  print("| layout | batch | emola-jax tok/s | transformers tok/s | speed-up | emola-jax first "
        "call s (compile) | transformers first call s | same tokens |")
  print("|---|---|---|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['layout']} | {r['batch']} | {r['ours_tokens_per_second']:.0f} | "
          f"{r['transformers_tokens_per_second']:.0f} | {r['speedup']:.2f}x | "
          f"{r['ours_first_call_seconds']:.2f} | {r['transformers_first_call_seconds']:.2f} | "
          f"{r['same_tokens']:.1%} |")


def run():
  app.run(main)


if __name__ == "__main__":
  run()
