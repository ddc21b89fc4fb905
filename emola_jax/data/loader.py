"""Grain input pipeline: example dicts -> fixed-shape training batches, checkpointable.

  MapDataset.source(examples)            random access (e.g. `shards.open_split(...)`)
    .seed(seed).shuffle()                a new permutation every epoch
    .repeat(num_epochs)                  None: forever
    [shard_index::shard_count]           this process's disjoint share (multi-host)
    .map(ExampleProcessor)               decode + CLIP preprocess + prior + tokenise
    .to_iter_dataset(ReadOptions)
    -> _PadBatchIterDataset              skip rejected samples (counted), pad, stack
    .mp_prefetch(worker_count)           the steps above run in worker processes
    -> _StatsIterDataset                 strips the per-batch counters into `loader.stats`

A batch is a dict of numpy arrays with static shapes (for one jitted train step):
`input_ids` int32 [B, L], `attention_mask` int32 [B, L] (1 = real token), `loss_mask` float32
[B, L] (1 where input_ids[t] is a supervised target; the step shifts), `pixel_values` float32
[B, 3, S, S], `prior` float32 [B, prior_dim]. L = max_length, or the smallest of `length_buckets`
that holds the batch's longest sample.

Samples that cannot be trained on (image slots beyond max_length, no answer token left after
truncation, no face when `skip_no_face`) are skipped, logged with their id and counted in
`loader.stats`; every other problem (undecodable image, missing prior, malformed conversation)
raises with the record's id. The iterator is a `grain.DatasetIterator`: `get_state()` /
`set_state()` resume it exactly (counters included), and `checkpoint_args(loader)` gives the
Orbax `CheckpointManager` args that save it beside the model.

Worker processes are spawned and receive the pipeline pickled, everything passed by value: our
steps never read absl flags, and Grain forwards its own debug flags to the workers. Grain reads its
flags in the main process when it starts workers, so outside `absl.app.run` (pytest, notebooks)
`make_loader` marks the absl flags parsed (defaults) when worker_count > 0.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np
from absl import flags
from absl import logging

from emola_jax.data import images as images_lib
from emola_jax.data import priors as priors_lib
from emola_jax.data import tokenize as tokenize_lib

# Counters carried with every batch (from the worker that built it) into `LoaderStats`.
STAT_FIELDS = ("examples", "batches", "truncated", tokenize_lib.IMAGE_DOES_NOT_FIT,
               tokenize_lib.NO_TARGET_LEFT, "no_face")
_REJECTED = "_rejected"
_STATS = "_stats"


@dataclasses.dataclass
class LoaderStats:
  """Running totals for this process since the start of training (restored with the state)."""

  examples: int = 0  # samples delivered in batches
  batches: int = 0
  truncated: int = 0  # delivered samples cut to max_length
  image_does_not_fit: int = 0  # skipped: image slots beyond max_length
  no_target_left: int = 0  # skipped: no answer token within max_length
  no_face: int = 0  # skipped: no face found (only with skip_no_face)

  @property
  def skipped(self) -> int:
    return self.image_does_not_fit + self.no_target_left + self.no_face

  def as_dict(self) -> dict[str, int]:
    return dataclasses.asdict(self)


class ExampleProcessor:
  """One example dict -> model inputs (unpadded), or a rejection marker. Runs in workers."""

  def __init__(self, tokenizer: tokenize_lib.ConversationTokenizer, image_size: int,
               image_mode: str, prior_provider: priors_lib.PriorProvider, skip_no_face: bool):
    self.tokenizer = tokenizer
    self.image_size = image_size
    self.image_mode = image_mode
    self.prior_provider = prior_provider
    self.skip_no_face = skip_no_face

  def __call__(self, example: dict[str, Any]) -> dict[str, Any]:
    record_id = str(example.get("id", "<no id>"))
    conversations = example["conversations"]
    if isinstance(conversations, (str, bytes)):
      conversations = json.loads(conversations)
    try:
      tokens = self.tokenizer(conversations, has_image=True, record_id=record_id)
    except tokenize_lib.SampleRejected as e:
      return self._reject(e.reason, str(e))
    image = images_lib.decode_image(example["image_bytes"], record_id)
    try:
      prior = self.prior_provider(image, example.get("prior"), record_id)
    except priors_lib.NoFaceError as e:
      if not self.skip_no_face:
        raise
      return self._reject("no_face", str(e))
    return {
        "input_ids": tokens.input_ids,
        "loss_mask": tokens.loss_mask,
        "truncated": tokens.truncated,
        "pixel_values": images_lib.preprocess_image(image, self.image_size, self.image_mode),
        "prior": np.asarray(prior, np.float32),
    }

  @staticmethod
  def _reject(reason: str, message: str) -> dict[str, Any]:
    logging.log_first_n(logging.WARNING, "skipping a sample: %s", 20, message)
    return {_REJECTED: reason}


def _pick_length(longest: int, max_length: int, buckets: Sequence[int]) -> int:
  for bucket in buckets:
    if bucket >= longest:
      return bucket
  return max_length


def pad_batch(examples: Sequence[dict[str, Any]], *, pad_id: int, length: int) -> dict[str, Any]:
  """Right-pads processed examples to `length` and stacks them into a batch dict."""
  b = len(examples)
  input_ids = np.full((b, length), pad_id, np.int32)
  attention_mask = np.zeros((b, length), np.int32)
  loss_mask = np.zeros((b, length), np.float32)
  for i, ex in enumerate(examples):
    n = len(ex["input_ids"])
    input_ids[i, :n] = ex["input_ids"]
    attention_mask[i, :n] = 1
    loss_mask[i, :n] = ex["loss_mask"]
  return {
      "input_ids": input_ids,
      "attention_mask": attention_mask,
      "loss_mask": loss_mask,
      "pixel_values": np.stack([ex["pixel_values"] for ex in examples]),
      "prior": np.stack([ex["prior"] for ex in examples]).astype(np.float32, copy=False),
  }


class _PadBatchIterator(grain.DatasetIterator):
  """Groups processed examples into padded batches; counts and drops rejected ones."""

  def __init__(self, parent: grain.DatasetIterator, batch_size: int, drop_remainder: bool,
               pad_id: int, max_length: int, buckets: tuple[int, ...], reject_limit: int):
    super().__init__(parent)
    self._reject_limit = reject_limit
    self._batch_size = batch_size
    self._drop_remainder = drop_remainder
    self._pad_id = pad_id
    self._max_length = max_length
    self._buckets = buckets

  def __next__(self) -> dict[str, Any]:
    examples = []
    counts = dict.fromkeys(STAT_FIELDS, 0)
    consecutive_rejects = 0
    while len(examples) < self._batch_size:
      try:
        element = next(self._parent)
      except StopIteration:
        if examples and not self._drop_remainder:
          break
        raise
      if _REJECTED in element:
        counts[element[_REJECTED]] += 1
        consecutive_rejects += 1
        # A repeating stream whose every sample is rejected would otherwise never end.
        if consecutive_rejects > self._reject_limit:
          raise ValueError(
              f"{consecutive_rejects} samples in a row were rejected, a whole pass over this "
              f"process's data ({ {k: v for k, v in counts.items() if v} }); no batch can be "
              "made. Raise max_length or fix the data (see the warnings above).")
      else:
        consecutive_rejects = 0
        examples.append(element)
    longest = max(len(ex["input_ids"]) for ex in examples)
    batch = pad_batch(examples, pad_id=self._pad_id,
                      length=_pick_length(longest, self._max_length, self._buckets))
    counts["examples"] = len(examples)
    counts["batches"] = 1
    counts["truncated"] = sum(bool(ex["truncated"]) for ex in examples)
    batch[_STATS] = np.asarray([counts[k] for k in STAT_FIELDS], np.int64)
    return batch

  # A batch is produced whole, so between calls no example is buffered here.
  def get_state(self):
    return self._parent.get_state()

  def set_state(self, state):
    self._parent.set_state(state)


class _PadBatchIterDataset(grain.IterDataset):

  def __init__(self, parent: grain.IterDataset, **kwargs):
    super().__init__(parent)
    self._kwargs = kwargs

  def __iter__(self) -> _PadBatchIterator:
    return _PadBatchIterator(self._parent.__iter__(), **self._kwargs)


class LoaderIterator(grain.DatasetIterator):
  """The loader: yields batch dicts; `stats` holds the running counters; checkpointable."""

  def __init__(self, parent: grain.DatasetIterator):
    super().__init__(parent)
    self.stats = LoaderStats()

  def __next__(self) -> dict[str, np.ndarray]:
    batch = next(self._parent)
    for name, value in zip(STAT_FIELDS, batch.pop(_STATS).tolist()):
      setattr(self.stats, name, getattr(self.stats, name) + int(value))
    return batch

  def get_state(self) -> dict[str, Any]:
    return {"pipeline": self._parent.get_state(), "stats": self.stats.as_dict()}

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state["pipeline"])
    self.stats = LoaderStats(**state["stats"])


class _StatsIterDataset(grain.IterDataset):

  def __iter__(self) -> LoaderIterator:
    return LoaderIterator(self._parent.__iter__())


def make_loader(source: Sequence[dict[str, Any]], *, tokenizer: Any, num_image_slots: int,
                image_token_index: int, pad_id: int, image_size: int,
                prior_provider: priors_lib.PriorProvider, batch_size: int, max_length: int,
                image_mode: str = "pad", seed: int = 0, shuffle: bool = True,
                num_epochs: int | None = 1, drop_remainder: bool = True,
                length_buckets: Sequence[int] = (), shard_index: int | None = None,
                shard_count: int | None = None, worker_count: int = 0, prefetch: int = 2,
                read_threads: int = 1, skip_no_face: bool = False) -> LoaderIterator:
  """Builds the training/evaluation iterator (see the module docstring).

  Args:
    source: random-access examples (`shards.open_split(...)` or a list of example dicts).
    tokenizer: a `transformers` LLaMA tokenizer, or the folder to load one from.
    num_image_slots, image_token_index, pad_id, image_size: from the model config
      (`loader_fields_from_config`).
    prior_provider: a `priors.PriorProvider` (`priors.make_prior_provider(name, ...)`).
    batch_size: examples per batch on THIS process.
    max_length: tokens per sample after expanding the image; longer samples are truncated.
    image_mode: "pad" (LLaVA-1.5 training) or "crop" (plain CLIP).
    seed, shuffle: the example order (a new permutation each epoch).
    num_epochs: passes over the data; None repeats forever (use a step count then; on several
      hosts this keeps every process yielding batches).
    drop_remainder: drop a last incomplete batch (True for training: static shapes).
    length_buckets: pad each batch to the smallest bucket >= its longest sample (each <=
      max_length); empty: always max_length. Every bucket is one compiled shape.
    shard_index, shard_count: this process's share; default jax.process_index()/process_count().
    worker_count: worker processes (0: all in this process).
    prefetch: batches buffered per worker.
    read_threads: threads per process that run the per-example steps.
    skip_no_face: count and skip images where the prior provider finds no face, instead of
      raising.
  """
  if isinstance(tokenizer, str):
    import transformers  # pylint: disable=import-outside-toplevel
    tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer)
  if shard_index is None or shard_count is None:
    # Lazy: worker processes import this module and need no jax.
    import jax  # pylint: disable=import-outside-toplevel
    shard_index = jax.process_index() if shard_index is None else shard_index
    shard_count = jax.process_count() if shard_count is None else shard_count
  if not 0 <= shard_index < shard_count:
    raise ValueError(f"shard_index={shard_index} is not in [0, shard_count={shard_count})")
  if batch_size < 1:
    raise ValueError(f"batch_size={batch_size} must be >= 1")
  buckets = tuple(sorted(int(b) for b in length_buckets))
  if any(b > max_length or b < 1 for b in buckets):
    raise ValueError(f"length_buckets {list(buckets)} must lie in [1, max_length={max_length}]")
  if len(source) == 0:
    raise ValueError("the data source is empty")
  if image_mode not in images_lib.MODES:
    raise ValueError(f"image_mode {image_mode!r} is not one of {images_lib.MODES}")
  if num_epochs is not None and num_epochs < 1:
    raise ValueError(f"num_epochs={num_epochs} must be >= 1, or None to repeat forever")
  processor = ExampleProcessor(
      tokenize_lib.ConversationTokenizer(tokenizer, num_image_slots=num_image_slots,
                                         image_token_index=image_token_index,
                                         max_length=max_length),
      image_size, image_mode, prior_provider, skip_no_face)

  ds = grain.MapDataset.source(source).seed(seed)
  if shuffle:
    ds = ds.shuffle()
  ds = ds.repeat(num_epochs)
  ds = ds[shard_index::shard_count]
  ds = ds.map(processor)
  it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads,
                                               prefetch_buffer_size=max(1, 2 * batch_size)))
  it_ds = _PadBatchIterDataset(it_ds, batch_size=batch_size, drop_remainder=drop_remainder,
                               pad_id=pad_id, max_length=max_length, buckets=buckets,
                               reject_limit=-(-len(source) // shard_count))
  if worker_count > 0:
    _ensure_flags_parsed()
    it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count,
                                                           per_worker_buffer_size=prefetch))
  return iter(_StatsIterDataset(it_ds))


def _ensure_flags_parsed() -> None:
  """Grain's multiprocessing reads its absl flags (--grain_enable_multiprocess_worker_profiling)
  in the main process; outside `absl.app.run` (notebooks, pytest) nothing has parsed them, so
  mark them parsed with their defaults. Under absl.app.run this is a no-op."""
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def loader_fields_from_config(config: Any) -> dict[str, int]:
  """The loader arguments an `EmolaConfig` fixes."""
  return {
      "num_image_slots": config.num_image_slots,
      "image_token_index": config.image_token_index,
      "pad_id": config.text.pad_token_id,
      "image_size": config.vision.image_size,
  }


def checkpoint_args(loader: LoaderIterator, restore: bool = False) -> Any:
  """Orbax args that save (or restore into) `loader`, e.g. in a `CheckpointManager` Composite:

    ocp.args.Composite(state=ocp.args.StandardSave(...), data=checkpoint_args(loader))

  Grain's handler writes `process_<i>-of-<n>.json` per process, so multi-host jobs keep one
  state per process.
  """
  return (grain.checkpoint.CheckpointRestore(loader) if restore
          else grain.checkpoint.CheckpointSave(loader))
