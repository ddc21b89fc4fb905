"""RAF-DB (basic, single-label subset) to FABA-style emotion records.

Layout, as released (the data root is the `basic/` folder):

    EmoLabel/list_patition_label.txt   # sic; one line per image: "train_00001.jpg 5"
    Image/aligned/train_00001_aligned.jpg
    Image/original/train_00001.jpg

Labels 1..7 = Surprise, Fear, Disgust, Happiness, Sadness, Anger, Neutral (RAF-DB's order), mapped
to the FABA class names. The split is the file name's prefix (`train_` -> "train", `test_` ->
"test"; 12,271 / 3,068 images). `aligned=True` (default) uses the aligned 100x100 crops, else the
original photos. Record ids are `RAF-DB/<file stem>`.

Skipped and counted: unparseable lines (`malformed_record`), a label outside 1..7 (`bad_label`),
a file name listed twice (`duplicate_id`); missing or corrupt images are found by emola-prepare.
"""

from __future__ import annotations

import os

from emola_jax.data.classic.common import Converted, make_record, read_lines
from emola_jax.data.records import RecordError

SOURCE = "RAF-DB"
LABEL_FILE = os.path.join("EmoLabel", "list_patition_label.txt")
# RAF-DB label k (1-based) -> FABA class name.
RAF_CLASSES = ("Surprise", "Fear", "Disgust", "Happiness", "Sadness", "Anger", "Neutral")
SPLIT_PREFIXES = {"train": "train", "test": "test"}


def convert(data_root: str, *, seed: int = 0, strict: bool = False, aligned: bool = True,
            landmark_dir: str | None = None) -> Converted:
  """Reads RAF-DB basic's label file into records per split ("train", "test").

  Raises:
    DataFileError: the label file is missing.
    StrictSkipError: in strict mode, the first bad line.
  """
  out = Converted(strict=strict)
  label_path = os.path.join(data_root, LABEL_FILE)
  seen: dict[str, int] = {}
  for line_no, line in enumerate(read_lines(label_path), start=1):
    if not line.strip():
      continue
    ref = f"{label_path} line {line_no}"
    parts = line.split()
    if len(parts) != 2:
      out.skip("", "malformed_record", ref, f"expected '<image> <label>', got {line!r}")
      continue
    name, raw_label = parts
    prefix = name.split("_", 1)[0]
    if prefix not in SPLIT_PREFIXES or "/" in name or "\\" in name:
      out.skip("", "malformed_record", ref,
               f"image name {name!r} does not start with 'train_' or 'test_'")
      continue
    split = SPLIT_PREFIXES[prefix]
    ref = f"{ref} ({name})"
    if not raw_label.isdigit() or not 1 <= int(raw_label) <= len(RAF_CLASSES):
      out.skip(split, "bad_label", ref, f"label {raw_label!r} is not in 1..7")
      continue
    if name in seen:
      out.skip(split, "duplicate_id", ref, f"{name} already listed on line {seen[name]}")
      continue
    seen[name] = line_no
    stem = os.path.splitext(name)[0]
    image = (f"Image/aligned/{stem}_aligned.jpg" if aligned else f"Image/original/{name}")
    try:
      record = make_record(record_id=f"{SOURCE}/{stem}", source=SOURCE, image=image,
                           task="emotion", seed=seed, emotion=RAF_CLASSES[int(raw_label) - 1],
                           landmark_dir=landmark_dir, where=ref)
    except RecordError as e:
      out.skip(split, e.reason, ref, e.message)
      continue
    out.add(split, record)
  return out
