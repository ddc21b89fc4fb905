"""The demo: its tokenizer trainer, prior standardisation, photo framing, and a short end-to-end run.

The end-to-end test is the main command in small: synthetic faces -> tokenizer -> standardised
priors -> emola-prepare -> emola-train (a smaller model, a few hundred steps) -> emola-eval on
held-out faces. It checks that the model really learns: the training loss falls far below its
start and the emotion accuracy on faces never seen in training beats chance (1/7) by far.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import sentencepiece as spm
import transformers

from emola_jax import demo
from emola_jax.data import conversation as conv
from emola_jax.data import tokenize as tokenize_lib
from emola_jax.data import train_tokenizer
from emola_jax.data.synthetic import generate

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def faces(tmp_path_factory):
  """A small synthetic dataset (raw priors), both tasks."""
  root = str(tmp_path_factory.mktemp("faces"))
  generate.generate_dataset(root, num_train=60, num_test=8, seed=3, image_size=64)
  return root


@pytest.fixture(scope="module")
def tokenizer_dir(faces, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("tok"))
  size = train_tokenizer.train_tokenizer(faces, out, vocab_size=700)
  assert size <= 700
  return out


def _texts(root: str, split: str) -> list[str]:
  texts = []
  for task in ("emotion", "au"):
    with open(os.path.join(root, f"{task}_{split}.json"), encoding="utf-8") as f:
      for record in json.load(f):
        texts += [m["value"].replace("<image>", "").strip() for m in record["conversations"]]
  return texts


def test_tokenizer_is_llama_format_and_agrees_with_sentencepiece(tokenizer_dir, faces):
  hf = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
  sp = spm.SentencePieceProcessor(model_file=os.path.join(tokenizer_dir, "tokenizer.model"))
  # LLaMA's special ids, and BOS (not EOS) added by default.
  assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == (0, 1, 2, -1)
  assert (hf.unk_token_id, hf.bos_token_id, hf.eos_token_id) == (0, 1, 2)
  assert hf.encode("face")[0] == 1 and hf.encode("face")[-1] != 2
  held_out = _texts(faces, "test") + ["Zoë smiles ☺ at 12:30.\n- AU12"]
  for text in held_out:
    ids = hf.encode(text, add_special_tokens=False)
    assert ids == sp.encode(text), text  # the independent reference: sentencepiece itself
    assert hf.decode(ids) == text  # byte fallback keeps unseen characters
  # Whole template phrases became single ids (pieces spanning spaces): answers are short.
  assert any(p.count("▁") >= 3 for p in (sp.id_to_piece(i) for i in range(sp.get_piece_size())))
  # What the conversation tokenizer demands of a LLaMA tokenizer (prefix space on a fresh string).
  tokenize_lib.ConversationTokenizer(hf, num_image_slots=3, image_token_index=699)


def test_tokenizer_reads_only_training_text(tmp_path):
  train = [{"id": "a", "conversations": [{"from": "human", "value": "Describe it.\n<image>"},
                                         {"from": "gpt", "value": "calm calm face " * 20}]}]
  test = [{"id": "b", "conversations": [{"from": "human", "value": "Describe it.\n<image>"},
                                        {"from": "gpt", "value": "xylophone " * 200}]}]
  (tmp_path / "emotion_train.json").write_text(json.dumps(train))
  (tmp_path / "emotion_test.json").write_text(json.dumps(test))
  chunks = train_tokenizer.corpus(str(tmp_path))
  assert not any("xylophone" in c for c in chunks)
  # The chunks are the strings the conversation tokenizer encodes, system prompt included.
  assert f"{conv.SYSTEM_PROMPT} {conv.USER_ROLE}: " in chunks
  assert "\nDescribe it. ASSISTANT:" in chunks
  out = tmp_path / "tok"
  train_tokenizer.train_tokenizer(str(tmp_path), str(out), vocab_size=300)
  sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
  assert not any("xyl" in sp.id_to_piece(i) for i in range(sp.get_piece_size()))


def test_tokenizer_errors_name_the_problem(tmp_path):
  with pytest.raises(train_tokenizer.TokenizerDataError, match="no \\*train\\*.json"):
    train_tokenizer.corpus(str(tmp_path))
  (tmp_path / "au_train.json").write_text("{broken")
  with pytest.raises(train_tokenizer.TokenizerDataError, match="au_train.json: not valid JSON"):
    train_tokenizer.corpus(str(tmp_path))
  (tmp_path / "au_train.json").write_text(json.dumps([{"id": "x"}]))
  with pytest.raises(train_tokenizer.TokenizerDataError, match="record 0 has no 'conversations'"):
    train_tokenizer.corpus(str(tmp_path))
  with pytest.raises(ValueError, match="vocab_size=100 must be >= 260"):
    train_tokenizer.train_sentencepiece(["a b c"], 100)


def test_priors_are_standardised_with_training_statistics_only(faces, tmp_path):
  out = str(tmp_path / "data")
  stats = demo.standardise_priors(faces, out)
  raw_train = np.stack([np.load(p) for p in demo.prior_files(faces, "train")]).astype(np.float64)
  np.testing.assert_allclose(stats["mean"], raw_train.mean(axis=0), rtol=1e-6)
  np.testing.assert_allclose(stats["std"], raw_train.std(axis=0), rtol=1e-6)
  for split in ("train", "test"):
    for raw_path in demo.prior_files(faces, split):
      new_path = os.path.join(out, os.path.relpath(raw_path, faces))
      expected = (np.load(raw_path) - raw_train.mean(axis=0)) / raw_train.std(axis=0)
      np.testing.assert_allclose(np.load(new_path), expected, rtol=1e-5, atol=1e-5)
  new_train = np.stack([np.load(os.path.join(out, os.path.relpath(p, faces)))
                        for p in demo.prior_files(faces, "train")])
  np.testing.assert_allclose(new_train.mean(axis=0), 0.0, atol=1e-4)
  np.testing.assert_allclose(new_train.std(axis=0), 1.0, atol=1e-4)
  # Images and JSON files are the same bytes; a rerun reuses the finished mirror untouched.
  for name in ("emotion_train.json", "au_test.json"):
    with open(os.path.join(faces, name), "rb") as a, open(os.path.join(out, name), "rb") as b:
      assert a.read() == b.read()
  marker = os.path.join(out, demo.PRIOR_STATS_FILE)
  before = os.path.getmtime(marker)
  assert demo.standardise_priors(faces, out) == stats
  assert os.path.getmtime(marker) == before


def test_photos_are_framed_like_the_synthetic_faces(faces, tmp_path):
  stats = demo.standardise_priors(faces, str(tmp_path / "data"))
  out = str(tmp_path / "photos")
  written = demo.prepare_photos(faces, stats, out, image_size=64)
  assert written == [os.path.join(out, "framed", f"{name}.png") for name in demo.PHOTOS]
  assert sorted(os.listdir(os.path.join(out, "original"))) == ["astronaut.png", "grace_hopper.png"]
  center, side = demo.synthetic_frame(faces)
  for path in written:
    from PIL import Image  # pylint: disable=import-outside-toplevel
    assert Image.open(path).size == (64, 64)
    prior = np.load(os.path.splitext(path)[0] + ".npy")
    assert prior.shape == (136,) and prior.dtype == np.float32
    # Undo the standardisation: the landmarks' box sits where the synthetic faces' box does.
    points = (prior * np.asarray(stats["std"]) + np.asarray(stats["mean"])).reshape(-1, 2)
    low, high = points.min(axis=0), points.max(axis=0)
    np.testing.assert_allclose((low + high) / 2, center, atol=1e-3)
    assert (high - low).max() == pytest.approx(side, abs=1e-3)


def test_settings_are_checked(tmp_path):
  with pytest.raises(demo.DemoError, match="--tasks"):
    demo.run_pipeline(demo.Settings(workdir=str(tmp_path), tasks=("pain",)))
  with pytest.raises(demo.DemoError, match="--prior_position"):
    demo.run_pipeline(demo.Settings(workdir=str(tmp_path), prior_position="inside"))
  with pytest.raises(demo.DemoError, match="no such file"):
    demo.load_config(str(tmp_path / "missing.py"))
