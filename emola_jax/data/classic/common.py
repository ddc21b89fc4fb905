"""Shared pieces of the classic-dataset converters: answers, record building, frame lookup.

A classic dataset (RAF-DB, AffectNet, BP4D, DISFA, GFT) has labels, not descriptions. Each image
becomes a FABA-style `Record` whose human turn is one of the task's 100 instruction templates
(drawn with a generator seeded by `(seed, crc32(id))`, so an image's instruction does not depend
on which other images are present) followed by `\\n<image>`, and whose gpt turn is a short
templated sentence naming the emotion or the active AUs. The templates avoid every negation
substring and every emotion keyword of the FABA-Bench parser except the class's own, so the
metric reads back exactly the label (checked in the tests). `label` is in FABA form: the class
name (FABA order) or the active AUs as "1, 2, 4" ("" when none is active).
"""

from __future__ import annotations

import dataclasses
import os
import zlib
from typing import Iterable

import numpy as np

from emola_jax.data import facs
from emola_jax.data import instructions
from emola_jax.data.classic import folds
from emola_jax.data.records import IMAGE_TOKEN, DataFileError, Record
from emola_jax.data.skips import SkipReport

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")

# Noun per class ("Neutral" is an adjective, so it becomes "neutrality").
_EMOTION_PHRASES = {
    "Happiness": "happiness", "Sadness": "sadness", "Surprise": "surprise", "Anger": "anger",
    "Neutral": "neutrality", "Disgust": "disgust", "Fear": "fear",
    "Contempt": "contempt",
}
EMOTION_ANSWERS = (
    "The facial expression conveys {}.",
    "This face shows {}.",
    "The person's expression reflects {}.",
)
AU_ANSWERS_MANY = (
    "The active facial action units are {}.",
    "This face shows the action units {}.",
)
AU_ANSWERS_ONE = (
    "The active facial action unit is {}.",
    "This face shows the action unit {}.",
)
AU_ANSWER_NONE = "None of the annotated facial action units is active."


def record_rng(seed: int, record_id: str) -> np.random.Generator:
  """Generator for one record: depends only on the seed and the record id."""
  return np.random.default_rng([seed, zlib.crc32(record_id.encode("utf-8"))])


def describe_emotion(label: str, rng: np.random.Generator) -> str:
  """A one-sentence answer naming the emotion class `label`."""
  return EMOTION_ANSWERS[int(rng.integers(len(EMOTION_ANSWERS)))].format(_EMOTION_PHRASES[label])


def describe_aus(aus: Iterable[int], rng: np.random.Generator) -> str:
  """A one-sentence answer listing the active AUs as "AU<n> (<FACS name>)"."""
  aus = sorted(aus)
  if not aus:
    return AU_ANSWER_NONE
  names = [f"AU{au} ({facs.AU_NAMES[au]})" for au in aus]
  if len(names) == 1:
    return AU_ANSWERS_ONE[int(rng.integers(len(AU_ANSWERS_ONE)))].format(names[0])
  listed = ", ".join(names[:-1]) + " and " + names[-1]
  return AU_ANSWERS_MANY[int(rng.integers(len(AU_ANSWERS_MANY)))].format(listed)


def make_record(*, record_id: str, source: str, image: str, task: str, seed: int,
                emotion: str | None = None, aus: Iterable[int] | None = None,
                landmark_dir: str | None = None, where: str = "") -> Record:
  """Builds and validates the record of one labelled image.

  Args:
    record_id: unique id, e.g. "BP4D/F001/T1/12".
    source: dataset name.
    image: image path relative to the data root.
    task: "emotion" (give `emotion`, a class name) or "au" (give `aus`).
    seed: instruction/answer seed (combined with the id).
    landmark_dir: if set, the record's landmark is `<landmark_dir>/<image without ext>.npy`.
    where: location for error messages.
  """
  rng = record_rng(seed, record_id)
  instruction = instructions.sample_instruction(task, rng)
  if task == "emotion":
    answer, label = describe_emotion(emotion, rng), emotion
  else:
    aus = sorted(set(aus or ()))
    answer, label = describe_aus(aus, rng), facs.format_au_label(aus)
  landmark = None
  if landmark_dir:
    landmark = f"{landmark_dir.rstrip('/')}/{os.path.splitext(image)[0]}.npy"
  obj = {"source": source, "id": record_id, "image": image, "landmark": landmark, "task": task,
         "label": label,
         "conversations": [{"from": "human", "value": f"{instruction}\n{IMAGE_TOKEN}"},
                           {"from": "gpt", "value": answer}]}
  return Record.from_json(obj, where=where)


def index_frames(directory: str) -> dict[int, str]:
  """Frame number -> file name for the image files named by a number (any zero padding).

  Returns {} when the directory does not exist. With two files for one number (e.g. "1.jpg" and
  "001.jpg") the first in sorted order wins.
  """
  if not os.path.isdir(directory):
    return {}
  out: dict[int, str] = {}
  for name in sorted(os.listdir(directory)):
    stem, ext = os.path.splitext(name)
    if ext.lower() in IMAGE_EXTENSIONS and stem.isdigit():
      out.setdefault(int(stem), name)
  return out


def read_lines(path: str) -> list[str]:
  """Lines of a text label file (without line ends).

  Raises:
    DataFileError: the file is missing or not text.
  """
  try:
    with open(path, encoding="utf-8-sig") as f:
      return f.read().splitlines()
  except FileNotFoundError as e:
    raise DataFileError(f"{path}: label file not found; check --input and the dataset layout "
                        "in the converter's documentation") from e
  except UnicodeDecodeError as e:
    raise DataFileError(f"{path}: not a text file ({e})") from e


@dataclasses.dataclass
class Converted:
  """A converter's output: records and skip reports per split.

  Skips that belong to no split (e.g. an unparseable line) are under the split name "".
  """

  strict: bool = False
  records: dict[str, list[Record]] = dataclasses.field(default_factory=dict)
  skips: dict[str, SkipReport] = dataclasses.field(default_factory=dict)

  def report(self, split: str) -> SkipReport:
    if split not in self.skips:
      self.skips[split] = SkipReport(strict=self.strict)
    return self.skips[split]

  def add(self, split: str, record: Record) -> None:
    self.records.setdefault(split, []).append(record)
    self.report(split)

  def skip(self, split: str, reason: str, ref: str, detail: str = "") -> None:
    self.report(split).add(reason, ref, detail)

  @property
  def splits(self) -> list[str]:
    return sorted(s for s in set(self.records) | set(self.skips) if s)


def assemble_subjects(per_subject: dict[str, tuple[list[Record], SkipReport]], *, strict: bool,
                      num_folds: int, fold: int | None, seed: int,
                      subject_splits: dict[str, str] | None = None) -> Converted:
  """Groups per-subject records into splits.

  With `subject_splits` (an official subject -> split list), subjects missing from it are
  counted as `unlisted_subject`. Otherwise subjects get subject-exclusive folds
  (`folds.assign_folds`, balanced by kept frames): splits "fold0".."fold<n-1>" when `fold` is
  None, else "train" (the other folds) and "test" (fold `fold`).
  """
  out = Converted(strict=strict)
  if subject_splits is None:
    if fold is not None and not 0 <= fold < num_folds:
      raise ValueError(f"--fold={fold} is outside 0..{num_folds - 1} (--num_folds={num_folds})")
    assignment = folds.assign_folds({s: len(r) for s, (r, _) in per_subject.items()}, num_folds,
                                    seed)
    split_of = {s: folds.split_of(k, fold) for s, k in assignment.items()}
  else:
    split_of = dict(subject_splits)
  for subject in sorted(per_subject):
    records, report = per_subject[subject]
    split = split_of.get(subject)
    if split is None:
      out.report("").merge(report)
      for record in records:
        out.skip("", "unlisted_subject", record.id,
                 f"subject {subject} is in no official split list")
      continue
    out.report(split).merge(report)
    for record in records:
      out.add(split, record)
  return out
