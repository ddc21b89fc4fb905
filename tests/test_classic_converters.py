"""Tests of the classic-dataset converters (`emola_jax.data.classic`) on tiny copies of the
datasets' own label files, laid out as released, with bad lines of every kind."""

from __future__ import annotations

import itertools
import os
import re

import numpy as np
import pytest

from emola_jax.data import facs, instructions
from emola_jax.data.classic import affectnet, bp4d, common, disfa, folds, gft, raf_db
from emola_jax.data.records import DataFileError
from emola_jax.data.skips import StrictSkipError
from tests.test_faba_reader import write_image


def _write(path, text: str) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    f.write(text)


def _instruction(record, task: str) -> str:
  human = record.conversations[0].value
  assert human.endswith("\n<image>")
  text = human[:-len("\n<image>")]
  pool = instructions.EMOTION_INSTRUCTIONS if task == "emotion" else instructions.AU_INSTRUCTIONS
  assert text in pool
  return text


# --------------------------------------------------------------------------------------- RAF-DB

# RAF-DB's own label order (1..7), from the dataset documentation.
RAF_EXPECTED = {1: "Surprise", 2: "Fear", 3: "Disgust", 4: "Happiness", 5: "Sadness", 6: "Anger",
                7: "Neutral"}


def build_rafdb(root) -> None:
  lines = [f"train_{i:05d}.jpg {i}" for i in range(1, 8)]  # One image per label.
  lines += ["test_0001.jpg 4", "test_0002.jpg 7",
            "train_00008.jpg 8",        # bad_label
            "oops",                     # malformed_record (no split)
            "val_0001.jpg 3",           # malformed_record: no train_/test_ prefix
            "train_00001.jpg 5",        # duplicate_id
            ""]
  _write(os.path.join(root, "EmoLabel", "list_patition_label.txt"), "\n".join(lines))
  for k, line in enumerate(lines[:9]):
    name = line.split()[0]
    stem = os.path.splitext(name)[0]
    write_image(os.path.join(root, "Image", "aligned", f"{stem}_aligned.jpg"), k)
    write_image(os.path.join(root, "Image", "original", name), k)


def test_rafdb_labels_splits_and_skips(tmp_path):
  build_rafdb(tmp_path)
  out = raf_db.convert(str(tmp_path), seed=3)
  assert out.splits == ["test", "train"]
  train = out.records["train"]
  assert [r.id for r in train] == [f"RAF-DB/train_{i:05d}" for i in range(1, 8)]
  assert [r.label for r in train] == [RAF_EXPECTED[i] for i in range(1, 8)]
  assert [r.label for r in out.records["test"]] == ["Happiness", "Neutral"]
  assert train[0].image == "Image/aligned/train_00001_aligned.jpg"
  assert all(os.path.isfile(os.path.join(tmp_path, r.image)) for r in train)
  assert all(r.source == "RAF-DB" and r.task == "emotion" and r.landmark is None for r in train)
  assert out.report("train").counts() == {"bad_label": 1, "duplicate_id": 1}
  assert out.report("test").count() == 0
  assert out.skips[""].counts() == {"malformed_record": 2}
  assert "line 11" in out.skips[""].examples("malformed_record")[0][0]
  for record in train:
    _instruction(record, "emotion")
  original = raf_db.convert(str(tmp_path), aligned=False, landmark_dir="landmarks")
  assert original.records["test"][0].image == "Image/original/test_0001.jpg"
  assert original.records["test"][0].landmark == "landmarks/Image/original/test_0001.npy"
  with pytest.raises(StrictSkipError, match="line 10"):
    raf_db.convert(str(tmp_path), strict=True)
  with pytest.raises(DataFileError, match="list_patition_label.txt"):
    raf_db.convert(str(tmp_path / "nowhere"))


def test_instructions_are_seeded_per_record(tmp_path):
  build_rafdb(tmp_path)
  first = raf_db.convert(str(tmp_path), seed=3).records["train"]
  again = raf_db.convert(str(tmp_path), seed=3).records["train"]
  assert first == again
  # The instruction of an image depends on the seed and its id, not on the other lines.
  rng = common.record_rng(3, first[2].id)
  assert _instruction(first[2], "emotion") == instructions.sample_instruction("emotion", rng)
  others = [raf_db.convert(str(tmp_path), seed=s).records["train"] for s in range(4, 8)]
  assert any([r.conversations for r in o] != [r.conversations for r in first] for o in others)


# ---------------------------------------------------------- answers vs the FABA-Bench parser

# Keyword lists and negation substrings of the FABA-Bench emotion parser (EMOLA_FACTS.md, Sec. 5).
KEYWORDS = {
    "Happiness": "happiness happy smiling smile pleasant content contentment relaxed relaxation "
                 "cheerful joy amusement amused positivity positive lightheartedness joyful "
                 "friendly warmth bright",
    "Neutral": "neutral neutrality calm contemplative concerned thoughtful focused solemn mild",
    "Surprise": "surprise surprised startled puzzled astonishment disbelief wonder curiosity "
                "curious confusion bewilderment skepticism excitement uncertainty",
    "Fear": "fear shock anxiety apprehension tension panic alertness focus worry alarm curiosity "
            "contemplation",
    "Disgust": "disgust distaste disgusted discomfort displeasure displeased disapproval disdain "
               "contempt",
    "Anger": "anger mad irate outraged agitation irritated enraged annoyed incensed serious "
             "frustration displeased stern",
    "Sadness": "sadness crying distress concern discomfort anguish somber",
}
NEGATIONS = ("not", "no", "isn't ", "nothing", "cannot", "won't", "shouldn't", "neither", "nor")


@pytest.mark.parametrize("label", list(facs.EMOTIONS) + ["Contempt"])
def test_emotion_answers_name_only_their_class(label):
  expected = "Disgust" if label == "Contempt" else label  # Contempt is a disgust keyword.
  for k in range(len(common.EMOTION_ANSWERS)):
    answer = common.EMOTION_ANSWERS[k].format(common._EMOTION_PHRASES[label])
    words = re.findall(r"\b\w+\b", answer.lower())
    hit = {c for c, kws in KEYWORDS.items() if set(kws.split()) & set(words)}
    assert hit == {expected}, answer
    assert not any(n in answer.lower() for n in NEGATIONS), answer
  rng = np.random.default_rng(0)
  assert common.describe_emotion(label, rng) in {
      t.format(common._EMOTION_PHRASES[label]) for t in common.EMOTION_ANSWERS}


@pytest.mark.parametrize("aus", [(), (12,), (1, 2, 4), (4, 1, 25, 26, 43)])
def test_au_answers_list_exactly_the_label(aus):
  for seed in range(4):
    answer = common.describe_aus(aus, np.random.default_rng(seed))
    # FABA-Bench reads predicted AUs as every "AU<digits>" in the text.
    assert [int(a) for a in re.findall(r"AU(\d+)", answer)] == sorted(aus)
  if aus:
    assert f"AU{min(aus)} ({facs.AU_NAMES[min(aus)]})" in answer
  assert facs.format_au_label(aus) == ", ".join(str(a) for a in sorted(aus))


# ------------------------------------------------------------------------------------ AffectNet

AFFECTNET_HEADER = ("subDirectory_filePath,face_x,face_y,face_width,face_height,"
                    "facial_landmarks,expression,valence,arousal")


def _affectnet_row(path: str, expression) -> str:
  return f'{path},10,10,100,100,"1.0;2.0;3.0",{expression},0.5,-0.2'


def build_affectnet(root) -> None:
  rows = [_affectnet_row(f"1/img{e}.jpg", e) for e in range(11)]  # Every expression code.
  rows += [_affectnet_row("1/imgbad.jpg", "x"),      # bad_label
           _affectnet_row("1/img11.jpg", 11),        # bad_label
           _affectnet_row("1/img1.png", 1),          # duplicate id (same path without ext)
           _affectnet_row("../escape.jpg", 1),       # path_escape
           "2/short.jpg,1,2"]                        # malformed_record
  lists = os.path.join(root, "Manually_Annotated_file_lists")
  _write(os.path.join(lists, "training.csv"), "\n".join([AFFECTNET_HEADER] + rows) + "\n")
  # validation.csv without a header row: read in the documented column order.
  _write(os.path.join(lists, "validation.csv"), _affectnet_row("3/val0.jpg", 6) + "\n")
  for e in range(11):
    write_image(os.path.join(root, "Manually_Annotated_Images", "1", f"img{e}.jpg"), e)
  write_image(os.path.join(root, "Manually_Annotated_Images", "3", "val0.jpg"), 20)


AFFECTNET_EXPECTED = ["Neutral", "Happiness", "Sadness", "Surprise", "Fear", "Disgust", "Anger"]


def test_affectnet_seven_and_eight_classes(tmp_path):
  build_affectnet(tmp_path)
  seven = affectnet.convert(str(tmp_path))
  assert [r.label for r in seven.records["train"]] == AFFECTNET_EXPECTED
  assert seven.records["train"][0].id == "AffectNet/1/img0"
  assert seven.records["train"][0].image == "Manually_Annotated_Images/1/img0.jpg"
  assert seven.report("train").counts() == {
      "excluded_class": 4, "bad_label": 2, "duplicate_id": 1, "path_escape": 1,
      "malformed_record": 1}
  assert [r.label for r in seven.records["test"]] == ["Anger"]
  eight = affectnet.convert(str(tmp_path), num_classes=8)
  assert [r.label for r in eight.records["train"]] == AFFECTNET_EXPECTED + ["Contempt"]
  assert "contempt" in eight.records["train"][-1].answer
  assert eight.report("train").count("excluded_class") == 3
  # Excluding classes is by design: strict mode does not fail on it, only on the bad rows.
  with pytest.raises(StrictSkipError, match="line 13"):
    affectnet.convert(str(tmp_path), strict=True)
  with pytest.raises(DataFileError, match="training.csv"):
    affectnet.convert(str(tmp_path / "empty"))


# ----------------------------------------------------------------------------------------- BP4D

BP4D_COLUMNS = [1, 2, 3, 4, 5, 6, 7, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 22, 23, 24, 27]


def _bp4d_row(frame: int, on=(), values=None) -> str:
  values = dict(values or {})
  cells = [values.get(au, "1" if au in on else "0") for au in BP4D_COLUMNS]
  return ",".join([str(frame)] + cells)


def build_bp4d(root) -> dict[str, int]:
  """Four subjects; returns the number of good frames of each."""
  label_dir = os.path.join(root, "AUCoding", "AU_OCC")
  header = "Frame," + ",".join(str(a) for a in BP4D_COLUMNS)
  rows = [_bp4d_row(1, values={3: "9"}),              # AU3 unknown: not used, frame kept
          _bp4d_row(2, on=(1, 12, 27)),               # AU27 is not among the 12: ignored
          _bp4d_row(3, values={4: "9"}),              # unknown_au
          _bp4d_row(4, values={2: "2"}),              # bad_label
          _bp4d_row(5, on=(6,)),                      # missing_image
          _bp4d_row(2, on=(1,)),                      # duplicate_id
          "x,1"]                                      # malformed_record
  _write(os.path.join(label_dir, "F001_T1.csv"), "\n".join([header] + rows))
  for frame in (1, 2, 3, 4):
    write_image(os.path.join(root, "images", "F001", "T1", f"{frame:04d}.jpg"), frame)
  good = {"F001": 2}
  for subject, n in (("F002", 3), ("M001", 1), ("M002", 4)):
    _write(os.path.join(label_dir, f"{subject}_T2.csv"),
           "\n".join([header] + [_bp4d_row(f, on=(7, 23)) for f in range(1, n + 1)]))
    for f in range(1, n + 1):
      write_image(os.path.join(root, "images", subject, "T2", f"{f}.jpg"), f)
    good[subject] = n
  _write(os.path.join(label_dir, "M002_T3.csv"), "Frame,1,2\n1,0,0")  # bad_label_file
  _write(os.path.join(label_dir, "notes.csv"), "Frame,1\n")           # bad_label_file (name)
  return good


def test_bp4d_labels_skips_and_folds(tmp_path):
  good = build_bp4d(tmp_path)
  out = bp4d.convert(str(tmp_path))
  assert out.splits == ["fold0", "fold1", "fold2"]
  everything = {r.id: r for split in out.splits for r in out.records[split]}
  assert everything["BP4D/F001/T1/1"].label == ""
  assert everything["BP4D/F001/T1/2"].label == "1, 12"
  assert everything["BP4D/F001/T1/2"].image == "images/F001/T1/0002.jpg"
  assert everything["BP4D/F002/T2/3"].label == "7, 23"
  assert everything["BP4D/M002/T2/4"].image == "images/M002/T2/4.jpg"
  assert re.findall(r"AU(\d+)", everything["BP4D/F001/T1/2"].answer) == ["1", "12"]
  assert len(everything) == sum(good.values())
  counts: dict[str, int] = {}
  for split in out.splits:
    for reason, n in out.report(split).counts().items():
      counts[reason] = counts.get(reason, 0) + n
  assert counts == {"unknown_au": 1, "bad_label": 1, "missing_image": 1, "duplicate_id": 1,
                    "malformed_record": 1, "bad_label_file": 1}
  assert out.skips[""].counts() == {"bad_label_file": 1}
  # Subject-exclusive: a subject's frames are all in one fold, as `assign_folds` says.
  assignment = folds.assign_folds(good, 3, seed=0)
  for split in out.splits:
    subjects = {r.id.split("/")[1] for r in out.records[split]}
    assert subjects == {s for s, k in assignment.items() if f"fold{k}" == split}
  held_out = bp4d.convert(str(tmp_path), fold=1)
  assert sorted(held_out.records) == ["test", "train"]
  test_subjects = {r.id.split("/")[1] for r in held_out.records["test"]}
  assert test_subjects == {s for s, k in assignment.items() if k == 1}
  assert not test_subjects & {r.id.split("/")[1] for r in held_out.records["train"]}
  with pytest.raises(ValueError, match="--fold=3"):
    bp4d.convert(str(tmp_path), fold=3)
  with pytest.raises(StrictSkipError):
    bp4d.convert(str(tmp_path), strict=True)


# ---------------------------------------------------------------------------------------- DISFA


def build_disfa(root) -> None:
  labels = os.path.join(root, "ActionUnit_Labels")
  for n, subject in enumerate(("SN001", "SN002", "SN003", "SN004")):
    for au in disfa.AUS:
      if subject == "SN003" and au == 26:
        continue  # bad_label_file: the subject is lost, named once.
      lines = []
      for frame in range(1, 5):
        if subject == "SN001" and frame == 3 and au == 4:
          continue  # missing_label for frame 3
        value = {1: {1: 2, 2: 1}, 2: {12: 5, 25: 3}}.get(frame, {}).get(au, 0)
        lines.append(f"{frame},{value}")
      if subject == "SN002" and au == 9:
        lines += ["x,y", "7,6"]  # malformed_record, bad_label
      _write(os.path.join(labels, subject, f"{subject}_au{au}.txt"), "\n".join(lines) + "\n")
    for frame in range(1, 5 if subject != "SN004" else 4):  # SN004 frame 4: missing_image
      write_image(os.path.join(root, "images", subject, f"{frame:05d}.jpg"), n * 10 + frame)


def test_disfa_threshold_skips_and_folds(tmp_path):
  build_disfa(tmp_path)
  out = disfa.convert(str(tmp_path))
  everything = {r.id: r for split in out.splits for r in out.records[split]}
  # Intensity >= 2 is an occurrence: AU1 at 2 is on, AU2 at 1 is off.
  assert everything["DISFA/SN001/1"].label == "1"
  assert everything["DISFA/SN001/2"].label == "12, 25"
  assert everything["DISFA/SN001/4"].label == ""
  assert everything["DISFA/SN001/1"].image == "images/SN001/00001.jpg"
  assert "DISFA/SN001/3" not in everything
  assert sorted(everything) == sorted(
      [f"DISFA/SN001/{f}" for f in (1, 2, 4)] + [f"DISFA/SN002/{f}" for f in range(1, 5)]
      + [f"DISFA/SN004/{f}" for f in range(1, 4)])
  counts: dict[str, int] = {}
  for split in out.splits:
    for reason, n in out.report(split).counts().items():
      counts[reason] = counts.get(reason, 0) + n
  assert counts == {"missing_label": 1, "malformed_record": 1, "bad_label": 1,
                    "bad_label_file": 1, "missing_image": 1}
  subjects = [{r.id.split("/")[1] for r in out.records[s]} for s in out.splits]
  for a, b in itertools.combinations(subjects, 2):
    assert a.isdisjoint(b)  # subject-exclusive folds
  with pytest.raises(ValueError, match="not among"):
    disfa.convert(str(tmp_path), aus=(1, 3))
  with pytest.raises(DataFileError, match="ActionUnit_Labels"):
    disfa.convert(str(tmp_path / "nowhere"))


def test_disfa_au_subset(tmp_path):
  build_disfa(tmp_path)
  out = disfa.convert(str(tmp_path), aus=(2, 12))
  everything = {r.id: r for split in out.splits for r in out.records[split]}
  assert everything["DISFA/SN001/1"].label == ""     # AU2 at intensity 1: off
  assert everything["DISFA/SN001/2"].label == "12"
  assert "DISFA/SN001/3" in everything               # its missing AU4 value is not needed now
  assert "DISFA/SN003/1" in everything               # its missing AU26 file is not needed now


# ------------------------------------------------------------------------------------------ GFT


def build_gft(root, official: bool) -> None:
  header = "frame," + ",".join(f"AU{a}" for a in gft.AUS) + ",AU17"
  for n, subject in enumerate(("S01", "S02", "S03", "S04")):
    rows = [header]
    for frame in range(1, 4):
      cells = ["1" if (frame == 1 and a in (6, 12)) else "0" for a in gft.AUS] + ["1"]
      rows.append(",".join([str(frame)] + cells))
      write_image(os.path.join(root, "images", subject, f"{frame:03d}.jpg"), n * 10 + frame)
    if subject == "S01":
      rows.append("4," + ",".join(["0"] * 9 + [""]) + ",0")   # unknown_au (empty)
      rows.append("5," + ",".join(["9"] + ["0"] * 9) + ",0")   # unknown_au (9)
      rows.append("6," + ",".join(["2"] + ["0"] * 9) + ",0")   # bad_label
    _write(os.path.join(root, "labels", f"{subject}.csv"), "\n".join(rows))
  if official:
    _write(os.path.join(root, "splits", "train.txt"), "# official\nS01\nS02\n")
    _write(os.path.join(root, "splits", "test.txt"), "S03\nS05\n")  # S05 has no labels


def test_gft_official_split(tmp_path):
  build_gft(tmp_path, official=True)
  out = gft.convert(str(tmp_path))
  assert sorted(out.records) == ["test", "train"]
  assert {r.id.split("/")[1] for r in out.records["train"]} == {"S01", "S02"}
  assert {r.id.split("/")[1] for r in out.records["test"]} == {"S03"}
  first = out.records["train"][0]
  assert first.id == "GFT/S01/1" and first.label == "6, 12"
  assert first.image == "images/S01/001.jpg"
  assert out.report("train").counts() == {"unknown_au": 2, "bad_label": 1}
  assert out.report("test").counts() == {"bad_label_file": 1}
  assert out.skips[""].counts() == {"unlisted_subject": 3}  # S04's three frames
  with pytest.raises(StrictSkipError, match="S01.csv line 7"):
    gft.convert(str(tmp_path), strict=True)


def test_gft_folds_without_split_files(tmp_path):
  build_gft(tmp_path, official=False)
  out = gft.convert(str(tmp_path), num_folds=2)
  assert out.splits == ["fold0", "fold1"]
  per_split = [{r.id.split("/")[1] for r in out.records[s]} for s in out.splits]
  assert per_split[0].isdisjoint(per_split[1])
  assert per_split[0] | per_split[1] == {"S01", "S02", "S03", "S04"}
  os.makedirs(tmp_path / "splits")
  _write(os.path.join(tmp_path, "splits", "train.txt"), "S01\n")
  with pytest.raises(DataFileError, match="both"):
    gft.convert(str(tmp_path))


# ---------------------------------------------------------------------------------------- folds


def test_assign_folds_hand_computed():
  # Largest first into the lightest fold: a->0 (10), b->1 (9), c->1 (14), d->0 (14), then e
  # ties on frames (14/14) and subjects (2/2) and goes to fold 0.
  counts = {"a": 10, "b": 9, "c": 5, "d": 4, "e": 1}
  assert folds.assign_folds(counts, 2, seed=0) == {"a": 0, "b": 1, "c": 1, "d": 0, "e": 0}


@pytest.mark.parametrize("seed, num_folds", list(itertools.product([0, 1, 7], [2, 3, 5])))
def test_assign_folds_partition(seed, num_folds):
  rng = np.random.default_rng(100 + seed)
  counts = {f"S{i:03d}": int(c) for i, c in enumerate(rng.integers(0, 5000, 27))}
  assignment = folds.assign_folds(counts, num_folds, seed)
  # Every subject in exactly one fold; folds are disjoint and together cover every subject.
  assert set(assignment) == set(counts)
  members = [{s for s, k in assignment.items() if k == f} for f in range(num_folds)]
  assert all(members)
  assert sum(len(m) for m in members) == len(counts)
  for a, b in itertools.combinations(members, 2):
    assert a.isdisjoint(b)
  # Balanced: greedy largest-first keeps every fold within one subject of the mean.
  totals = [sum(counts[s] for s in m) for m in members]
  assert max(totals) - min(totals) <= max(counts.values())
  assert folds.assign_folds(counts, num_folds, seed) == assignment  # deterministic


def test_assign_folds_ties_and_errors():
  equal = {f"s{i}": 100 for i in range(6)}
  layouts = {tuple(sorted(folds.assign_folds(equal, 3, s).items())) for s in range(10)}
  assert len(layouts) > 1  # The seed breaks ties ...
  for layout in layouts:  # ... but every layout is balanced: two subjects per fold.
    assert sorted(np.bincount([k for _, k in layout])) == [2, 2, 2]
  with pytest.raises(ValueError, match="cannot fill"):
    folds.assign_folds({"a": 1, "b": 2}, 3, 0)
  with pytest.raises(ValueError, match=">= 2"):
    folds.assign_folds({"a": 1, "b": 2}, 1, 0)
  assert folds.split_of(2, None) == "fold2"
  assert folds.split_of(2, 2) == "test" and folds.split_of(0, 2) == "train"
