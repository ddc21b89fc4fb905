"""Shared machinery of emola-infer and emola-eval: checkpoint + tokenizer, prompts, batched answers.

* `load_checkpoint` reads a native checkpoint (`config.json` + `params/`, e.g. `WORKDIR/final`) or
  a `transformers` LLaVA directory, and the tokenizer that goes with it.
* `PromptBuilder` makes the vicuna_v1 generation prompt of one question, ending with `ASSISTANT:`,
  with `<image>` expanded to `config.num_image_slots` copies of `config.image_token_index` (the
  visual tokens plus the prior token when the model has one), exactly as training tokenises it.
* `check_prior_dim` says, before any work, whether a landmark prior provider fits the model.
* `Predictor.run` prepares samples (image decoding, priors) in worker threads while the device
  generates the previous batch, runs the compiled `Generator` in fixed-size batches (the last,
  smaller batch reuses the same compiled shape), decodes the answers and yields one `Outcome` per
  input in input order, with a tqdm progress bar. A sample whose preparation raises
  `SampleFailure` (unreadable image, no face, missing prior) comes out with its status and reason
  and the run goes on.
* `define_shared_flags` / `make_prior_provider`: the model, prior and decoding
  flags both commands take, parsed into a private absl registry (so the commands can be run
  in-process side by side, e.g. in tests).
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from emola_jax.data import conversation as conv
from emola_jax.data import images as images_lib
from emola_jax.data import tokenize as tokenize_lib

# `Outcome.status` values. Anything but OK means no answer was generated for the sample.
OK = "ok"
UNREADABLE = "unreadable"  # the file cannot be read or decoded as an image
NO_FACE = "no_face"  # the face detector found no face
NO_PRIOR = "no_prior"  # no stored prior, or one of the wrong size

# Landmark priors the computed providers give, for the hints of `prior_hint`.
COMPUTED_PRIOR_DIM = 136  # dlib / face_alignment: 68 landmarks x (x, y)
INSIGHTFACE_PRIOR_DIM = 212  # FABA-Instruct's .npy files: InsightFace 2d106det, 106 x (x, y)


class CheckpointLoadError(ValueError):
  """A checkpoint or tokenizer directory that cannot be used; the message says what to pass."""


class PriorMismatchError(ValueError):
  """A prior provider whose vectors do not fit the model's prior token."""


class SampleFailure(Exception):
  """One sample cannot be answered; the run goes on and reports `status` and `reason`."""

  def __init__(self, status: str, reason: str, info: dict[str, Any] | None = None):
    super().__init__(reason)
    self.status = status
    self.reason = reason
    self.info = dict(info or {})


@dataclasses.dataclass
class LoadedCheckpoint:
  """A model ready to generate, with its tokenizer."""

  model: Any  # EmolaModel
  config: Any  # EmolaConfig
  tokenizer: Any  # a transformers LLaMA tokenizer
  path: str
  tokenizer_dir: str
  kind: str  # "native" or "hf"


def _has_tokenizer_files(directory: str) -> bool:
  return any(os.path.isfile(os.path.join(directory, name))
             for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"))


def find_tokenizer_dir(checkpoint: str, tokenizer: str | None = None) -> str:
  """`tokenizer` if given, else `<checkpoint>/tokenizer/`, else the checkpoint folder itself."""
  if tokenizer:
    if not os.path.isdir(tokenizer) or not _has_tokenizer_files(tokenizer):
      raise CheckpointLoadError(f"--tokenizer={tokenizer}: not a transformers tokenizer folder "
                                "(no tokenizer.json / tokenizer.model / tokenizer_config.json)")
    return tokenizer
  for candidate in (os.path.join(checkpoint, "tokenizer"), checkpoint):
    if os.path.isdir(candidate) and _has_tokenizer_files(candidate):
      return candidate
  raise CheckpointLoadError(
      f"{checkpoint}: no tokenizer found (neither {checkpoint}/tokenizer/ nor tokenizer files in "
      "the folder itself); pass --tokenizer=DIR (e.g. the base LLaVA-1.5 folder)")


def load_checkpoint(path: str, *, tokenizer: str | None = None,
                    dtype: str | None = None) -> LoadedCheckpoint:
  """Loads a native checkpoint or a `transformers` LLaVA folder, and its tokenizer.

  Args:
    path: `WORKDIR/final` of emola-train, an emola-convert output, or a LLaVA HF folder.
    tokenizer: a tokenizer folder overriding the one found beside the weights.
    dtype: compute dtype override ("float32", "bfloat16", "float16"); None keeps the saved one.
  """
  # Imported here so that flag errors and --help answer without loading JAX.
  # pylint: disable=import-outside-toplevel
  import transformers
  from emola_jax.conversion import hf_load, native
  from emola_jax.conversion.safetensors_io import CheckpointError

  if not os.path.isdir(path):
    raise CheckpointLoadError(f"--checkpoint={path}: no such directory")
  overrides = {"dtype": dtype} if dtype else {}
  try:
    if native.is_native_checkpoint(path):
      model, config = native.load_native(path, **overrides)
      kind = "native"
    elif os.path.isfile(os.path.join(path, native.CONFIG_FILE)):
      model, config = hf_load.load_pretrained(path, **overrides)
      kind = "hf"
      if not hasattr(config, "num_image_slots"):
        raise CheckpointLoadError(f"{path}: a {type(config).__name__} checkpoint, not a LLaVA / "
                                  "EmoLA model; pass a LLaVA folder or a native checkpoint")
    else:
      final = os.path.join(path, "final")
      hint = (f"; did you mean {final} (emola-train writes its model there)?"
              if native.is_native_checkpoint(final) else "")
      raise CheckpointLoadError(f"{path}: neither a native checkpoint (config.json + params/) nor "
                                f"a transformers folder (config.json + *.safetensors){hint}")
  except CheckpointError as e:
    raise CheckpointLoadError(str(e)) from None
  tokenizer_dir = find_tokenizer_dir(path, tokenizer)
  try:
    tok = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
  except (OSError, ValueError) as e:
    raise CheckpointLoadError(f"{tokenizer_dir}: cannot load the tokenizer ({e})") from None
  return LoadedCheckpoint(model, config, tok, path, tokenizer_dir, kind)


def prior_hint(config: Any) -> str:
  """Which prior provider(s) a model's prior token was made for, as advice."""
  if not config.has_prior:
    return "this checkpoint has no prior token: use --prior=none"
  dim = config.prior_dim
  if dim == COMPUTED_PRIOR_DIM:
    return (f"this checkpoint needs prior_dim={dim} vectors: --prior=dlib or "
            "--prior=face_alignment (68 landmarks), or stored 136-d .npy priors (--prior=npy)")
  if dim == INSIGHTFACE_PRIOR_DIM:
    return (f"this checkpoint needs prior_dim={dim} vectors (InsightFace 2d106det landmarks, as "
            "FABA-Instruct ships them): --prior=npy with those .npy files; dlib and "
            f"face_alignment give {COMPUTED_PRIOR_DIM}-d vectors")
  return (f"this checkpoint needs prior_dim={dim} vectors: --prior=npy with stored {dim}-d "
          f"priors (dlib and face_alignment give {COMPUTED_PRIOR_DIM}-d vectors)")


def check_prior_dim(config: Any, provider: str, provider_dim: int | None) -> None:
  """Raises PriorMismatchError unless `provider` (giving `provider_dim`-d vectors, None = any
  stored size) can feed this model's prior token."""
  if not config.has_prior:
    if provider != "none":
      raise PriorMismatchError(f"--prior={provider}: {prior_hint(config)}")
    return
  if provider == "none":
    raise PriorMismatchError(f"--prior=none: {prior_hint(config)}")
  if provider_dim is not None and provider_dim != config.prior_dim:
    raise PriorMismatchError(f"--prior={provider} gives {provider_dim}-d vectors but "
                             f"{prior_hint(config)}")


def check_provider(config: Any, provider: str) -> None:
  """`check_prior_dim` with the provider's own size: dlib and face_alignment give
  COMPUTED_PRIOR_DIM-d vectors, npy and none whatever is stored."""
  computed = provider in ("dlib", "face_alignment")
  check_prior_dim(config, provider, COMPUTED_PRIOR_DIM if computed else None)


class PromptBuilder:
  """Ids of the vicuna_v1 generation prompt of one question (memoised per question)."""

  def __init__(self, tokenizer: Any, config: Any):
    self.tokenizer = tokenize_lib.ConversationTokenizer(
        tokenizer, num_image_slots=config.num_image_slots,
        image_token_index=config.image_token_index)
    self._cache: dict[str, np.ndarray] = {}

  def __call__(self, question: str) -> np.ndarray:
    """[BOS] system USER: <image slots>\\n{question} ASSISTANT:  as int32 ids."""
    ids = self._cache.get(question)
    if ids is None:
      ids = self.tokenizer.prompt_ids(conv.generation_turns(question, has_image=True))
      if len(self._cache) < 256:
        self._cache[question] = ids
    return ids


def pixel_values(image: Any, config: Any, mode: str) -> np.ndarray:
  """CLIP pixels [3, S, S] of a PIL image for this model ("pad": training's preprocessing,
  "crop": the reference evaluation's)."""
  return images_lib.preprocess_image(image, config.vision.image_size, mode)


@dataclasses.dataclass
class Prepared:
  """One sample ready to generate; `info` travels to its Outcome."""

  input_ids: np.ndarray  # int32 [n]
  pixel_values: np.ndarray  # float32 [3, S, S]
  prior: np.ndarray | None  # float32 [prior_dim], None for models without a prior token
  info: dict[str, Any] = dataclasses.field(default_factory=dict)
  seconds: float = 0.0  # host time spent preparing it


@dataclasses.dataclass
class Outcome:
  """The answer to one input, or why there is none.

  seconds: this sample's preparation time plus its share of its batch's generation time.
  """

  index: int
  item: Any
  status: str
  reason: str | None
  text: str | None
  n_tokens: int
  finished: bool
  seconds: float
  info: dict[str, Any]


@dataclasses.dataclass
class RunStats:
  """Totals of one or more `Predictor.run` calls."""

  n_inputs: int = 0
  n_answered: int = 0
  n_failed: int = 0
  n_batches: int = 0
  tokens_generated: int = 0
  seconds_generation: float = 0.0
  seconds_first_batch: float | None = None  # includes the compilation of the decoding loop
  seconds_total: float = 0.0

  def as_dict(self) -> dict[str, Any]:
    out = dataclasses.asdict(self)
    gen = self.seconds_generation
    out["tokens_per_second"] = self.tokens_generated / gen if gen > 0 else None
    out["seconds_per_input"] = self.seconds_total / self.n_inputs if self.n_inputs else None
    return out


def _timed(prepare: Callable[[Any], Prepared], item: Any) -> Prepared | SampleFailure:
  start = time.perf_counter()
  try:
    prepared = prepare(item)
  except SampleFailure as failure:
    failure.info.setdefault("seconds", time.perf_counter() - start)
    return failure
  prepared.seconds = time.perf_counter() - start
  return prepared


def batch_seed(seed: int, batch_index: int) -> int:
  """A distinct sampling seed per batch (rows of different batches must not share streams)."""
  return int(np.random.SeedSequence([seed, batch_index]).generate_state(1)[0])


class Predictor:
  """Batched generation over prepared samples with one compiled decoding loop."""

  def __init__(self, loaded: LoadedCheckpoint, *, batch_size: int, max_new_tokens: int,
               temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
               length_bucket: int = 64):
    # pylint: disable-next=import-outside-toplevel
    from emola_jax.evaluation.generate import Generator

    if batch_size < 1:
      raise ValueError(f"--batch_size={batch_size} must be >= 1")
    if max_new_tokens < 1:
      raise ValueError(f"--max_new_tokens={max_new_tokens} must be >= 1")
    self.loaded = loaded
    self.batch_size = batch_size
    self.max_new_tokens = max_new_tokens
    self.temperature = temperature
    self.top_p = top_p
    self.seed = seed
    # One batch bucket: a smaller last batch is padded to batch_size and reuses the compiled loop.
    self.generator = Generator(loaded.model, length_bucket=length_bucket,
                               batch_buckets=(batch_size,))
    self.stats = RunStats()
    self._batches_seen = 0

  def use(self, loaded: LoadedCheckpoint) -> bool:
    """Switches to another checkpoint; True if the compiled loop is kept (same config)."""
    same = loaded.config == self.loaded.config
    if same:
      self.generator.refresh(loaded.model)
    else:
      # pylint: disable-next=import-outside-toplevel
      from emola_jax.evaluation.generate import Generator
      self.generator = Generator(loaded.model, length_bucket=self.generator.length_bucket,
                                 batch_buckets=(self.batch_size,))
    self.loaded = loaded
    return same

  def generate(self, batch: Sequence[Prepared]) -> list[tuple[str, int, bool]]:
    """(text, generated tokens, ended by EOS) per sample of one batch (<= batch_size)."""
    config, tokenizer = self.loaded.config, self.loaded.tokenizer
    longest = max(len(p.input_ids) for p in batch)
    limit = config.text.max_position_embeddings
    if longest + self.max_new_tokens > limit:
      raise ValueError(f"--max_new_tokens={self.max_new_tokens}: a prompt of {longest} tokens "
                       f"plus {self.max_new_tokens} new ones exceeds the model's "
                       f"max_position_embeddings={limit}; lower --max_new_tokens")
    pad_id = config.text.pad_token_id
    ids = np.full((len(batch), longest), pad_id, np.int32)
    mask = np.zeros((len(batch), longest), np.int32)
    for row, p in enumerate(batch):
      ids[row, :len(p.input_ids)] = p.input_ids
      mask[row, :len(p.input_ids)] = 1
    pixels = np.stack([p.pixel_values for p in batch])
    priors = (np.stack([np.asarray(p.prior, np.float32) for p in batch])
              if config.has_prior else None)
    out = self.generator(ids, mask, pixels, priors, max_new_tokens=self.max_new_tokens,
                         eos_id=tokenizer.eos_token_id, pad_id=pad_id,
                         temperature=self.temperature, top_p=self.top_p,
                         seed=batch_seed(self.seed, self._batches_seen), padding_side="right")
    self._batches_seen += 1
    texts = tokenizer.batch_decode(out.sequences(), skip_special_tokens=True)
    return [(text.strip(), int(n), bool(done))
            for text, n, done in zip(texts, out.lengths, out.finished)]

  def run(self, items: Sequence[Any], prepare: Callable[[Any], Prepared], *,
          desc: str = "generating", num_workers: int = 2, progress: bool = True,
          unit: str = "image") -> Iterator[Outcome]:
    """Yields an Outcome per item, in order (see the module docstring).

    `prepare(item)` runs in `num_workers` threads, up to two batches ahead of the device; it
    raises `SampleFailure` for a sample that cannot be answered. Other exceptions stop the run.
    """
    # pylint: disable-next=import-outside-toplevel
    from tqdm.auto import tqdm

    items = list(items)
    size = self.batch_size
    chunks = [range(start, min(start + size, len(items))) for start in range(0, len(items), size)]
    started = time.perf_counter()
    bar = tqdm(total=len(items), desc=desc, unit=unit, disable=not progress, file=sys.stderr,
               dynamic_ncols=True)
    with concurrent.futures.ThreadPoolExecutor(max(1, num_workers)) as pool, bar:
      pending: collections.deque = collections.deque()

      def submit(chunk: range) -> list[concurrent.futures.Future]:
        return [pool.submit(_timed, prepare, items[i]) for i in chunk]

      for chunk in chunks[:2]:
        pending.append(submit(chunk))
      for number, chunk in enumerate(chunks):
        results = [future.result() for future in pending.popleft()]
        if number + 2 < len(chunks):
          pending.append(submit(chunks[number + 2]))
        ready = [r for r in results if isinstance(r, Prepared)]
        answers: list[tuple[str, int, bool]] = []
        share = 0.0
        if ready:
          start = time.perf_counter()
          answers = self.generate(ready)
          seconds = time.perf_counter() - start
          share = seconds / len(ready)
          self.stats.seconds_generation += seconds
          self.stats.n_batches += 1
          if self.stats.seconds_first_batch is None:
            self.stats.seconds_first_batch = seconds
        answer_iter = iter(answers)
        for index, result in zip(chunk, results):
          if isinstance(result, SampleFailure):
            self.stats.n_failed += 1
            outcome = Outcome(index, items[index], result.status, result.reason, None, 0, False,
                              float(result.info.pop("seconds", 0.0)), result.info)
          else:
            text, n_tokens, finished = next(answer_iter)
            self.stats.n_answered += 1
            self.stats.tokens_generated += n_tokens
            outcome = Outcome(index, items[index], OK, None, text, n_tokens, finished,
                              result.seconds + share, result.info)
          self.stats.n_inputs += 1
          yield outcome
        bar.update(len(chunk))
        if self.stats.n_failed:
          bar.set_postfix(failed=self.stats.n_failed, refresh=False)
    self.stats.seconds_total += time.perf_counter() - started


# --- command-line flags shared by emola-infer and emola-eval ------------------------------------

PRIOR_CHOICES = ("auto", "npy", "dlib", "face_alignment", "none")


def define_shared_flags(fv: Any, *, batch_size: int, max_new_tokens: int) -> None:
  """Defines the model, prior and decoding flags both commands take in the FlagValues `fv`."""
  # pylint: disable-next=import-outside-toplevel
  from absl import flags

  def define(kind, name, default, help_text, *args):
    getattr(flags, f"DEFINE_{kind}")(name, default, *args, help_text, flag_values=fv)

  define("string", "checkpoint", None, "A native checkpoint (config.json + params/, e.g. "
         "WORKDIR/final of emola-train) or a transformers LLaVA folder.")
  define("string", "tokenizer", None, "Tokenizer folder (default: CHECKPOINT/tokenizer/, else "
         "the checkpoint folder itself).")
  define("enum", "dtype", None, "Compute dtype (default: the checkpoint's).",
         ["float32", "bfloat16", "float16"])
  define("integer", "batch_size", batch_size, "Images per generation batch (one compiled shape; "
         "a smaller last batch is padded).")
  define("integer", "max_new_tokens", max_new_tokens, "Generated tokens per answer at most "
         "(the reference protocol uses 2048).")
  define("float", "temperature", 0.0, "0 = greedy (default; the reference samples at 0.01 with "
         "top_p 0.5, which is greedy in effect); > 0 samples.")
  define("float", "top_p", 1.0, "Nucleus sampling threshold (with --temperature > 0).")
  define("integer", "seed", 0, "Sampling seed.")
  define("enum", "image_mode", "pad", "pad: pad to a square with the CLIP mean colour, then CLIP "
         "preprocessing (as training does); crop: plain CLIP resize + centre crop (the reference "
         "evaluation).", list(images_lib.MODES))
  define("enum", "prior", "auto", "Landmark prior for the prior token. auto: none for models "
         "without one, else the stored prior when its size fits (emola-infer: a <image>.npy file "
         "beside the image) and otherwise dlib (136-d models only); npy: stored priors only; "
         "dlib / face_alignment: 68 landmarks computed from the image (136-d).",
         list(PRIOR_CHOICES))
  define("bool", "aligned", False, "The images are aligned face crops: dlib/face_alignment fit "
         "the landmarks in the whole image instead of detecting a face first.")
  define("integer", "upsample", 1, "dlib face detector upsampling (higher finds smaller faces, "
         "slower).")
  define("string", "fan_weights", None, "--prior=face_alignment: the local 2D FAN weights file "
         "(nothing is downloaded).")
  define("integer", "num_workers", 2, "Threads that decode images and compute priors while the "
         "model generates.")
  define("bool", "progress", True, "Show a progress bar (on stderr).")
  define("bool", "overwrite", False, "Replace existing outputs.")


def make_prior_provider(name: str, config: Any, *, aligned: bool = False, upsample: int = 1,
                        fan_weights: str | None = None) -> Any:
  """The provider `name` (npy, dlib, face_alignment, none) set up for this model."""
  # pylint: disable-next=import-outside-toplevel
  from emola_jax.data import priors

  if name == "npy":
    return priors.make_prior_provider("npy", prior_dim=config.prior_dim)
  if name == "dlib":
    return priors.make_prior_provider("dlib", detect=not aligned, upsample=upsample)
  if name == "face_alignment":
    return priors.make_prior_provider("face_alignment", weights_path=fan_weights,
                                      detect=not aligned, upsample=upsample)
  if name == "none":
    return priors.make_prior_provider("none")
  raise ValueError(f"unknown prior provider {name!r}")
