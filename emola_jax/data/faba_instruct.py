"""Reader for the FABA-Instruct annotation files exactly as released.

Each file is one JSON list per task and split. Training records carry
`source, id, image, landmark, conversations`; evaluation records also carry `label` (emotion: a
class name such as "Happiness" or its index in FABA order; AU: a string such as "1, 2, 4") and
`gpt4` (the reference description), and may lack `conversations`: those get the task's fixed
evaluation prompt as the human turn and the `gpt4` text as the answer. Paths are relative to a
data root (the folder holding `FABAInstruct/`).

What is an error and what is a skip:

* the file cannot be read, is not valid JSON, or is not a JSON list: `DataFileError` (the whole
  file is unusable; its line and column are named);
* one bad record inside the list (not an object, invalid fields, bad conversation, no gpt turn,
  path escaping the data root, duplicate id, unknown emotion label, missing image or landmark
  file): skipped and counted in the returned `SkipReport`, or `StrictSkipError` when strict.

Emotion labels given as an index (0-6, or its decimal string) are mapped to the class name in
FABA order, so every downstream consumer sees the same form.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any

from emola_jax.data import facs
from emola_jax.data import instructions
from emola_jax.data.records import IMAGE_TOKEN, TASKS, DataFileError, Record, RecordError
from emola_jax.data.skips import SkipReport


_AU_LABEL = re.compile(r"^\s*(\d+\s*(,\s*\d+\s*)*)?$")


def infer_task(json_path: str | os.PathLike[str]) -> str:
  """"emotion" or "au" from the file name (e.g. `emotion_train.json`, `FABA_AU_test.json`).

  Raises:
    DataFileError: when the name names neither or both; pass the task explicitly then.
  """
  stem = os.path.splitext(os.path.basename(os.fspath(json_path)))[0].lower()
  words = set(re.split(r"[^a-z]+", stem))
  found = set()
  if words & {"emotion", "emotions", "emo", "expression", "fer"}:
    found.add("emotion")
  if words & {"au", "aus", "actionunit", "actionunits"}:
    found.add("au")
  if len(found) != 1:
    raise DataFileError(
        f"{json_path}: cannot tell the task from the file name (found {sorted(found) or 'none'});"
        " pass it explicitly (--task=emotion or --task=au)")
  return found.pop()


def load_json_list(json_path: str | os.PathLike[str]) -> list[Any]:
  """Loads a JSON file whose top level must be a list.

  Raises:
    DataFileError: naming the file (and line/column for a syntax error).
  """
  try:
    with open(json_path, "rb") as f:
      data = json.loads(f.read().decode("utf-8"))
  except FileNotFoundError as e:
    raise DataFileError(f"{json_path}: annotation file not found; check --input/--splits") from e
  except UnicodeDecodeError as e:
    raise DataFileError(f"{json_path}: not UTF-8 text ({e}); is this the right file?") from e
  except json.JSONDecodeError as e:
    raise DataFileError(
        f"{json_path}: malformed JSON at line {e.lineno}, column {e.colno}: {e.msg}. The whole "
        "file is unusable; re-download or repair it.") from e
  if not isinstance(data, list):
    raise DataFileError(
        f"{json_path}: top level is a JSON {type(data).__name__}, expected a list of records")
  return data


def normalise_emotion_label(label: str) -> str:
  """Maps an index ("0".."6") or a class name in any case to the FABA class name.

  Raises:
    ValueError: for anything else.
  """
  classes = facs.EMOTIONS
  text = label.strip()
  if text.isdigit():
    index = int(text)
    if index < len(classes):
      return classes[index]
    raise ValueError(f"emotion label index {index} is outside 0..{len(classes) - 1}")
  by_lower = {c.lower(): c for c in classes}
  if text.lower() in by_lower:
    return by_lower[text.lower()]
  raise ValueError(f"emotion label {label!r} is not one of {list(classes)} or their indices")


def _with_eval_conversation(obj: dict[str, Any], task: str) -> dict[str, Any]:
  """Adds the fixed evaluation conversation to an evaluation record that has none."""
  gpt4 = obj.get("gpt4")
  if obj.get("conversations") is not None or not isinstance(gpt4, str):
    return obj
  prompt = instructions.EVAL_PROMPTS[task]
  return {**obj, "conversations": [{"from": "human", "value": f"{IMAGE_TOKEN}\n{prompt}"},
                                   {"from": "gpt", "value": gpt4}]}


def _check_label(record: Record, task: str, where: str) -> Record:
  if record.label is None:
    return record
  if task == "emotion":
    try:
      label = normalise_emotion_label(record.label)
    except ValueError as e:
      raise RecordError("bad_label", where, str(e)) from e
    return record if label == record.label else dataclasses.replace(record, label=label)
  if not _AU_LABEL.match(record.label):
    raise RecordError("bad_label", where,
                      f"AU label {record.label!r} is not a comma-separated list of AU numbers")
  return record


def read_split(json_path: str | os.PathLike[str], data_root: str | os.PathLike[str],
               task: str | None = None, *, strict: bool = False, check_files: bool = True,
               check_landmarks: bool = True) -> tuple[list[Record], SkipReport]:
  """Reads and validates one FABA-Instruct JSON file.

  Args:
    json_path: the annotation file.
    data_root: the folder the records' relative paths start from.
    task: "emotion" or "au"; inferred from the file name when None.
    strict: raise `StrictSkipError` on the first bad record instead of skipping it.
    check_files: also skip records whose image (and, with `check_landmarks`, landmark) file
      does not exist.
    check_landmarks: see `check_files`; False when the landmark priors will not be used.

  Returns:
    The valid records in file order and the report of the skipped ones.

  Raises:
    DataFileError: the file itself is unusable.
    StrictSkipError: in strict mode, the first bad record.
  """
  if task is None:
    task = infer_task(json_path)
  if task not in TASKS:
    raise ValueError(f"task must be one of {TASKS}, got {task!r}")
  data = load_json_list(json_path)
  report = SkipReport(strict=strict)
  records: list[Record] = []
  seen: dict[str, int] = {}
  name = os.fspath(json_path)
  for index, obj in enumerate(data):
    where = f"{name} record {index}"
    try:
      if isinstance(obj, dict):
        obj = _with_eval_conversation(obj, task)
        if obj.get("task") is None:
          obj = {**obj, "task": task}
      record = Record.from_json(obj, where=where)
      where = f"{where} (id={record.id})"
      if record.task != task:
        raise RecordError("malformed_record", where,
                          f"record task {record.task!r} differs from the file's task {task!r}")
      record = _check_label(record, task, where)
      if record.id in seen:
        raise RecordError("duplicate_id", where,
                          f"id {record.id!r} already used by record {seen[record.id]}")
      if check_files:
        _check_files(record, data_root, where, check_landmarks)
    except RecordError as e:
      report.add(e.reason, e.where or where, e.message)
      continue
    seen[record.id] = index
    records.append(record)
  return records, report


def _check_files(record: Record, data_root: str | os.PathLike[str], where: str,
                 check_landmarks: bool) -> None:
  image = os.path.join(data_root, record.image)
  if not os.path.isfile(image):
    raise RecordError("missing_image", where, f"image {record.image!r} not found under "
                      f"{os.fspath(data_root)!r}")
  if (check_landmarks and record.landmark is not None
      and not os.path.isfile(os.path.join(data_root, record.landmark))):
    raise RecordError("missing_landmark", where, f"landmark {record.landmark!r} not found under "
                      f"{os.fspath(data_root)!r}")
