"""Typed, validated records: one image + landmark prior + conversation, as in FABA-Instruct.

A `Record` is what every reader (FABA-Instruct JSON, the classic-dataset converters, the synthetic
generator) produces and what `emola-prepare` turns into training shards. `Record.from_json`
accepts one FABA-Instruct style object and checks everything EmoLA relies on:

* `id`, `source`, `image` are strings (`id` defaults to the image path without its extension,
  `source` to the first component of the id);
* `image` and `landmark` are relative paths that stay inside the data root (no absolute path,
  drive letter or `..` escaping it);
* `conversations` alternate human/gpt starting with human, contain at least one gpt turn, and
  the first human turn holds exactly one `<image>` placeholder and no other turn holds one (the
  model splices the visual + prior tokens in at that single place);
* `task` is "emotion", "au" or absent; `label` and `gpt4` are strings when present (an integer
  emotion label is kept as its decimal string here; the FABA reader maps it to a class name).

A violation raises `RecordError`, which names where the record came from (`where`), the record's
id when known, what is wrong, and carries a `reason` key of `skips.REASONS` so readers can count it.
"""

from __future__ import annotations

import dataclasses
import posixpath
import re
from typing import Any, Mapping

IMAGE_TOKEN = "<image>"
HUMAN = "human"
GPT = "gpt"
TASKS = ("emotion", "au")

_DRIVE = re.compile(r"^[A-Za-z]:")


class RecordError(ValueError):
  """An invalid record. `reason` is a key of `emola_jax.data.skips.REASONS`."""

  def __init__(self, reason: str, where: str, message: str):
    self.reason = reason
    self.where = where
    self.message = message
    super().__init__(f"{where}: {message}" if where else message)


class DataFileError(ValueError):
  """A whole annotation or label file is unusable (unreadable, not JSON, wrong structure)."""


def check_relative_path(path: Any, field: str, where: str = "") -> str:
  """Returns `path` normalised (posix) if it is a relative path inside the data root.

  Raises:
    RecordError: `malformed_record` if not a non-empty string, `path_escape` if absolute, a
      drive path, or one whose normalised form starts with `..`.
  """
  if not isinstance(path, str) or not path.strip():
    raise RecordError("malformed_record", where,
                      f"field '{field}' must be a non-empty path string, got {path!r}")
  if "\x00" in path:
    raise RecordError("malformed_record", where, f"field '{field}' contains a NUL byte")
  # Backslashes are treated as separators for the check so "..\\x" cannot slip through.
  as_posix = path.replace("\\", "/")
  if as_posix.startswith("/") or _DRIVE.match(as_posix):
    raise RecordError("path_escape", where,
                      f"field '{field}' is an absolute path ({path!r}); paths must be relative "
                      "to the data root (--input)")
  norm = posixpath.normpath(as_posix)
  if norm == ".." or norm.startswith("../") or norm == ".":
    raise RecordError("path_escape", where,
                      f"field '{field}' ({path!r}) leaves the data root; paths must stay inside "
                      "the data root (--input)")
  return norm


@dataclasses.dataclass(frozen=True)
class Turn:
  """One conversation turn: `role` is "human" or "gpt"."""

  role: str
  value: str

  def to_json(self) -> dict[str, str]:
    return {"from": self.role, "value": self.value}


def _parse_conversations(raw: Any, where: str) -> tuple[Turn, ...]:
  if raw is None:
    raise RecordError("no_gpt_turn", where,
                      "record has no 'conversations' (and no 'gpt4' text to build one from)")
  if not isinstance(raw, list):
    raise RecordError("malformed_record", where,
                      f"'conversations' must be a list, got {type(raw).__name__}")
  turns = []
  for i, turn in enumerate(raw):
    if not isinstance(turn, Mapping):
      raise RecordError("bad_conversation", where, f"turn {i} is not an object: {turn!r:.80}")
    role, value = turn.get("from"), turn.get("value")
    if role not in (HUMAN, GPT):
      raise RecordError("bad_conversation", where,
                        f"turn {i} has role {role!r}; expected 'human' or 'gpt'")
    if not isinstance(value, str):
      raise RecordError("bad_conversation", where,
                        f"turn {i} value must be a string, got {type(value).__name__}")
    turns.append(Turn(role, value))
  if not any(t.role == GPT for t in turns):
    raise RecordError("no_gpt_turn", where, "conversation has no gpt turn to learn from")
  for i, turn in enumerate(turns):
    expected = HUMAN if i % 2 == 0 else GPT
    if turn.role != expected:
      raise RecordError("bad_conversation", where,
                        f"turn {i} is '{turn.role}' but turns must alternate human/gpt starting "
                        "with human")
  n_first = turns[0].value.count(IMAGE_TOKEN)
  n_total = sum(t.value.count(IMAGE_TOKEN) for t in turns)
  if n_first != 1 or n_total != 1:
    raise RecordError("image_token", where,
                      f"the first human turn holds {n_first} '{IMAGE_TOKEN}' and the whole "
                      f"conversation {n_total}; EmoLA needs exactly one, in the first human turn")
  return tuple(turns)


def _optional_str(obj: Mapping[str, Any], key: str, where: str) -> str | None:
  value = obj.get(key)
  if value is None:
    return None
  if isinstance(value, bool) or not isinstance(value, (str, int)):
    raise RecordError("malformed_record", where,
                      f"field '{key}' must be a string, got {type(value).__name__}")
  return str(value)


@dataclasses.dataclass(frozen=True)
class Record:
  """One training/evaluation sample. Paths are relative to the data root."""

  id: str
  source: str
  image: str
  landmark: str | None
  conversations: tuple[Turn, ...]
  task: str | None = None
  label: str | None = None
  gpt4: str | None = None

  @classmethod
  def from_json(cls, obj: Any, where: str = "", task: str | None = None) -> "Record":
    """Validates one FABA-Instruct style object.

    Args:
      obj: the decoded JSON object.
      where: where it came from (file and record index), used in error messages.
      task: the task to set when the object has no 'task' field.

    Raises:
      RecordError: naming `where`, the id and the problem.
    """
    if not isinstance(obj, Mapping):
      raise RecordError("malformed_record", where,
                        f"record must be a JSON object, got {type(obj).__name__}")
    raw_id = obj.get("id")
    if raw_id is not None:
      if isinstance(raw_id, bool) or not isinstance(raw_id, (str, int)) or str(raw_id) == "":
        raise RecordError("malformed_record", where, f"field 'id' is invalid: {raw_id!r:.80}")
      where = f"{where} (id={raw_id})" if where else f"id={raw_id}"
    image = check_relative_path(obj.get("image"), "image", where)
    rec_id = str(raw_id) if raw_id is not None else posixpath.splitext(image)[0]
    landmark = obj.get("landmark")
    if landmark is not None:
      landmark = check_relative_path(landmark, "landmark", where)
    source = obj.get("source")
    if source is None:
      source = rec_id.split("/", 1)[0] if "/" in rec_id else ""
    elif not isinstance(source, str):
      raise RecordError("malformed_record", where,
                        f"field 'source' must be a string, got {type(source).__name__}")
    rec_task = obj.get("task", task)
    if rec_task is not None and rec_task not in TASKS:
      raise RecordError("malformed_record", where,
                        f"field 'task' is {rec_task!r}; expected one of {TASKS}")
    conversations = _parse_conversations(obj.get("conversations"), where)
    return cls(id=rec_id, source=source, image=image, landmark=landmark,
               conversations=conversations, task=rec_task,
               label=_optional_str(obj, "label", where), gpt4=_optional_str(obj, "gpt4", where))

  def to_json(self) -> dict[str, Any]:
    """The FABA-Instruct style object (inverse of `from_json`; None fields are left out)."""
    out: dict[str, Any] = {"source": self.source, "id": self.id, "image": self.image}
    if self.landmark is not None:
      out["landmark"] = self.landmark
    out["conversations"] = [t.to_json() for t in self.conversations]
    for key in ("task", "label", "gpt4"):
      value = getattr(self, key)
      if value is not None:
        out[key] = value
    return out

  @property
  def answer(self) -> str:
    """Text of the first gpt turn (the reference description)."""
    return next(t.value for t in self.conversations if t.role == GPT)
