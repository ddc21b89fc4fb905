"""GFT (Sayette Group Formation Task) AU occurrence to FABA-style AU records.

GFT's per-frame AU codes come as per-participant files whose exact form varies between copies,
so this converter reads one documented, easy-to-produce layout (the data root holds):

    labels/<subject>.csv         # header "frame,AU1,AU2,AU4,..." (extra AU columns are ignored);
                                 # one row per frame: 1 = present, 0 = absent, 9 or empty = unknown
    images/<subject>/<frame>.jpg # the frame's number, any zero padding
    splits/train.txt             # optional: the official split, one subject per line
    splits/test.txt              #   ("#" starts a comment)

The 10 AUs 1, 2, 4, 6, 10, 12, 14, 15, 23, 24 are used. With `splits/train.txt` and
`splits/test.txt` present the splits are "train" and "test" (subjects in neither are counted as
`unlisted_subject`; a listed subject without a label file is `bad_label_file`); without them,
subjects get `num_folds` subject-exclusive folds like BP4D. A frame with an unknown AU is dropped
(`unknown_au`); other values are `bad_label`; a frame without an image is `missing_image`.
Record ids are `GFT/<subject>/<frame>`.
"""

from __future__ import annotations

import csv
import io
import os

from emola_jax.data.classic.common import (Converted, assemble_subjects, index_frames,
                                           make_record, read_lines)
from emola_jax.data.records import DataFileError, Record, RecordError
from emola_jax.data.skips import SkipReport

SOURCE = "GFT"
AUS = (1, 2, 4, 6, 10, 12, 14, 15, 23, 24)
LABEL_DIR = "labels"
SPLIT_FILES = {"train": os.path.join("splits", "train.txt"),
               "test": os.path.join("splits", "test.txt")}


def _official_splits(data_root: str) -> dict[str, str] | None:
  paths = {s: os.path.join(data_root, p) for s, p in SPLIT_FILES.items()}
  present = [s for s, p in paths.items() if os.path.isfile(p)]
  if not present:
    return None
  if len(present) != len(paths):
    raise DataFileError(f"{data_root}/splits: found only {present}; give both train.txt and "
                        "test.txt, or neither (then folds are used)")
  subject_split: dict[str, str] = {}
  for split, path in paths.items():
    for line in read_lines(path):
      subject = line.split("#", 1)[0].strip()
      if not subject:
        continue
      if subject_split.get(subject, split) != split:
        raise DataFileError(f"{path}: subject {subject!r} is also in the "
                            f"{subject_split[subject]} list; splits must be disjoint")
      subject_split[subject] = split
  return subject_split


def convert(data_root: str, *, seed: int = 0, strict: bool = False, num_folds: int = 3,
            fold: int | None = None, aus: tuple[int, ...] = AUS,
            landmark_dir: str | None = None) -> Converted:
  """Reads every subject's label CSV into records per split.

  Raises:
    DataFileError: the label folder is missing/empty or the split lists are inconsistent.
    StrictSkipError: in strict mode, the first bad file or frame.
  """
  label_dir = os.path.join(data_root, LABEL_DIR)
  if not os.path.isdir(label_dir):
    raise DataFileError(f"{label_dir}: GFT label folder not found; see the layout in "
                        "emola_jax/data/classic/gft.py")
  subjects = sorted(os.path.splitext(n)[0] for n in os.listdir(label_dir)
                    if n.lower().endswith(".csv"))
  if not subjects:
    raise DataFileError(f"{label_dir}: no <subject>.csv label files")
  official = _official_splits(data_root)
  per_subject: dict[str, tuple[list[Record], SkipReport]] = {}
  for subject in subjects:
    report = SkipReport(strict=strict)
    per_subject[subject] = (_read_subject(data_root, subject, aus, seed, landmark_dir, report),
                            report)
  out = assemble_subjects(per_subject, strict=strict, num_folds=num_folds, fold=fold, seed=seed,
                          subject_splits=official)
  if official is not None:
    for subject, split in sorted(official.items()):
      if subject not in per_subject:
        out.skip(split, "bad_label_file", os.path.join(label_dir, f"{subject}.csv"),
                 f"subject {subject} is listed in {SPLIT_FILES[split]} but has no label file")
  return out


def _read_subject(data_root: str, subject: str, aus: tuple[int, ...], seed: int,
                  landmark_dir: str | None, report: SkipReport) -> list[Record]:
  path = os.path.join(data_root, LABEL_DIR, f"{subject}.csv")
  try:
    rows = list(csv.reader(io.StringIO("\n".join(read_lines(path)))))
  except DataFileError as e:
    report.add("bad_label_file", path, str(e))
    return []
  header = [c.strip() for c in rows[0]] if rows else []
  missing = [f"AU{au}" for au in aus if f"AU{au}" not in header]
  if not header or header[0].lower() != "frame" or missing:
    report.add("bad_label_file", path, f"header must be 'frame,AU1,...' with AUs {list(aus)}; "
               f"missing {missing or 'frame'}")
    return []
  columns = [header.index(f"AU{au}") for au in aus]
  frames = index_frames(os.path.join(data_root, "images", subject))
  records: list[Record] = []
  seen: set[int] = set()
  for line_no, row in enumerate(rows[1:], start=2):
    if not row:
      continue
    ref = f"{path} line {line_no}"
    if len(row) < len(header) or not row[0].strip().isdigit():
      report.add("malformed_record", ref, f"expected a frame number and {len(header) - 1} values")
      continue
    frame = int(row[0])
    ref = f"{ref} (frame {frame})"
    values = [row[c].strip() for c in columns]
    bad = [(au, v) for au, v in zip(aus, values) if v not in ("0", "1", "9", "")]
    if bad:
      report.add("bad_label", ref, f"AU values must be 0, 1, 9 or empty; got {bad}")
      continue
    unknown = [au for au, v in zip(aus, values) if v in ("9", "")]
    if unknown:
      report.add("unknown_au", ref, f"AU(s) {unknown} unknown (9 or empty)")
      continue
    if frame in seen:
      report.add("duplicate_id", ref, f"frame {frame} listed twice")
      continue
    seen.add(frame)
    if frame not in frames:
      report.add("missing_image", ref, f"no image for frame {frame} in images/{subject}/")
      continue
    try:
      record = make_record(
          record_id=f"{SOURCE}/{subject}/{frame}", source=SOURCE,
          image=f"images/{subject}/{frames[frame]}", task="au", seed=seed,
          aus=[au for au, v in zip(aus, values) if v == "1"], landmark_dir=landmark_dir, where=ref)
    except RecordError as e:
      report.add(e.reason, ref, e.message)
      continue
    records.append(record)
  return records
