"""Tests of `emola-prepare` (`emola_jax.cli.prepare`): the pipeline end to end, every bad-input
case counted (or fatal under --strict), and the absl command line."""

from __future__ import annotations

import io
import json
import os
import pickle
import sys
from unittest import mock

import numpy as np
import pytest
from absl import flags
from PIL import Image

from emola_jax.cli import prepare
from emola_jax.data import shards
from emola_jax.data.skips import StrictSkipError
from emola_jax.training import experiment
from tests.test_classic_converters import build_bp4d, build_rafdb
from tests.test_faba_reader import (EXPECTED_TRAIN_SKIPS, build_test_file, build_train_file,
                                    faba_record, write_image)


def _extend_train_file(root, path) -> list[dict]:
  """Adds records whose JSON is fine but whose files are bad; returns the records kept in all.

  Added (reason): truncated JPEG (corrupt_image); text saved as .jpg (corrupt_image); NaN prior,
  pickled object array, 100-value prior, text file as .npy (bad_landmark x4); no 'landmark'
  field while others have one (missing_landmark); an int16 prior of 212 values (kept).
  """
  with open(path, encoding="utf-8") as f:
    records = json.load(f)

  def add(name, image=True, prior=None, **changes):
    record = {**faba_record(name), **changes}
    if image:
      write_image(os.path.join(root, record["image"]), seed=len(records))
    if prior is not None:
      os.makedirs(os.path.dirname(os.path.join(root, record["landmark"])), exist_ok=True)
      prior(os.path.join(root, record["landmark"]))
    records.append(record)
    return record

  good_prior = lambda p: np.save(p, np.ones((106, 2), np.float32))  # noqa: E731
  truncated = add("truncated", prior=good_prior)
  full = open(os.path.join(root, truncated["image"]), "rb").read()
  open(os.path.join(root, truncated["image"]), "wb").write(full[:len(full) // 2])
  text_image = add("textimage", image=False, prior=good_prior)
  os.makedirs(os.path.dirname(os.path.join(root, text_image["image"])), exist_ok=True)
  open(os.path.join(root, text_image["image"]), "w").write("not an image")
  add("nan", prior=lambda p: np.save(p, np.full(212, np.nan, np.float32)))
  add("pickled", prior=lambda p: np.save(p, np.array([{"a": 1}], dtype=object),
                                         allow_pickle=True))
  add("short", prior=lambda p: np.save(p, np.zeros(100, np.float32)))
  add("textnpy", prior=lambda p: open(p, "w").write("0.1 0.2"))
  no_landmark = faba_record("nolandmarkfield")
  del no_landmark["landmark"]
  write_image(os.path.join(root, no_landmark["image"]))
  records.append(no_landmark)
  int_prior = add("intprior", prior=lambda p: np.save(p, np.arange(212, dtype=np.int16)))
  with open(path, "w", encoding="utf-8") as f:
    json.dump(records, f)
  return records[:3] + [int_prior]


TRAIN_SKIPS = {**EXPECTED_TRAIN_SKIPS, "corrupt_image": 2, "bad_landmark": 4,
               "missing_landmark": EXPECTED_TRAIN_SKIPS["missing_landmark"] + 1}


@pytest.fixture
def faba_root(tmp_path):
  root = tmp_path / "data"
  path, _ = build_train_file(root)
  kept = _extend_train_file(root, path)
  build_test_file(root)
  return root, kept


def test_faba_pipeline_counts_every_skip(tmp_path, faba_root):
  root, kept = faba_root
  out_dir = tmp_path / "shards"
  printed = io.StringIO()
  metas = prepare.prepare("faba", str(root), str(out_dir), examples_per_shard=3, workers=2,
                          out=printed)
  assert sorted(metas) == ["emotion_test", "emotion_train"]  # "<task>_<split>", as emola-train reads
  train = metas["emotion_train"]
  assert train["count"] == len(kept) == 4 and train["prior_dim"] == 212
  assert {r: v["count"] for r, v in train["skips"].items()} == TRAIN_SKIPS
  assert train["format"] == "faba" and train["prior"] == "npy"
  assert shards.read_meta(out_dir, "emotion_train") == train
  source = shards.open_split(out_dir, "emotion_train")
  assert [source[i]["id"] for i in range(len(source))] == [r["id"] for r in kept]
  for i, record in enumerate(kept):
    example = source[i]
    with open(os.path.join(root, record["image"]), "rb") as f:
      assert example["image_bytes"] == f.read()  # exactly the file on disk
    expected_prior = np.load(os.path.join(root, record["landmark"])).astype(np.float32).ravel()
    np.testing.assert_array_equal(example["prior"], expected_prior)
    assert example["conversations"] == record["conversations"]
    assert example["task"] == "emotion" and example["label"] == "" and example["gpt4"] == ""
    assert example["source"] == "AffectNet"
  test = shards.open_split(out_dir, "emotion_test")
  assert [test[i]["label"] for i in range(len(test))] == ["Happiness", "Surprise", "Anger"]
  assert test[0]["gpt4"] == "Reference description 0."
  assert {r: v["count"] for r, v in metas["emotion_test"]["skips"].items()} == {
      "bad_label": 1, "no_gpt_turn": 1}
  text = printed.getvalue()
  assert "emotion_train: 4 examples in 2 shard(s)" in text
  for reason, count in TRAIN_SKIPS.items():
    assert any(line.split()[:3] == [reason, "error", str(count)] for line in text.splitlines())
  assert f"{root}/emotion_train.json id=AffectNet/AffectNet_v2/689/truncated" in text
  summary = json.loads((out_dir / "prepare.json").read_text())
  assert summary["splits"] == {"emotion_train": 4, "emotion_test": 3}


def test_strict_and_prior_none(tmp_path, faba_root):
  root, _ = faba_root
  with pytest.raises(StrictSkipError, match="record 3"):
    prepare.prepare("faba", str(root), str(tmp_path / "strict"), strict=True, out=io.StringIO())
  metas = prepare.prepare("faba", str(root), str(tmp_path / "noprior"), prior="none",
                          splits=["train=emotion_train.json"], out=io.StringIO())
  # Without priors the landmark problems are not looked at (3 good, 4 bad .npy, 1 missing .npy,
  # 1 without landmark field, 1 int .npy); the image ones still are.
  assert list(metas) == ["train"] and metas["train"]["prior_dim"] == 0
  assert metas["train"]["count"] == 10
  assert "missing_landmark" not in metas["train"]["skips"]
  assert shards.open_split(tmp_path / "noprior", "train")[0]["prior"].shape == (0,)


def test_strict_image_error_leaves_no_partial_split(tmp_path):
  root = tmp_path / "data"
  records = [faba_record(f"ok{i}") for i in range(3)]
  for i, record in enumerate(records):
    write_image(os.path.join(root, record["image"]), i)
    os.makedirs(os.path.dirname(os.path.join(root, record["landmark"])), exist_ok=True)
    np.save(os.path.join(root, record["landmark"]), np.zeros(212, np.float32))
  open(os.path.join(root, records[2]["image"]), "wb").write(b"\xff\xd8\xff\xe0 broken")
  (root / "emotion_train.json").write_text(json.dumps(records))
  out_dir = tmp_path / "out"
  with pytest.raises(StrictSkipError) as info:
    prepare.prepare("faba", str(root), str(out_dir), strict=True, out=io.StringIO())
  assert info.value.reason == "corrupt_image" and records[2]["id"] in str(info.value)
  assert not any(n.startswith(("train", ".train")) for n in os.listdir(out_dir))


def test_prior_dim_flag_and_bad_arguments(tmp_path, faba_root):
  root, _ = faba_root
  metas = prepare.prepare("faba", str(root), str(tmp_path / "o"), prior_dim=100,
                          splits=["train=emotion_train.json"], out=io.StringIO())
  # Now the 100-value prior is the one kept and the 212-value ones are bad.
  assert metas["train"]["count"] == 1 and metas["train"]["prior_dim"] == 100
  with pytest.raises(prepare.PrepareError, match="--prior"):
    prepare.prepare("faba", str(root), str(tmp_path / "o"), prior="dlib")
  with pytest.raises(prepare.PrepareError, match="--format"):
    prepare.prepare("csv", str(root), str(tmp_path / "o"))
  with pytest.raises(prepare.PrepareError, match="--input"):
    prepare.prepare("faba", str(tmp_path / "missing"), str(tmp_path / "o"))
  raf = tmp_path / "raf"
  build_rafdb(raf)
  with pytest.raises(prepare.PrepareError, match="--landmark_dir"):
    prepare.prepare("rafdb", str(raf), str(tmp_path / "o"), prior_dim=212)
  with pytest.raises(prepare.PrepareError, match="--task=au does not fit"):
    prepare.prepare("rafdb", str(root), str(tmp_path / "o"), task="au")


def _cli(args: list[str]) -> int:
  with mock.patch.object(sys, "argv", ["emola-prepare"] + args):
    with pytest.raises(SystemExit) as info:
      prepare.run()
  return info.value.code


def test_cli_faba_strict_and_malformed_json(tmp_path, faba_root, capsys):
  root, kept = faba_root
  assert _cli([f"--input={root}", f"--output={tmp_path / 'a'}", "--format=faba",
               "--task=emotion", "--examples_per_shard=2"]) == 0
  assert shards.read_meta(tmp_path / "a", "emotion_train")["count"] == len(kept)
  assert "missing_image" in capsys.readouterr().out
  assert _cli([f"--input={root}", f"--output={tmp_path / 'b'}", "--strict"]) == 1
  err = capsys.readouterr().err  # The test file is read first (sorted names).
  assert "emotion_test.json record 3" in err and "[bad_label]" in err
  assert _cli([f"--input={root}", f"--output={tmp_path / 'b'}", "--strict",
               "--splits=train=emotion_train.json"]) == 1
  err = capsys.readouterr().err
  assert "emotion_train.json record 3" in err and "[malformed_record]" in err
  (root / "emotion_train.json").write_text("[{]")
  assert _cli([f"--input={root}", f"--output={tmp_path / 'c'}"]) == 1
  assert "malformed JSON at line 1" in capsys.readouterr().err


def test_cli_help_flag_errors_and_no_global_flags(tmp_path, capsys):
  assert _cli(["--help"]) == 0
  assert "--examples_per_shard" in capsys.readouterr().out
  assert _cli(["--format=bogus", f"--output={tmp_path}"]) == 1
  assert "--format=bogus" in capsys.readouterr().err
  assert _cli([f"--input={tmp_path}"]) == 1  # no --output: usage error
  # Nothing is defined in absl's global registry, so other CLIs' --task/--output cannot clash.
  assert "examples_per_shard" not in flags.FLAGS
  assert not [m for m in flags.FLAGS.flags_by_module_dict() if m.endswith("cli/prepare.py")]


def test_cli_runs_beside_another_cli_with_required_global_flags(tmp_path):
  # emola-score defines --task and required flags in absl's global registry at import; in one
  # process (a test session) emola-prepare must neither clash with nor trip over them.
  pytest.importorskip("emola_jax.cli.score", reason="emola-score not written yet")
  root = tmp_path / "raf"
  build_rafdb(root)
  assert _cli(["--format=rafdb", f"--input={root}", f"--output={tmp_path / 'o'}",
               "--task=emotion"]) == 0


def test_cli_rafdb_selected_split(tmp_path, capsys):
  root = tmp_path / "raf"
  build_rafdb(root)
  with open(root / "Image" / "aligned" / "test_0002_aligned.jpg", "wb") as f:
    f.write(b"GIF89a")  # corrupt
  assert _cli(["--format=rafdb", f"--input={root}", f"--output={tmp_path / 'out'}",
               "--splits=test", "--seed=5"]) == 0
  meta = shards.read_meta(tmp_path / "out", "emotion_test")
  assert meta["count"] == 1 and meta["source"] == "rafdb" and meta["prior_dim"] == 0
  assert {r: v["count"] for r, v in meta["skips"].items()} == {"corrupt_image": 1}
  assert not os.path.exists(tmp_path / "out" / "emotion_train.meta.json")
  example = shards.open_split(tmp_path / "out", "emotion_test")[0]
  assert example["label"] == "Happiness" and example["source"] == "RAF-DB"
  assert example["conversations"][0]["value"].endswith("\n<image>")
  summary = json.loads((tmp_path / "out" / "prepare.json").read_text())
  assert summary["unassigned_skips"]["malformed_record"]["count"] == 2
  assert "skipped outside any split" in capsys.readouterr().out
  assert _cli(["--format=rafdb", f"--input={root}", f"--output={tmp_path / 'x'}",
               "--splits=validation"]) == 1
  assert "--splits" in capsys.readouterr().err


def test_classic_landmark_dir(tmp_path):
  root = tmp_path / "raf"
  build_rafdb(root)
  priors = {}
  for stem in ("test_0001", "test_0002", "train_00001"):
    path = root / "landmarks" / "Image" / "aligned" / f"{stem}_aligned.npy"
    path.parent.mkdir(parents=True, exist_ok=True)
    priors[stem] = np.random.default_rng(len(priors)).normal(size=(106, 2)).astype(np.float32)
    np.save(path, priors[stem])
  metas = prepare.prepare("rafdb", str(root), str(tmp_path / "o"), landmark_dir="landmarks",
                          out=io.StringIO())
  assert metas["emotion_test"]["count"] == 2 and metas["emotion_test"]["prior_dim"] == 212
  # Six training images have no .npy in the landmark folder.
  assert metas["emotion_train"]["count"] == 1 and metas["emotion_train"]["skips"]["missing_landmark"]["count"] == 6
  test = shards.open_split(tmp_path / "o", "emotion_test")
  np.testing.assert_array_equal(test[1]["prior"], priors["test_0002"].ravel())


def test_cli_bp4d_fold(tmp_path):
  root = tmp_path / "bp4d"
  good = build_bp4d(root)
  assert _cli(["--format=bp4d", f"--input={root}", f"--output={tmp_path / 'out'}", "--fold=0",
               "--num_folds=3"]) == 0
  train = shards.read_meta(tmp_path / "out", "au_train")
  test = shards.read_meta(tmp_path / "out", "au_test")
  assert train["count"] + test["count"] == sum(good.values())
  assert train["num_folds"] == 3 and train["fold"] == 0 and train["tasks"] == {"au": train["count"]}
  ids = [shards.open_split(tmp_path / "out", "au_test")[i]["id"] for i in range(test["count"])]
  assert all(i.startswith("BP4D/") for i in ids)
  # Every fold as its own split, into the same folder: the earlier train/test are pointed out.
  printed = io.StringIO()
  metas = prepare.prepare("bp4d", str(root), str(tmp_path / "out"), out=printed)
  assert sorted(metas) == ["fold0", "fold1", "fold2"]
  assert sum(m["count"] for m in metas.values()) == sum(good.values())
  assert "splits ['au_test', 'au_train'] from an earlier run" in printed.getvalue()


def test_cli_synthetic(tmp_path):
  out_dir = tmp_path / "syn"
  assert _cli(["--format=synthetic", f"--output={out_dir}", "--task=emotion", "--num_train=4",
               "--num_test=2", "--image_size=48", "--seed=1"]) == 0
  train = shards.read_meta(out_dir, "emotion_train")
  test = shards.read_meta(out_dir, "emotion_test")
  assert (train["count"], test["count"]) == (4, 2)
  assert train["skips"] == {} and train["prior_dim"] > 0
  example = shards.open_split(out_dir, "emotion_test")[0]
  with Image.open(io.BytesIO(example["image_bytes"])) as image:
    assert image.size == (48, 48)
  assert example["label"] and example["gpt4"]
  assert example["prior"].shape == (train["prior_dim"],)
  # The source is picklable, as Grain worker processes need.
  assert pickle.loads(pickle.dumps(shards.open_split(out_dir, "emotion_train")))[3]["task"] == "emotion"
  # A single-task set is named as emola-train reads it by default (it once was "train"/"test").
  config = experiment.base_config()
  config.task = "emotion"
  assert experiment.train_splits(config) == ["emotion_train"]
