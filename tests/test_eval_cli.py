"""emola-eval end to end on tiny shards and a tiny random model.

Checked: every example is answered or reported, with the FABA-Bench prompt, the image and the
stored prior wired exactly as the model expects (the first answer is recomputed here by greedy
decoding with full forward passes, no KV cache and no batching); the scores in report.json equal
what emola-score prints for the written predictions; several fold splits are each scored and
averaged; `--folds` evaluates each fold with its own checkpoint; the report renders.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from emola_jax.cli import eval as eval_cli
from emola_jax.conversion import native
from emola_jax.data import images as images_lib
from emola_jax.data import shards
from emola_jax.evaluation import report as report_lib
from tests import train_fixtures
from tests.fixtures_tokenizer import make_llama_tokenizer
from tests.test_infer_cli import EMOTION_QUESTION, expected_prompt_ids, make_checkpoint

_SCRIPT = os.path.join(os.path.dirname(sys.executable), "emola-score")
_SCORE = [_SCRIPT] if os.path.exists(_SCRIPT) else [sys.executable, "-m", "emola_jax.cli.score"]
N_NEW = 6
AU_ANSWERS = {"1, 2": "AU1 and AU2 are active.", "4": "AU4 is active.", "": "No AU is active."}


def _png(rng: np.random.Generator) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(rng.integers(0, 255, size=(30, 36, 3), dtype=np.uint8)).save(buf, "PNG")
  return buf.getvalue()


def _au_example(split: str, i: int, label: str, rng: np.random.Generator,
                image: bytes | None = None) -> dict:
  return {"id": f"{split}/{i}", "source": "fixture", "task": "au",
          "image_bytes": _png(rng) if image is None else image,
          "prior": rng.normal(size=train_fixtures.PRIOR_DIM).astype(np.float32),
          "conversations": [{"from": "human", "value": "Which AUs are active?\n<image>"},
                            {"from": "gpt", "value": AU_ANSWERS[label]}],
          "label": label, "gpt4": AU_ANSWERS[label]}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  """Emotion shards (emotion_train/emotion_test), AU folds fold0/fold1 (fold1 holds a corrupt
  image), a tokenizer with its SentencePiece model, and two random 12-d prior checkpoints."""
  root = tmp_path_factory.mktemp("eval")
  paths = train_fixtures.make_dataset(root)
  rng = np.random.default_rng(7)
  labels = ["1, 2", "4", "", "1, 2"]
  shards.write_shards([_au_example("fold0", i, l, rng) for i, l in enumerate(labels)],
                      paths["data"], "fold0")
  fold1 = [_au_example("fold1", i, l, rng) for i, l in enumerate(labels[::-1])]
  fold1.insert(2, _au_example("fold1", 9, "4", rng, image=b"\x89PNG\r\n\x1a\n broken"))
  shards.write_shards(fold1, paths["data"], "fold1")
  tokenizer = make_llama_tokenizer(root / "tok")
  return {
      "data": paths["data"], "root": root, "tokenizer": tokenizer,
      "a": make_checkpoint(root / "ckpt_a", str(tokenizer.hf_dir), train_fixtures.PRIOR_DIM, 0),
      "b": make_checkpoint(root / "ckpt_b", str(tokenizer.hf_dir), train_fixtures.PRIOR_DIM, 5),
  }


def _eval(*args: str) -> int:
  return eval_cli.cli([*args, "--batch_size=4", f"--max_new_tokens={N_NEW}", "--progress=false"])


def _lines(path) -> list[dict]:
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def _emola_score(task: str, path: str, *extra: str) -> dict:
  run = subprocess.run(_SCORE + [f"--task={task}", f"--predictions={path}", *extra],
                       capture_output=True, text=True, timeout=120)
  assert run.returncode == 0, run.stderr
  result = json.loads(run.stdout)
  result.pop("predictions")
  return result


def _check_png(path, size) -> None:
  image = Image.open(path)
  assert image.size == size
  pixels = np.asarray(image.convert("RGB")).astype(int)
  assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50 and pixels.std() > 10


def _greedy_by_full_forward(checkpoint: str, ids: list[int],
                            inputs: list[tuple[np.ndarray, np.ndarray]],
                            eos_id: int) -> list[list[int]]:
  """Greedy decoding with a full forward pass per token (no cache, batch of one), for each
  (pixels, prior) of `inputs` with the prompt `ids`.

  The sequence is right-padded to one fixed length, so the forward pass compiles once; the model
  is causal, so the padding after position t does not change the logits at t.
  """
  model, _ = native.load_native(checkpoint)
  graphdef, state = nnx.split(model)

  @jax.jit
  def logits_of(state, tokens, pixels, prior):
    return nnx.merge(graphdef, state)(tokens, pixels[None], prior_features=prior[None])[0]

  answers = []
  for pixels, prior in inputs:
    tokens = np.zeros((1, len(ids) + N_NEW), np.int32)
    tokens[0, :len(ids)] = ids
    new: list[int] = []
    for step in range(N_NEW):
      logits = np.asarray(logits_of(state, tokens, pixels, prior)[len(ids) + step - 1])
      token = int(logits.argmax())
      if token == eos_id:
        break
      new.append(token)
      tokens[0, len(ids) + step] = token
    answers.append(new)
  return answers


def test_emotion_eval_scores_equal_emola_score_and_report_renders(setup, capsys):
  out = setup["root"] / "emotion_out"
  assert _eval(f"--checkpoint={setup['a']}", f"--data={setup['data']}", "--splits=emotion_test",
               "--task=emotion", f"--output={out}") == 0
  summary = capsys.readouterr().out
  assert summary.startswith("emola-eval: emotion [reference] emotion_test: S_re ")
  source = shards.open_split(setup["data"], "emotion_test")
  predictions = _lines(out / "predictions.jsonl")
  assert [p["id"] for p in predictions] == [source[i]["id"] for i in range(len(source))]
  for p, i in zip(predictions, range(len(source))):
    assert {"id", "split", "prediction", "label", "reference"} <= set(p)
    assert p["label"] == source[i]["label"] and p["reference"] == source[i]["gpt4"]
    assert p["split"] == "emotion_test" and 0 <= p["n_tokens"] <= N_NEW
  assert _lines(out / "failures.jsonl") == []

  # Every answer, recomputed without the batched cached loop: the FABA prompt built from the raw
  # SentencePiece model, the image padded to a square (--image_mode=pad), the stored prior.
  tok = setup["tokenizer"]
  ids = expected_prompt_ids(tok.sentencepiece(), EMOTION_QUESTION, 5)
  inputs = [(images_lib.preprocess_image(Image.open(io.BytesIO(source[i]["image_bytes"])), 28,
                                         "pad"), source[i]["prior"]) for i in range(len(source))]
  expected = _greedy_by_full_forward(setup["a"], ids, inputs, eos_id=2)
  assert [p["prediction"] for p in predictions] == [
      tok.hf().decode(new, skip_special_tokens=True).strip() for new in expected]
  assert len({p["prediction"] for p in predictions}) > 1  # the answers depend on the inputs

  report = json.loads((out / "report.json").read_text())
  assert report["score"] == _emola_score("emotion", report["predictions"])
  assert report["per_split"] is None and report["counts"]["n_scored"] == 6
  assert report["settings"]["prompt"] == EMOTION_QUESTION
  assert report["settings"]["per_split"]["emotion_test"]["prior"] == "npy"
  assert report["timing"]["tokens_generated"] == sum(p["n_tokens"] for p in predictions)
  assert [p["file"] for p in report["plots"]] == ["confusion.png"]
  _check_png(out / "confusion.png", report_lib.CONFUSION_SIZE)
  md = (out / "report.md").read_text()
  s = report["score"]
  assert (f"| emotion_test | 6 | {s['S_re']:.2f} | {s['S_ge']:.2f} | {s['S_rege']:.2f} |"
          in md)
  assert "| true \\ predicted | Happiness | Sadness |" in md and "![confusion" in md

  # A finished output folder is not overwritten without --overwrite.
  args = [f"--checkpoint={setup['a']}", f"--data={setup['data']}", "--splits=emotion_test",
          "--task=emotion", f"--output={out}"]
  assert _eval(*args) == 1
  assert "--overwrite" in capsys.readouterr().err
  # --record_prompt asks the record's own question; --limit keeps the first examples.
  assert _eval(*args, "--overwrite", "--limit=2", "--record_prompt") == 0
  again = _lines(out / "predictions.jsonl")
  assert [p["id"] for p in again] == [source[0]["id"], source[1]["id"]]
  # The fixture's human turn is "What is the emotion of this face?\n<image>".
  ids = expected_prompt_ids(tok.sentencepiece(), "What is the emotion of this face?", 5)
  expected = _greedy_by_full_forward(setup["a"], ids, inputs[:2], eos_id=2)
  assert [p["prediction"] for p in again] == [
      tok.hf().decode(new, skip_special_tokens=True).strip() for new in expected]
  assert json.loads((out / "report.json").read_text())["counts"]["n_scored"] == 2


def test_command_line_entry_point():
  command = [sys.executable, "-m", "emola_jax.cli.eval"]
  run = subprocess.run(command + ["--help"], capture_output=True, text=True, timeout=120)
  assert run.returncode == 0 and "--folds" in run.stdout and "report.md" in run.stdout
  run = subprocess.run(command + ["--data=somewhere"], capture_output=True, text=True,
                       timeout=120)
  assert run.returncode == 1 and "--task, --output required" in run.stderr


@pytest.fixture(scope="module")
def au_folds(setup):
  out = setup["root"] / "au_out"
  code = _eval(f"--checkpoint={setup['a']}", f"--data={setup['data']}", "--splits=fold0,fold1",
               "--task=au", "--aus=1,2,4", f"--output={out}")
  assert code == 0
  return out


def test_au_folds_are_scored_each_then_averaged(au_folds, tmp_path):
  out = au_folds
  report = json.loads((out / "report.json").read_text())
  predictions = _lines(out / "predictions.jsonl")
  assert [p["id"] for p in predictions] == (
      [f"fold0/{i}" for i in range(4)] + ["fold1/0", "fold1/1", "fold1/2", "fold1/3"])
  # The corrupt image is reported with its reason, not scored, and the run went on.
  failures = _lines(out / "failures.jsonl")
  assert len(failures) == 1 and failures[0]["id"] == "fold1/9"
  assert failures[0]["status"] == "unreadable" and "decode" in failures[0]["reason"]
  assert report["counts"] == {"n_examples": 9, "n_scored": 8, "n_failed": 1,
                              "failed_by_status": {"unreadable": 1},
                              "failures_file": str(out / "failures.jsonl")}
  # Each fold's score is emola-score's on that fold's lines; the headline is their mean.
  for split in ("fold0", "fold1"):
    path = tmp_path / f"{split}.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in predictions if p["split"] == split))
    expected = _emola_score("au", str(path), "--aus=1,2,4")
    got = dict(report["per_split"][split])
    # Skipped-record names point into the shared predictions file; compare the rest.
    got.pop("rouge_skipped_records"), expected.pop("rouge_skipped_records")
    assert got == expected
  per = report["per_split"].values()
  for key in ("S_re", "S_ge", "S_rege"):
    values = [s[key] for s in per if s[key] is not None]
    assert report["score"][key] == (pytest.approx(sum(values) / len(values)) if values
                                    else None)
  assert report["score"]["averaged_over"] == ["fold0", "fold1"]
  for au in ("1", "2", "4"):
    values = [s["per_au_f1"][au] for s in per if s["per_au_f1"][au] is not None]
    assert report["score"]["per_au_f1"][au] == (pytest.approx(sum(values) / len(values))
                                                if values else None)
  assert sorted(p["file"] for p in report["plots"]) == ["au_f1.png", "au_f1_fold0.png",
                                                        "au_f1_fold1.png"]
  for plot in report["plots"]:
    _check_png(out / plot["file"], report_lib.au_plot_size(3))
  md = (out / "report.md").read_text()
  assert "| **mean over 2 splits** | 8 |" in md and "| AU4 | brow lowerer |" in md


def test_folds_flag_uses_each_folds_checkpoint(setup, au_folds):
  out = setup["root"] / "folds_out"
  assert _eval(f"--folds=fold0={setup['a']},fold1={setup['b']}", f"--data={setup['data']}",
               "--task=au", "--aus=1,2,4", f"--output={out}") == 0
  report = json.loads((out / "report.json").read_text())
  assert report["checkpoint"] == sorted([setup["a"], setup["b"]])
  assert report["settings"]["per_split"]["fold1"]["checkpoint"] == setup["b"]
  shared = {(p["split"], p["id"]): p["prediction"] for p in _lines(au_folds / "predictions.jsonl")}
  mine = {(p["split"], p["id"]): p["prediction"] for p in _lines(out / "predictions.jsonl")}
  assert shared.keys() == mine.keys()
  # fold0 was answered by checkpoint a both times; fold1 by another random model now.
  fold0 = [k for k in mine if k[0] == "fold0"]
  fold1 = [k for k in mine if k[0] == "fold1"]
  assert all(mine[k] == shared[k] for k in fold0)
  assert any(mine[k] != shared[k] for k in fold1)


def test_errors_name_the_flag_record_or_prior(setup, tmp_path, capsys):
  common = [f"--data={setup['data']}", f"--output={tmp_path / 'x'}"]
  # An emotion split evaluated as AU: the record is named.
  assert _eval(f"--checkpoint={setup['a']}", "--splits=emotion_test", "--task=au", *common) == 1
  err = capsys.readouterr().err
  assert "emotion_test/0" in err and "--task=au" in err
  # A 136-d model on shards with 12-d priors: says what the checkpoint needs.
  ckpt136 = make_checkpoint(tmp_path / "p136", str(setup["tokenizer"].hf_dir), 136)
  assert _eval(f"--checkpoint={ckpt136}", "--splits=emotion_test", "--task=emotion",
               *common) == 1
  err = capsys.readouterr().err
  assert "stores 12-d priors" in err and "prior_dim=136" in err and "--prior=dlib" in err
  # A split that was never prepared.
  assert _eval(f"--checkpoint={setup['a']}", "--splits=nope", "--task=emotion", *common) == 1
  assert "'nope' was not prepared" in capsys.readouterr().err
  # --folds with --splits.
  assert _eval(f"--folds=fold0={setup['a']}", "--splits=fold0", "--task=au", *common) == 1
  assert "--folds" in capsys.readouterr().err
