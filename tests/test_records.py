"""Tests of `emola_jax.data.records` (Record validation) and `emola_jax.data.skips` (accounting)."""

from __future__ import annotations

import dataclasses

import pytest

from emola_jax.data.records import Record, RecordError, Turn, check_relative_path
from emola_jax.data.skips import SkipReport, StrictSkipError

GOOD = {
    "source": "AffectNet",
    "id": "AffectNet/AffectNet_v2/689/abc",
    "image": "FABAInstruct/train/images/AffectNet/AffectNet_v2/689/abc.jpg",
    "landmark": "FABAInstruct/train/landmarks/AffectNet/AffectNet_v2/689/abc.npy",
    "conversations": [{"from": "human", "value": "What is the emotion of this face?\n<image>"},
                      {"from": "gpt", "value": "The person looks happy."}],
}


def _with(**changes):
  obj = dict(GOOD)
  for key, value in changes.items():
    if value is _DROP:
      obj.pop(key)
    else:
      obj[key] = value
  return obj


_DROP = object()


def _reason(obj, **kwargs) -> RecordError:
  with pytest.raises(RecordError) as info:
    Record.from_json(obj, where="train.json record 7", **kwargs)
  return info.value


def test_valid_record_fields_and_round_trip():
  record = Record.from_json(GOOD, where="x")
  assert record.id == GOOD["id"]
  assert record.source == "AffectNet"
  assert record.image == GOOD["image"]
  assert record.landmark == GOOD["landmark"]
  assert record.conversations == (
      Turn("human", "What is the emotion of this face?\n<image>"),
      Turn("gpt", "The person looks happy."))
  assert record.task is None and record.label is None and record.gpt4 is None
  assert record.answer == "The person looks happy."
  assert record.to_json() == GOOD
  assert Record.from_json(record.to_json()) == record
  with pytest.raises(dataclasses.FrozenInstanceError):
    record.id = "other"  # type: ignore[misc]


def test_defaults_and_optional_fields():
  record = Record.from_json(_with(id=_DROP, source=_DROP, landmark=_DROP, label=3, gpt4="ref"),
                            task="emotion")
  # id defaults to the image path without extension; source to the id's first component.
  assert record.id == "FABAInstruct/train/images/AffectNet/AffectNet_v2/689/abc"
  assert record.source == "FABAInstruct"
  assert record.landmark is None
  assert record.task == "emotion"
  assert record.label == "3" and record.gpt4 == "ref"
  # An explicit task field wins over the default.
  assert Record.from_json(_with(task="au"), task="emotion").task == "au"


@pytest.mark.parametrize("conversations, reason", [
    (None, "no_gpt_turn"),
    ([{"from": "human", "value": "<image>\nq"}], "no_gpt_turn"),
    ([], "no_gpt_turn"),
    ([{"from": "gpt", "value": "a"}, {"from": "human", "value": "<image>\nq"}],
     "bad_conversation"),
    ([{"from": "human", "value": "<image>\nq"}, {"from": "human", "value": "q2"},
      {"from": "gpt", "value": "a"}], "bad_conversation"),
    ([{"from": "user", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}],
     "bad_conversation"),
    ([{"from": "human", "value": 5}, {"from": "gpt", "value": "a"}], "bad_conversation"),
    (["<image>", "a"], "bad_conversation"),
    ([{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}], "image_token"),
    ([{"from": "human", "value": "<image><image>\nq"}, {"from": "gpt", "value": "a"}],
     "image_token"),
    ([{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a <image>"}],
     "image_token"),
    ([{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"},
      {"from": "human", "value": "<image>"}, {"from": "gpt", "value": "b"}], "image_token"),
    ("not a list", "malformed_record"),
])
def test_invalid_conversations(conversations, reason):
  error = _reason(_with(conversations=conversations))
  assert error.reason == reason
  # The message names the file/record and the id.
  assert "train.json record 7" in str(error) and GOOD["id"] in str(error)


def test_multi_turn_conversation_is_valid():
  turns = [{"from": "human", "value": "<image>\nq1"}, {"from": "gpt", "value": "a1"},
           {"from": "human", "value": "q2"}, {"from": "gpt", "value": "a2"}]
  assert len(Record.from_json(_with(conversations=turns)).conversations) == 4


@pytest.mark.parametrize("path", [
    "/abs/x.jpg", "../x.jpg", "a/../../x.jpg", "..", "C:\\data\\x.jpg", "c:/x.jpg", "..\\x.jpg",
    "\\\\server\\share\\x.jpg", ".", "a/..",
])
def test_escaping_paths_are_rejected(path):
  assert _reason(_with(image=path)).reason == "path_escape"
  assert _reason(_with(landmark=path)).reason == "path_escape"


@pytest.mark.parametrize("path, normalised", [
    ("a/./b.jpg", "a/b.jpg"), ("a/../b.jpg", "b.jpg"), ("a//b.jpg", "a/b.jpg"),
    ("a\\b.jpg", "a/b.jpg"),
])
def test_inner_dots_are_normalised(path, normalised):
  assert check_relative_path(path, "image") == normalised


@pytest.mark.parametrize("obj, reason", [
    (["not", "an", "object"], "malformed_record"),
    (_with(image=_DROP), "malformed_record"),
    (_with(image=""), "malformed_record"),
    (_with(image=3), "malformed_record"),
    (_with(id=""), "malformed_record"),
    (_with(id=True), "malformed_record"),
    (_with(id={"a": 1}), "malformed_record"),
    (_with(source=1), "malformed_record"),
    (_with(task="pose"), "malformed_record"),
    (_with(label=[1, 2]), "malformed_record"),
    (_with(gpt4={"x": 1}), "malformed_record"),
])
def test_malformed_fields(obj, reason):
  assert _reason(obj).reason == reason


def test_skip_report_counts_examples_and_strict():
  report = SkipReport(max_examples=2)
  for i in range(3):
    report.add("missing_image", f"f.json record {i}", "gone")
  report.add("excluded_class", "row 9", "contempt")
  assert report.count("missing_image") == 3 and report.count("excluded_class") == 1
  assert report.count() == 4 and report.num_errors == 3
  assert report.counts() == {"excluded_class": 1, "missing_image": 3}
  assert report.examples("missing_image") == [("f.json record 0", "gone"),
                                               ("f.json record 1", "gone")]
  table = report.format_table("train skipped")
  assert "missing_image" in table and "f.json record 1: gone" in table and "1 more" in table
  assert report.as_dict()["missing_image"]["count"] == 3
  other = SkipReport()
  other.add("missing_image", "g.json record 5")
  report.merge(other)
  assert report.count("missing_image") == 4
  with pytest.raises(ValueError, match="unknown skip reason"):
    report.add("typo", "x")

  strict = SkipReport(strict=True)
  strict.add("excluded_class", "row 1")  # Filters never raise, even in strict mode.
  with pytest.raises(StrictSkipError) as info:
    strict.add("corrupt_image", "f.json record 3 (id=a)", "truncated")
  assert "f.json record 3 (id=a)" in str(info.value) and "truncated" in str(info.value)
  assert info.value.reason == "corrupt_image"
