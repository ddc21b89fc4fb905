"""Measures the loader's throughput (samples/s) on in-memory JPEG examples made from real photos.

  python -m emola_jax.data.bench_loader --image_size=336 --batch_size=8 --worker_counts=0,1,2

The examples are FABA-like: a face photo (astronaut / Grace Hopper, random 300-512 px crops that
keep the face, JPEG), a 212-d stored prior, an emotion question and a ~50-word answer. Without --tokenizer a
tiny LLaMA-format SentencePiece tokenizer is trained in a temporary folder (tokenisation is a
small part of the cost; pass a real tokenizer folder to include its exact cost).
"""

from __future__ import annotations

import io
import os
import tempfile
import time

import numpy as np
from absl import app, flags

_IMAGE_SIZE = flags.DEFINE_integer("image_size", 336, "CLIP input resolution.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 8, "Examples per batch.")
_WORKER_COUNTS = flags.DEFINE_list("worker_counts", ["0", "1", "2"], "Worker counts to time.")
_NUM_BATCHES = flags.DEFINE_integer("num_batches", 20, "Timed batches per setting.")
_NUM_EXAMPLES = flags.DEFINE_integer("num_examples", 64, "Distinct in-memory examples.")
_MAX_LENGTH = flags.DEFINE_integer("max_length", 2048, "Sequence length.")
_IMAGE_MODE = flags.DEFINE_enum("image_mode", "pad", ["pad", "crop"], "Image preprocessing.")
_PRIOR = flags.DEFINE_enum("prior", "npy", ["npy", "dlib", "none"], "Prior provider.")
_READ_THREADS = flags.DEFINE_integer("read_threads", 1, "Reader threads per process.")
_TOKENIZER = flags.DEFINE_string("tokenizer", None,
                                 "A transformers LLaMA tokenizer folder (default: a tiny one).")

_ANSWER = ("The person in the image appears to be experiencing happiness. The corners of the mouth "
           "are pulled up into a broad smile, the cheeks are raised and the eyes are slightly "
           "narrowed, which together form a genuine smile. The overall expression is warm, "
           "relaxed and friendly, suggesting contentment.")


def _tiny_tokenizer(directory: str) -> str:
  import sentencepiece as spm  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel

  from emola_jax.data.conversation import SYSTEM_PROMPT  # pylint: disable=import-outside-toplevel

  lines = [SYSTEM_PROMPT, _ANSWER, "USER: What is the emotion of this face? ASSISTANT:"] * 50
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(lines), model_writer=model, vocab_size=400, model_type="bpe",
      byte_fallback=True, split_digits=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
      normalization_rule_name="identity", remove_extra_whitespaces=False, hard_vocab_limit=False,
      minloglevel=2)
  with open(os.path.join(directory, "tokenizer.model"), "wb") as f:
    f.write(model.getvalue())
  transformers.LlamaTokenizer.from_pretrained(directory).save_pretrained(directory)
  return directory


def _examples(n: int, seed: int = 0) -> list[dict]:
  import matplotlib.cbook  # pylint: disable=import-outside-toplevel
  import skimage.data  # pylint: disable=import-outside-toplevel
  from PIL import Image  # pylint: disable=import-outside-toplevel

  with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as f:
    photos = [Image.fromarray(skimage.data.astronaut()), Image.open(f).convert("RGB")]
  # Face boxes (left, top, right, bottom), roughly dlib's: every crop keeps the whole face.
  faces = [(175, 76, 265, 166), (180, 139, 366, 325)]
  rng = np.random.default_rng(seed)
  out = []
  for i in range(n):
    photo, (fl, ft, fr, fb) = photos[i % 2], faces[i % 2]
    w, h = photo.size
    side = int(rng.integers(300, min(w, h) + 1))
    left = int(rng.integers(max(0, fr - side), min(fl, w - side) + 1))
    top = int(rng.integers(max(0, fb - side), min(ft, h - side) + 1))
    buf = io.BytesIO()
    photo.crop((left, top, left + side, min(h, top + side + int(rng.integers(0, 40))))).save(
        buf, format="JPEG", quality=90)
    out.append({
        "id": f"bench-{i}", "source": "bench", "task": "emotion", "image_bytes": buf.getvalue(),
        "prior": rng.uniform(0, 192, 212).astype(np.float32),
        "conversations": [{"from": "human", "value": "What is the emotion of this face?\n<image>"},
                          {"from": "gpt", "value": _ANSWER}],
        "label": "Happiness", "gpt4": "",
    })
  return out


def main(argv):
  del argv
  from emola_jax.data import loader, priors  # pylint: disable=import-outside-toplevel

  examples = _examples(_NUM_EXAMPLES.value)
  with tempfile.TemporaryDirectory() as tmp:
    tokenizer = _TOKENIZER.value or _tiny_tokenizer(tmp)
    provider = {
        "npy": lambda: priors.make_prior_provider("npy", prior_dim=212),
        "dlib": lambda: priors.make_prior_provider("dlib"),
        "none": lambda: priors.make_prior_provider("none"),
    }[_PRIOR.value]()
    print(f"image_size={_IMAGE_SIZE.value} batch_size={_BATCH_SIZE.value} "
          f"mode={_IMAGE_MODE.value} prior={_PRIOR.value} read_threads={_READ_THREADS.value} "
          f"cpus={os.cpu_count()}")
    for workers in (int(w) for w in _WORKER_COUNTS.value):
      start = time.perf_counter()
      it = loader.make_loader(
          examples, tokenizer=tokenizer, num_image_slots=577, image_token_index=32000, pad_id=0,
          image_size=_IMAGE_SIZE.value, prior_provider=provider, batch_size=_BATCH_SIZE.value,
          max_length=_MAX_LENGTH.value, image_mode=_IMAGE_MODE.value, num_epochs=None,
          shard_index=0, shard_count=1, worker_count=workers, prefetch=2,
          read_threads=_READ_THREADS.value)
      next(it)  # start-up: spawning workers, first batch
      first = time.perf_counter() - start
      start = time.perf_counter()
      for _ in range(_NUM_BATCHES.value):
        next(it)
      elapsed = time.perf_counter() - start
      it.close()
      rate = _NUM_BATCHES.value * _BATCH_SIZE.value / elapsed
      print(f"workers={workers}: {rate:.1f} samples/s ({elapsed / _NUM_BATCHES.value * 1e3:.0f} "
            f"ms/batch; first batch after {first:.1f} s)", flush=True)


def run():
  app.run(main)


if __name__ == "__main__":
  run()
