"""emola-infer end to end on a tiny random model: records, bad inputs, JSONL/CSV, real photos.

The model is random, so its answers are garbage text; what is checked is the pipeline: every
image gets exactly one record with the documented fields, failures carry their reason while the
run goes on, the prompt is the vicuna_v1 prompt with the model's image slots (checked against
the raw SentencePiece model), and --detect finds the face dlib itself finds.
"""

from __future__ import annotations

import csv
import json
import os
import pathlib
import subprocess
import sys

import dlib
import matplotlib.cbook
import numpy as np
import pytest
import skimage.data
from flax import nnx
from PIL import Image

from emola_jax.cli import infer
from emola_jax.conversion import native
from emola_jax.data.conversation import SYSTEM_PROMPT
from emola_jax.evaluation import au_parse
from emola_jax.evaluation import emotion_parse
from emola_jax.evaluation import predict
from emola_jax.model import presets
from emola_jax.model.emola import EmolaModel
from tests.fixtures_tokenizer import make_llama_tokenizer

VOCAB, IMAGE_ID = 520, 519
EMOTION_QUESTION = "What emotions are conveyed by this face?"
FIELDS = {"path", "status", "reason", "text", "emotion", "aus", "seconds", "n_tokens", "finished",
          "prior", "face_box"}


def tiny_config(prior_dim: int, prior_position: str = "after"):
  return presets.get("tiny").replace(**{"text.vocab_size": VOCAB, "image_token_index": IMAGE_ID,
                                        "prior_dim": prior_dim,
                                        "prior_position": prior_position})


def make_checkpoint(directory: pathlib.Path, tokenizer_dir: str, prior_dim: int,
                    seed: int = 0) -> str:
  """A random tiny EmoLA model saved as a native checkpoint with its tokenizer."""
  model = EmolaModel(tiny_config(prior_dim), rngs=nnx.Rngs(seed))
  native.save_native(model, str(directory), tokenizer_dir=tokenizer_dir)
  return str(directory)


def expected_prompt_ids(sp, question: str, num_slots: int) -> list[int]:
  """LLaVA-1.5's prompt built from the raw SentencePiece model: BOS, the text before <image>,
  the image slots, the text after it; each text piece encoded as a fresh string."""
  before = f"{SYSTEM_PROMPT} USER: "
  after = f"\n{question} ASSISTANT:"
  return [1, *sp.encode(before), *[IMAGE_ID] * num_slots, *sp.encode(after)]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
  return make_llama_tokenizer(tmp_path_factory.mktemp("infer_tokenizer"))


@pytest.fixture(scope="module")
def checkpoint12(tmp_path_factory, tokenizer):
  return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "p12", str(tokenizer.hf_dir), 12)


def _png(path: pathlib.Path, colour: int, seed: int) -> None:
  pixels = np.random.default_rng(seed).integers(0, 60, size=(40, 48, 3), dtype=np.uint8)
  pixels[..., colour] += 150
  Image.fromarray(pixels).save(path)


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
  """Three decodable images (two with a stored 12-d prior), a corrupt JPEG and a text file."""
  root = tmp_path_factory.mktemp("images")
  rng = np.random.default_rng(1)
  for i, name in enumerate(("a.png", "b.png", "c.png")):
    _png(root / name, i, i)
  np.save(root / "a.npy", rng.normal(size=12).astype(np.float32))
  np.save(root / "b.npy", rng.normal(size=12).astype(np.float32))
  (root / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"\x00" * 40)  # a JPEG header only
  (root / "notes.txt").write_text("not an image")
  return root


def _read_jsonl(path) -> list[dict]:
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f]


def test_prompt_is_vicuna_v1_with_the_models_image_slots(tokenizer):
  sp = tokenizer.sentencepiece()
  for config in (tiny_config(12), tiny_config(12, prior_position="none")):
    ids = predict.PromptBuilder(tokenizer.hf(), config)(EMOTION_QUESTION)
    # tiny: a 28-px image in 14-px patches = 4 visual slots, + 1 for the prior token.
    slots = 4 + (1 if config.has_prior else 0)
    assert config.num_image_slots == slots
    assert ids.tolist() == expected_prompt_ids(sp, EMOTION_QUESTION, slots)


def test_prior_dim_mismatch_is_an_error_naming_what_the_checkpoint_needs(
    checkpoint12, image_dir, tmp_path, capsys):
  out = tmp_path / "out.jsonl"
  code = infer.cli([f"--checkpoint={checkpoint12}", f"--images={image_dir}/a.png",
                    f"--output={out}", "--prior=dlib", "--progress=false"])
  err = capsys.readouterr().err
  assert code == 1
  assert "--prior=dlib gives 136-d vectors" in err and "prior_dim=12" in err
  assert "--prior=npy" in err
  assert not out.exists()
  # The same rule for every combination.
  with_prior, without = tiny_config(136), tiny_config(12, prior_position="none")
  predict.check_prior_dim(with_prior, "dlib", 136)
  predict.check_prior_dim(without, "none", None)
  with pytest.raises(predict.PriorMismatchError, match="prior_dim=136"):
    predict.check_prior_dim(with_prior, "none", None)
  with pytest.raises(predict.PriorMismatchError, match="no prior token"):
    predict.check_prior_dim(without, "dlib", 136)
  with pytest.raises(predict.PriorMismatchError, match="InsightFace"):
    predict.check_prior_dim(tiny_config(212), "face_alignment", 136)


def test_jsonl_and_csv_records_with_bad_inputs(checkpoint12, image_dir, tmp_path, capsys):
  common = [f"--checkpoint={checkpoint12}", f"--images={image_dir}/*", "--batch_size=2",
            "--max_new_tokens=6", "--progress=false"]
  jsonl = tmp_path / "out.jsonl"
  assert infer.cli(common + [f"--output={jsonl}"]) == 0
  captured = capsys.readouterr()
  records = _read_jsonl(jsonl)
  # Every matched file once, in sorted order; the .npy priors are not images.
  names = [os.path.basename(r["path"]) for r in records]
  assert names == ["a.png", "b.png", "c.png", "corrupt.jpg", "notes.txt"]
  assert all(set(r) == FIELDS for r in records)
  by_name = dict(zip(names, records))
  for name in ("a.png", "b.png"):
    r = by_name[name]
    assert r["status"] == "ok" and r["reason"] is None and r["prior"] == "npy"
    assert isinstance(r["text"], str) and 1 <= r["n_tokens"] <= 6 and r["seconds"] > 0
    # The parsed fields are the strict parsers' reading of the text.
    label = emotion_parse.parse_emotion(r["text"], "strict").label
    assert r["emotion"] == (None if label is None else emotion_parse.EMOTION_CLASSES[label])
    assert r["aus"] == sorted(au_parse.parse_au_prediction(r["text"], "strict").aus)
  # auto on a 12-d model means stored priors; c.png has none.
  assert by_name["c.png"]["status"] == "no_prior"
  assert "c.npy" in by_name["c.png"]["reason"] and "prior_dim=12" in by_name["c.png"]["reason"]
  for name in ("corrupt.jpg", "notes.txt"):
    r = by_name[name]
    assert r["status"] == "unreadable" and name in r["reason"]
    assert r["text"] is None and r["emotion"] is None and r["aus"] is None
  assert "5 image(s): 2 answered, 3 failed (no_prior 1, unreadable 2)" in captured.out
  assert "corrupt.jpg" in captured.err

  # CSV: the same records (greedy decoding is deterministic), aus as "1, 2", nulls as "".
  table = tmp_path / "out.csv"
  assert infer.cli(common + [f"--output={table}"]) == 0
  with open(table, newline="", encoding="utf-8") as f:
    rows = list(csv.DictReader(f))
  assert [row["path"] for row in rows] == [r["path"] for r in records]
  for row, r in zip(rows, records):
    assert row["status"] == r["status"] and row["text"] == (r["text"] or "")
    assert row["reason"] == (r["reason"] or "") and row["n_tokens"] == str(r["n_tokens"])
    assert row["emotion"] == (r["emotion"] or "")
    assert row["aus"] == ("" if r["aus"] is None else ", ".join(map(str, r["aus"])))
  # An existing output is not replaced without --overwrite.
  assert infer.cli(common + [f"--output={table}"]) == 1
  assert "--overwrite" in capsys.readouterr().err


def _dlib_face(path: pathlib.Path) -> list[int]:
  """The highest-scoring face of dlib's own detector, [left, top, width, height]."""
  pixels = np.asarray(Image.open(path).convert("RGB"))
  rects, scores, _ = dlib.get_frontal_face_detector().run(pixels, 1, 0.0)
  rect = rects[int(np.argmax(scores))]
  return [rect.left(), rect.top(), rect.width(), rect.height()]


def test_real_photos_with_dlib_and_detection(tmp_path, tokenizer, capsys):
  checkpoint = make_checkpoint(tmp_path / "p136", str(tokenizer.hf_dir), 136, seed=1)
  photos = tmp_path / "photos"
  photos.mkdir()
  Image.fromarray(skimage.data.astronaut()).save(photos / "astronaut.jpg")
  with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as f:
    (photos / "grace_hopper.jpg").write_bytes(f.read())
  Image.new("RGB", (200, 160), (128, 128, 128)).save(photos / "grey.png")  # no face
  # A stored prior beside one photo: --prior=auto on a 136-d model takes it, dlib for the rest.
  np.save(photos / "grace_hopper.npy", np.linspace(0, 1, 136, dtype=np.float32))
  out = tmp_path / "faces.jsonl"
  code = infer.cli([f"--checkpoint={checkpoint}", f"--images={photos}", "--detect",
                    "--task=au", "--batch_size=2", "--max_new_tokens=4", f"--output={out}",
                    "--progress=false"])
  assert code == 0, capsys.readouterr().err
  records = {os.path.basename(r["path"]): r for r in _read_jsonl(out)}
  assert sorted(records) == ["astronaut.jpg", "grace_hopper.jpg", "grey.png"]
  for name, prior in (("astronaut.jpg", "dlib"), ("grace_hopper.jpg", "npy")):
    r = records[name]
    assert r["status"] == "ok" and r["prior"] == prior and isinstance(r["text"], str)
    assert r["face_box"] == _dlib_face(photos / name)
  grey = records["grey.png"]
  assert grey["status"] == "no_face" and "no face" in grey["reason"]
  assert grey["text"] is None and grey["face_box"] is None


def test_command_line_entry_point():
  command = [sys.executable, "-m", "emola_jax.cli.infer"]
  run = subprocess.run(command + ["--help"], capture_output=True, text=True, timeout=120)
  assert run.returncode == 0 and "--detect" in run.stdout and "no_face" in run.stdout
  run = subprocess.run(command + ["--task=au"], capture_output=True, text=True, timeout=120)
  assert run.returncode == 1
  assert "--checkpoint, --images, --output required" in run.stderr


def test_crop_face_is_square_around_the_box_and_padded_outside():
  image = Image.new("RGB", (100, 80), (255, 0, 0))

  class Box:
    left, top, width, height = 70, 10, 20, 30  # near the right edge

  crop = infer.crop_face(image, Box, 2.0)
  assert crop.size == (60, 60)  # 2 x the longer side (30)
  pixels = np.asarray(crop)
  # Centre (80, 25); the crop spans x 50..110, y -5..55: the 10 columns right of x=100 and the
  # 5 rows above y=0 lie outside the image and are CLIP-mean grey.
  assert (pixels[10:, :50] == (255, 0, 0)).all()
  assert (pixels[:, 50:] == infer.images_lib.PAD_COLOR).all()
  assert (pixels[:5] == infer.images_lib.PAD_COLOR).all()
