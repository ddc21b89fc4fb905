"""Tests of `emola_jax.data.faba_instruct`: the FABA-Instruct JSON reader, on files laid out as
released, with every kind of bad record."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image

from emola_jax.data import faba_instruct, instructions
from emola_jax.data.records import DataFileError
from emola_jax.data.skips import StrictSkipError

PRIOR_DIM = 212


def write_image(path, seed: int = 0, size: int = 8, fmt: str = "JPEG") -> bytes:
  """A small random RGB image saved at `path`; returns the file's bytes."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
  Image.fromarray(pixels).save(path, fmt)
  with open(path, "rb") as f:
    return f.read()


def write_prior(path, seed: int = 0, shape=(106, 2)) -> np.ndarray:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  array = np.random.default_rng(seed).uniform(0, 192, shape).astype(np.float32)
  np.save(path, array)
  return array


def faba_record(name: str, split: str = "train", answer: str = "The face shows joy.") -> dict:
  """A training record in the released form, for AffectNet image `name`."""
  return {
      "source": "AffectNet",
      "id": f"AffectNet/AffectNet_v2/689/{name}",
      "image": f"FABAInstruct/{split}/images/AffectNet/AffectNet_v2/689/{name}.jpg",
      "landmark": f"FABAInstruct/{split}/landmarks/AffectNet/AffectNet_v2/689/{name}.npy",
      "conversations": [{"from": "human", "value": "What is the emotion of this face?\n<image>"},
                        {"from": "gpt", "value": answer}],
  }


def materialise(root, record: dict, seed: int = 0) -> None:
  """Writes the image and landmark files a record points to."""
  if record.get("image"):
    write_image(os.path.join(root, record["image"]), seed)
  if record.get("landmark"):
    write_prior(os.path.join(root, record["landmark"]), seed)


def build_train_file(root) -> tuple[str, list[dict]]:
  """`emotion_train.json` with 3 good records and one of each JSON-level problem.

  Returns the file path and the list written. Bad records (index: reason):
  3 not an object: malformed_record; 4 image "../": path_escape; 5 absolute landmark:
  path_escape; 6 only a human turn: no_gpt_turn; 7 no <image>: image_token; 8 gpt first:
  bad_conversation; 9 duplicate of record 0's id: duplicate_id; 10 image file absent:
  missing_image; 11 landmark file absent: missing_landmark.
  """
  good = [faba_record(f"good{i}") for i in range(3)]
  for i, record in enumerate(good):
    materialise(root, record, seed=i)
  escape = {**faba_record("esc"), "image": "../outside.jpg"}
  absolute = {**faba_record("abs"), "landmark": "/etc/landmark.npy"}
  no_gpt = {**faba_record("nogpt"), "conversations": [{"from": "human", "value": "<image>\nq"}]}
  no_image = {**faba_record("noimg"), "conversations": [
      {"from": "human", "value": "What is the emotion?"}, {"from": "gpt", "value": "joy"}]}
  gpt_first = {**faba_record("order"), "conversations": [
      {"from": "gpt", "value": "joy"}, {"from": "human", "value": "<image>\nq"}]}
  duplicate = faba_record("good0")
  missing_image = faba_record("noimagefile")
  write_prior(os.path.join(root, missing_image["landmark"]))
  missing_landmark = faba_record("nolandmark")
  write_image(os.path.join(root, missing_landmark["image"]))
  for record in (escape, absolute, no_gpt, no_image, gpt_first):
    materialise(root, {k: v for k, v in record.items()
                       if k not in ("image", "landmark") or not v.startswith(("/", ".."))})
  records = good + ["not an object", escape, absolute, no_gpt, no_image, gpt_first, duplicate,
                    missing_image, missing_landmark]
  path = os.path.join(root, "emotion_train.json")
  with open(path, "w", encoding="utf-8") as f:
    json.dump(records, f)
  return path, records


EXPECTED_TRAIN_SKIPS = {
    "malformed_record": 1, "path_escape": 2, "no_gpt_turn": 1, "image_token": 1,
    "bad_conversation": 1, "duplicate_id": 1, "missing_image": 1, "missing_landmark": 1,
}


def build_test_file(root) -> tuple[str, list[dict]]:
  """`emotion_test.json` in the evaluation form: label + gpt4, no conversations.

  Records: 0 label "Happiness"; 1 label index 2 (Surprise); 2 label "3" (Anger); 3 label 9:
  bad_label; 4 neither conversations nor gpt4: no_gpt_turn.
  """
  records = []
  for i, label in enumerate(["Happiness", 2, "3", 9]):
    record = faba_record(f"eval{i}", split="test")
    del record["conversations"]
    record.update(label=label, gpt4=f"Reference description {i}.")
    materialise(root, record, seed=10 + i)
    records.append(record)
  no_text = faba_record("eval4", split="test")
  del no_text["conversations"]
  no_text["label"] = "Fear"
  materialise(root, no_text, seed=14)
  records.append(no_text)
  path = os.path.join(root, "emotion_test.json")
  with open(path, "w", encoding="utf-8") as f:
    json.dump(records, f)
  return path, records


def test_training_file_skips_each_bad_record(tmp_path):
  path, written = build_train_file(tmp_path)
  records, report = faba_instruct.read_split(path, tmp_path)
  assert [r.id for r in records] == [written[i]["id"] for i in range(3)]
  assert all(r.task == "emotion" for r in records)  # Inferred from the file name.
  assert records[0].conversations[1].value == "The face shows joy."
  assert report.counts() == EXPECTED_TRAIN_SKIPS
  assert report.count() == len(written) - 3
  # Each skip names the file, the record index and (when it has one) its id.
  refs = {reason: report.examples(reason)[0][0] for reason in EXPECTED_TRAIN_SKIPS}
  assert refs["malformed_record"] == f"{path} record 3"
  assert refs["no_gpt_turn"] == f"{path} record 6 (id={written[6]['id']})"
  assert refs["duplicate_id"].startswith(f"{path} record 9")
  assert "already used by record 0" in report.examples("duplicate_id")[0][1]
  assert [r for r, _ in report.examples("path_escape")] == [
      f"{path} record 4 (id={written[4]['id']})", f"{path} record 5 (id={written[5]['id']})"]
  assert "missing_image" in report.counts() and "noimagefile" in refs["missing_image"]


def test_strict_stops_at_first_bad_record(tmp_path):
  path, written = build_train_file(tmp_path)
  with pytest.raises(StrictSkipError) as info:
    faba_instruct.read_split(path, tmp_path, strict=True)
  assert info.value.reason == "malformed_record"
  assert f"{path} record 3" in str(info.value) and "--strict" in str(info.value)


def test_evaluation_records_get_the_fixed_prompt(tmp_path):
  path, written = build_test_file(tmp_path)
  records, report = faba_instruct.read_split(path, tmp_path)
  assert report.counts() == {"bad_label": 1, "no_gpt_turn": 1}
  assert [r.label for r in records] == ["Happiness", "Surprise", "Anger"]
  for i, record in enumerate(records):
    assert record.task == "emotion"
    assert record.gpt4 == f"Reference description {i}."
    assert [(t.role, t.value) for t in record.conversations] == [
        ("human", "<image>\n" + instructions.EVAL_PROMPTS["emotion"]),
        ("gpt", f"Reference description {i}.")]
  assert instructions.EVAL_PROMPTS["emotion"] == "What emotions are conveyed by this face?"


def test_au_labels_and_task_override(tmp_path):
  good = faba_record("au0")
  good.update(label="1, 2, 4", gpt4="AU1 and AU2 and AU4.")
  del good["conversations"]
  bad = {**good, "id": "x/bad", "label": "AU1 and more"}
  materialise(tmp_path, good)
  path = tmp_path / "faba_au_test.json"
  path.write_text(json.dumps([good, bad]))
  records, report = faba_instruct.read_split(path, tmp_path)
  assert [r.label for r in records] == ["1, 2, 4"] and report.counts() == {"bad_label": 1}
  assert records[0].conversations[0].value.endswith(instructions.EVAL_PROMPTS["au"])
  # An explicit task wins over the name; it decides the prompt and the label check.
  plain = tmp_path / "annotations.json"
  plain.write_text(json.dumps([good]))
  with pytest.raises(DataFileError, match="--task"):
    faba_instruct.read_split(plain, tmp_path)
  records, _ = faba_instruct.read_split(plain, tmp_path, task="au")
  assert records[0].task == "au"


@pytest.mark.parametrize("name, task", [
    ("emotion_train.json", "emotion"), ("FABA_AU_test.json", "au"), ("au-train.json", "au"),
    ("train_emotion_v2.json", "emotion"),
])
def test_infer_task(name, task):
  assert faba_instruct.infer_task(f"/data/{name}") == task


@pytest.mark.parametrize("name", ["train.json", "emotion_au.json", "augmented_train.json"])
def test_infer_task_refuses_ambiguous_names(name):
  with pytest.raises(DataFileError, match="--task"):
    faba_instruct.infer_task(name)


def test_whole_file_errors(tmp_path):
  broken = tmp_path / "emotion_train.json"
  broken.write_text('[{"id": "a",\n "image": }]')
  with pytest.raises(DataFileError, match=r"line 2, column 11"):
    faba_instruct.read_split(broken, tmp_path)
  wrapped = tmp_path / "au_train.json"
  wrapped.write_text(json.dumps({"records": []}))
  with pytest.raises(DataFileError, match="expected a list"):
    faba_instruct.read_split(wrapped, tmp_path)
  with pytest.raises(DataFileError, match="not found"):
    faba_instruct.read_split(tmp_path / "emotion_missing.json", tmp_path)
  binary = tmp_path / "emotion_bin.json"
  binary.write_bytes(b"\xff\xfe\x00garbage")
  with pytest.raises(DataFileError, match="UTF-8"):
    faba_instruct.read_split(binary, tmp_path)


def test_without_file_checks(tmp_path):
  record = faba_record("nofiles")
  path = tmp_path / "emotion_train.json"
  path.write_text(json.dumps([record]))
  records, report = faba_instruct.read_split(path, tmp_path, check_files=False)
  assert len(records) == 1 and report.count() == 0
  records, report = faba_instruct.read_split(path, tmp_path)
  assert records == [] and report.counts() == {"missing_image": 1}
