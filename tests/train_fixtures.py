"""A tiny prepared dataset (shards + tokenizer) for training tests, built in the test."""

from __future__ import annotations

import io
import pathlib

import numpy as np
from PIL import Image

from emola_jax.data import shards
from tests.fixtures_tokenizer import make_llama_tokenizer

ANSWERS = ["The person looks happy and relaxed.", "The face shows sadness.",
           "The eyebrows are raised, the eyes are wide open."]
PRIOR_DIM = 12


def _image(rng: np.random.Generator, label: int) -> bytes:
  pixels = rng.integers(0, 60, size=(32, 32, 3), dtype=np.uint8)
  pixels[..., label] += 150  # the answer is visible in the colour
  buf = io.BytesIO()
  Image.fromarray(pixels).save(buf, format="PNG")
  return buf.getvalue()


def make_dataset(root: pathlib.Path, num_train: int = 24, num_test: int = 6) -> dict[str, str]:
  """Writes `emotion_train` / `emotion_test` shards and a tokenizer; returns their paths."""
  rng = np.random.default_rng(0)
  for split, n in (("emotion_train", num_train), ("emotion_test", num_test)):
    examples = []
    for i in range(n):
      label = int(rng.integers(0, 3))
      examples.append({
          "id": f"{split}/{i}", "source": "fixture", "task": "emotion",
          "image_bytes": _image(rng, label),
          "prior": rng.normal(size=PRIOR_DIM).astype(np.float32),
          "conversations": [{"from": "human", "value": "What is the emotion of this face?\n<image>"},
                            {"from": "gpt", "value": ANSWERS[label]}],
          "label": str(label), "gpt4": ANSWERS[label]})
    shards.write_shards(examples, root / "data", split)
  tokenizer = make_llama_tokenizer(root / "tokenizer")
  return {"data": str(root / "data"), "tokenizer": str(tokenizer.hf_dir)}


def overrides(paths: dict[str, str]) -> list[str]:
  """Command-line overrides of configs/tiny.py for this dataset."""
  return [f"--config.data.dir={paths['data']}", f"--config.data.tokenizer={paths['tokenizer']}",
          "--config.model.text.vocab_size=520", "--config.model.image_token_index=519",
          f"--config.model.prior_dim={PRIOR_DIM}"]
