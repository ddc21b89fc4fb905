"""DISFA AU intensities to FABA-style AU occurrence records, in subject-exclusive folds.

Layout, as released (the data root holds both folders):

    ActionUnit_Labels/SN001/SN001_au1.txt    # one file per subject and AU; lines "frame,intensity"
    ...                                      # (intensity 0..5); AUs 1,2,4,5,6,9,12,15,17,20,25,26
    images/SN001/<frame>.jpg                 # the frame's number, any zero padding

An AU occurs when its intensity is >= 2 (the usual DISFA protocol). By default the 8 evaluated
AUs 1, 2, 4, 6, 9, 12, 25, 26 are read (`aus` selects others among the 12 labelled). A frame
must be listed in every selected AU file (else `missing_label`); an intensity outside 0..5 or an
unparseable line is `bad_label`/`malformed_record`; a missing or unreadable AU file is
`bad_label_file` (the subject's frames are then lost, the file is named); a labelled frame
without an image is `missing_image`. Subjects are split into `num_folds` subject-exclusive
folds balanced by frame count. Record ids are `DISFA/<subject>/<frame>`.
"""

from __future__ import annotations

import os

from emola_jax.data.classic.common import (Converted, assemble_subjects, index_frames,
                                           make_record, read_lines)
from emola_jax.data.records import DataFileError, Record, RecordError
from emola_jax.data.skips import SkipReport

SOURCE = "DISFA"
LABELLED_AUS = (1, 2, 4, 5, 6, 9, 12, 15, 17, 20, 25, 26)
AUS = (1, 2, 4, 6, 9, 12, 25, 26)
OCCURRENCE_THRESHOLD = 2
LABEL_DIR = "ActionUnit_Labels"


def convert(data_root: str, *, seed: int = 0, strict: bool = False, num_folds: int = 3,
            fold: int | None = None, aus: tuple[int, ...] = AUS,
            landmark_dir: str | None = None) -> Converted:
  """Reads every subject's AU intensity files into records split by folds.

  Raises:
    DataFileError: the label folder is missing or has no subject folders.
    ValueError: `aus` names an AU DISFA does not label.
    StrictSkipError: in strict mode, the first bad file or frame.
  """
  unknown = sorted(set(aus) - set(LABELLED_AUS))
  if unknown:
    raise ValueError(f"DISFA labels AUs {list(LABELLED_AUS)}; {unknown} are not among them")
  label_dir = os.path.join(data_root, LABEL_DIR)
  if not os.path.isdir(label_dir):
    raise DataFileError(f"{label_dir}: DISFA label folder not found; is --input the DISFA root?")
  subjects = sorted(n for n in os.listdir(label_dir) if os.path.isdir(os.path.join(label_dir, n)))
  if not subjects:
    raise DataFileError(f"{label_dir}: no subject folders (SN001, ...)")
  per_subject = {}
  for subject in subjects:
    report = SkipReport(strict=strict)
    per_subject[subject] = (_read_subject(data_root, subject, aus, seed, landmark_dir, report),
                            report)
  return assemble_subjects(per_subject, strict=strict, num_folds=num_folds, fold=fold, seed=seed)


def _read_au_file(path: str, report: SkipReport) -> dict[int, int] | None:
  """frame -> intensity, or None when the file is unusable (counted)."""
  try:
    lines = read_lines(path)
  except DataFileError as e:
    report.add("bad_label_file", path, str(e))
    return None
  out: dict[int, int] = {}
  for line_no, line in enumerate(lines, start=1):
    if not line.strip():
      continue
    ref = f"{path} line {line_no}"
    parts = [p.strip() for p in line.split(",")]
    if len(parts) != 2 or not parts[0].isdigit() or not parts[1].lstrip("-").isdigit():
      report.add("malformed_record", ref, f"expected 'frame,intensity', got {line!r}")
      continue
    frame, value = int(parts[0]), int(parts[1])
    if not 0 <= value <= 5:
      report.add("bad_label", ref, f"intensity {value} is outside 0..5")
      continue
    if frame in out:
      report.add("duplicate_id", ref, f"frame {frame} listed twice")
      continue
    out[frame] = value
  return out


def _read_subject(data_root: str, subject: str, aus: tuple[int, ...], seed: int,
                  landmark_dir: str | None, report: SkipReport) -> list[Record]:
  intensities = {}
  for au in aus:
    path = os.path.join(data_root, LABEL_DIR, subject, f"{subject}_au{au}.txt")
    table = _read_au_file(path, report)
    if table is None:
      return []
    intensities[au] = table
  frames = index_frames(os.path.join(data_root, "images", subject))
  records = []
  for frame in sorted(set().union(*(t.keys() for t in intensities.values()))):
    ref = f"{os.path.join(data_root, LABEL_DIR, subject)} frame {frame}"
    lacking = [au for au in aus if frame not in intensities[au]]
    if lacking:
      report.add("missing_label", ref, f"frame {frame} is missing from the files of AU(s) "
                 f"{lacking}")
      continue
    if frame not in frames:
      report.add("missing_image", ref, f"no image for frame {frame} in images/{subject}/")
      continue
    try:
      record = make_record(
          record_id=f"{SOURCE}/{subject}/{frame}", source=SOURCE,
          image=f"images/{subject}/{frames[frame]}", task="au", seed=seed,
          aus=[au for au in aus if intensities[au][frame] >= OCCURRENCE_THRESHOLD],
          landmark_dir=landmark_dir, where=ref)
    except RecordError as e:
      report.add(e.reason, ref, e.message)
      continue
    records.append(record)
  return records
