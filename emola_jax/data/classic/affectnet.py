"""AffectNet (manually annotated part) to FABA-style emotion records.

Layout, as released (the data root is the AffectNet folder):

    Manually_Annotated_file_lists/training.csv     # (the CSVs may also sit in the root itself)
    Manually_Annotated_file_lists/validation.csv
    Manually_Annotated_Images/<subDirectory_filePath>   # e.g. 689/737db...ca.jpg

CSV columns: subDirectory_filePath, face_x, face_y, face_width, face_height, facial_landmarks,
expression, valence, arousal (a header row is expected; a file without one is read in this
column order). Expression: 0 Neutral, 1 Happy, 2 Sad, 3 Surprise, 4 Fear, 5 Disgust, 6 Anger,
7 Contempt, 8 None, 9 Uncertain, 10 No-face. `training.csv` -> split "train",
`validation.csv` -> split "test" (AffectNet's own test set is not public, so its validation set
is the usual test set).

`num_classes=7` keeps the 7 FABA classes and drops contempt and 8-10 (counted as
`excluded_class`); `num_classes=8` keeps contempt as label "Contempt". Images are used as on disk
(the face box columns are not applied). Record ids are `AffectNet/<path without extension>`.
"""

from __future__ import annotations

import csv
import io
import os

from emola_jax.data.classic.common import Converted, make_record, read_lines
from emola_jax.data.records import DataFileError, RecordError, check_relative_path

SOURCE = "AffectNet"
COLUMNS = ("subDirectory_filePath", "face_x", "face_y", "face_width", "face_height",
           "facial_landmarks", "expression", "valence", "arousal")
EXPRESSIONS = {0: "Neutral", 1: "Happiness", 2: "Sadness", 3: "Surprise", 4: "Fear",
               5: "Disgust", 6: "Anger", 7: "Contempt"}
NON_FACE = {8: "None", 9: "Uncertain", 10: "No-face"}
CSV_FILES = {"train": "training.csv", "test": "validation.csv"}
LIST_DIR = "Manually_Annotated_file_lists"
IMAGE_DIR = "Manually_Annotated_Images"


def _find_csv(data_root: str, name: str) -> str | None:
  for path in (os.path.join(data_root, LIST_DIR, name), os.path.join(data_root, name)):
    if os.path.isfile(path):
      return path
  return None


def convert(data_root: str, *, seed: int = 0, strict: bool = False, num_classes: int = 7,
            landmark_dir: str | None = None) -> Converted:
  """Reads AffectNet's CSVs into records per split ("train", "test").

  Raises:
    DataFileError: neither CSV exists, or a CSV lacks a needed column.
    StrictSkipError: in strict mode, the first bad row.
  """
  if num_classes not in (7, 8):
    raise ValueError(f"AffectNet num_classes must be 7 or 8, got {num_classes}")
  out = Converted(strict=strict)
  found = {split: _find_csv(data_root, name) for split, name in CSV_FILES.items()}
  if not any(found.values()):
    raise DataFileError(f"{data_root}: neither training.csv nor validation.csv found in the root "
                        f"or in {LIST_DIR}/; is --input the AffectNet folder?")
  seen: dict[str, str] = {}
  for split, path in found.items():
    if path is None:
      continue
    _read_csv(path, split, out, seen, seed, num_classes, landmark_dir)
  return out


def _read_csv(path: str, split: str, out: Converted, seen: dict[str, str], seed: int,
              num_classes: int, landmark_dir: str | None) -> None:
  rows = list(csv.reader(io.StringIO("\n".join(read_lines(path)))))
  if not rows:
    return
  if rows[0] and rows[0][0].strip() == COLUMNS[0]:
    header, rows, first_line = [c.strip() for c in rows[0]], rows[1:], 2
  else:
    header, first_line = list(COLUMNS), 1
  missing = [c for c in ("subDirectory_filePath", "expression") if c not in header]
  if missing:
    raise DataFileError(f"{path}: header lacks column(s) {missing}; expected {list(COLUMNS)}")
  col_path, col_expr = header.index("subDirectory_filePath"), header.index("expression")
  for line_no, row in enumerate(rows, start=first_line):
    if not row:
      continue
    ref = f"{path} line {line_no}"
    if len(row) <= max(col_path, col_expr):
      out.skip(split, "malformed_record", ref, f"row has {len(row)} columns, expected "
               f"{len(header)}")
      continue
    rel, raw_expr = row[col_path].strip(), row[col_expr].strip()
    ref = f"{ref} ({rel})"
    try:
      rel = check_relative_path(rel, "subDirectory_filePath", ref)
    except RecordError as e:
      out.skip(split, e.reason, ref, e.message)
      continue
    try:
      expr = int(raw_expr)
    except ValueError:
      out.skip(split, "bad_label", ref, f"expression {raw_expr!r} is not an integer")
      continue
    if expr in NON_FACE:
      out.skip(split, "excluded_class", ref, f"expression {expr} ({NON_FACE[expr]}) is not a face "
               "emotion")
      continue
    if expr not in EXPRESSIONS:
      out.skip(split, "bad_label", ref, f"expression {expr} is outside 0..10")
      continue
    if expr == 7 and num_classes == 7:
      out.skip(split, "excluded_class", ref, "contempt is not a 7-class label (use 8 classes)")
      continue
    record_id = f"{SOURCE}/{os.path.splitext(rel)[0]}"
    if record_id in seen:
      out.skip(split, "duplicate_id", ref, f"image already listed at {seen[record_id]}")
      continue
    seen[record_id] = ref
    try:
      record = make_record(record_id=record_id, source=SOURCE, image=f"{IMAGE_DIR}/{rel}",
                           task="emotion", seed=seed, emotion=EXPRESSIONS[expr],
                           landmark_dir=landmark_dir, where=ref)
    except RecordError as e:
      out.skip(split, e.reason, ref, e.message)
      continue
    out.add(split, record)
