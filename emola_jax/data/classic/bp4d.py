"""BP4D-Spontaneous AU occurrence to FABA-style AU records, in subject-exclusive folds.

Layout, as released (the data root holds both folders):

    AUCoding/AU_OCC/F001_T1.csv     # one per subject and task; header "Frame,1,2,3,4,...";
                                    # one row per coded frame, 0 = absent, 1 = present, 9 = unknown
    images/F001/T1/<frame>.jpg      # the frame's number, any zero padding ("12.jpg", "0012.jpg")

The 12 AUs 1, 2, 4, 6, 7, 10, 12, 14, 15, 17, 23, 24 are used (other columns are ignored). A
frame with any of them coded 9 is dropped (`unknown_au`); a value other than 0/1/9 is
`bad_label`; a coded frame without an image is `missing_image`; an unreadable file or one
lacking a needed column is `bad_label_file` (its frames are lost, the file is named). Subjects
(F001 ... M018) are split into `num_folds` subject-exclusive folds balanced by frame count (see
`folds.py`). Record ids are `BP4D/<subject>/<task>/<frame>`.
"""

from __future__ import annotations

import csv
import io
import os
import re

from emola_jax.data.classic.common import (Converted, assemble_subjects, index_frames,
                                           make_record, read_lines)
from emola_jax.data.records import DataFileError, Record, RecordError
from emola_jax.data.skips import SkipReport

SOURCE = "BP4D"
AUS = (1, 2, 4, 6, 7, 10, 12, 14, 15, 17, 23, 24)
LABEL_DIR = os.path.join("AUCoding", "AU_OCC")
_FILE = re.compile(r"^([A-Za-z]\d+)_(T\d+)\.csv$")


def convert(data_root: str, *, seed: int = 0, strict: bool = False, num_folds: int = 3,
            fold: int | None = None, aus: tuple[int, ...] = AUS,
            landmark_dir: str | None = None) -> Converted:
  """Reads every AU_OCC CSV into records split by subject-exclusive folds.

  Raises:
    DataFileError: the label folder is missing or empty.
    StrictSkipError: in strict mode, the first bad file or frame.
  """
  label_dir = os.path.join(data_root, LABEL_DIR)
  if not os.path.isdir(label_dir):
    raise DataFileError(f"{label_dir}: BP4D label folder not found; is --input the BP4D root?")
  names = sorted(n for n in os.listdir(label_dir) if n.lower().endswith(".csv"))
  if not names:
    raise DataFileError(f"{label_dir}: no AU occurrence CSV files")
  per_subject: dict[str, tuple[list[Record], SkipReport]] = {}
  unassigned = SkipReport(strict=strict)
  for name in names:
    path = os.path.join(label_dir, name)
    match = _FILE.match(name)
    if not match:
      unassigned.add("bad_label_file", path, "name is not <subject>_<task>.csv (e.g. F001_T1.csv)")
      continue
    subject, task = match.groups()
    records, report = per_subject.setdefault(subject, ([], SkipReport(strict=strict)))
    _read_sequence(data_root, path, subject, task, aus, seed, landmark_dir, records, report)
  out = assemble_subjects(per_subject, strict=strict, num_folds=num_folds, fold=fold, seed=seed)
  out.report("").merge(unassigned)
  return out


def _read_sequence(data_root: str, path: str, subject: str, task: str, aus: tuple[int, ...],
                   seed: int, landmark_dir: str | None, records: list[Record],
                   report: SkipReport) -> None:
  try:
    rows = list(csv.reader(io.StringIO("\n".join(read_lines(path)))))
  except DataFileError as e:
    report.add("bad_label_file", path, str(e))
    return
  if not rows:
    report.add("bad_label_file", path, "empty file")
    return
  header = [c.strip() for c in rows[0]]
  missing = [au for au in aus if str(au) not in header]
  if not header or header[0].lower() != "frame" or missing:
    report.add("bad_label_file", path, f"header must be 'Frame,<AU numbers>' with AUs {list(aus)}"
               f"; missing {missing or 'Frame'}")
    return
  columns = [header.index(str(au)) for au in aus]
  frames = index_frames(os.path.join(data_root, "images", subject, task))
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
    bad = [(au, v) for au, v in zip(aus, values) if v not in ("0", "1", "9")]
    if bad:
      report.add("bad_label", ref, f"AU values must be 0, 1 or 9; got {bad}")
      continue
    unknown = [au for au, v in zip(aus, values) if v == "9"]
    if unknown:
      report.add("unknown_au", ref, f"AU(s) {unknown} coded 9 (unknown)")
      continue
    if frame in seen:
      report.add("duplicate_id", ref, f"frame {frame} listed twice")
      continue
    seen.add(frame)
    if frame not in frames:
      report.add("missing_image", ref, f"no image for frame {frame} in images/{subject}/{task}/")
      continue
    try:
      record = make_record(
          record_id=f"{SOURCE}/{subject}/{task}/{frame}", source=SOURCE,
          image=f"images/{subject}/{task}/{frames[frame]}", task="au", seed=seed,
          aus=[au for au, v in zip(aus, values) if v == "1"], landmark_dir=landmark_dir, where=ref)
    except RecordError as e:
      report.add(e.reason, ref, e.message)
      continue
    records.append(record)
