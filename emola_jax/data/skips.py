"""Skip accounting: every input record the data pipeline does not keep is named and counted here.

Two kinds of reasons exist:

* **errors**: the input is broken (missing or corrupt image, bad landmark file, invalid
  conversation, duplicate id, ...). They are skipped and counted by default; with `strict=True`
  the first one raises `StrictSkipError` naming the file and the record, so nothing broken can
  slip into a training set unnoticed.
* **filters**: the input is fine but excluded by design (AffectNet's contempt or non-face classes
  in 7-class mode, BP4D frames whose AU is coded 9 = unknown). They are counted and reported but
  never raise, even under `strict`, because no fix to the data is expected.

A `SkipReport` keeps the count per reason and the first few record references, and renders the
table that `emola-prepare` prints and stores in each split's `meta.json`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

# reason -> (kind, human description). Kind "error" raises under strict mode, "filter" never does.
REASONS: dict[str, tuple[str, str]] = {
    "malformed_record": ("error", "record is not a valid object (missing/invalid field)"),
    "bad_conversation": ("error", "conversation roles/values are invalid"),
    "image_token": ("error", "first human turn lacks exactly one <image> (or <image> elsewhere)"),
    "no_gpt_turn": ("error", "record has no gpt answer"),
    "path_escape": ("error", "path is absolute or leaves the data root"),
    "missing_image": ("error", "image file does not exist"),
    "corrupt_image": ("error", "image file cannot be decoded"),
    "missing_landmark": ("error", "landmark .npy missing"),
    "bad_landmark": ("error", "landmark .npy unreadable, non-finite or of the wrong size"),
    "duplicate_id": ("error", "id already used earlier in the split"),
    "bad_label": ("error", "label value outside the dataset's label set"),
    "missing_label": ("error", "frame or image lacks a label"),
    "bad_label_file": ("error", "a whole label file is unusable"),
    "excluded_class": ("filter", "class excluded by the chosen class set"),
    "unknown_au": ("filter", "AU occurrence coded unknown (9) in the label file"),
    "unlisted_subject": ("filter", "subject in neither official split list"),
}

ERROR = "error"
FILTER = "filter"


class StrictSkipError(RuntimeError):
  """Raised in strict mode by the first error-kind skip."""

  def __init__(self, reason: str, ref: str, detail: str):
    self.reason = reason
    self.ref = ref
    self.detail = detail
    super().__init__(
        f"{ref}: {detail} [{reason}]. Fix or remove this record, or run without --strict to "
        "skip and count such records.")


@dataclasses.dataclass
class _Entry:
  count: int = 0
  examples: list[tuple[str, str]] = dataclasses.field(default_factory=list)


class SkipReport:
  """Counts skipped records per reason, keeping the first `max_examples` references of each."""

  def __init__(self, strict: bool = False, max_examples: int = 5):
    self.strict = strict
    self.max_examples = max_examples
    self._entries: dict[str, _Entry] = {}

  def add(self, reason: str, ref: str, detail: str = "") -> None:
    """Records one skipped item; raises `StrictSkipError` for error reasons when strict.

    Args:
      reason: a key of `REASONS`.
      ref: where the item is, e.g. "train.json record 12 (id=abc)" or a label file and frame.
      detail: what exactly is wrong, shown in errors and in the table's examples.
    """
    if reason not in REASONS:
      raise ValueError(f"unknown skip reason {reason!r}; known: {sorted(REASONS)}")
    if self.strict and REASONS[reason][0] == ERROR:
      raise StrictSkipError(reason, ref, detail or REASONS[reason][1])
    entry = self._entries.setdefault(reason, _Entry())
    entry.count += 1
    if len(entry.examples) < self.max_examples:
      entry.examples.append((ref, detail))

  def merge(self, other: "SkipReport") -> None:
    """Adds the counts and examples of `other` to this report (no strict check: already done)."""
    for reason, theirs in other._entries.items():
      entry = self._entries.setdefault(reason, _Entry())
      entry.count += theirs.count
      room = self.max_examples - len(entry.examples)
      entry.examples.extend(theirs.examples[:max(room, 0)])

  def count(self, reason: str | None = None) -> int:
    """Number of skips for `reason`, or of all skips when None."""
    if reason is None:
      return sum(e.count for e in self._entries.values())
    return self._entries[reason].count if reason in self._entries else 0

  def counts(self) -> dict[str, int]:
    return {r: e.count for r, e in sorted(self._entries.items())}

  def examples(self, reason: str) -> list[tuple[str, str]]:
    return list(self._entries[reason].examples) if reason in self._entries else []

  @property
  def num_errors(self) -> int:
    return sum(e.count for r, e in self._entries.items() if REASONS[r][0] == ERROR)

  def as_dict(self) -> dict[str, Any]:
    """JSON-ready form: reason -> {kind, count, examples: [{ref, detail}]}."""
    return {
        r: {"kind": REASONS[r][0], "count": e.count,
            "examples": [{"ref": ref, "detail": d} for ref, d in e.examples]}
        for r, e in sorted(self._entries.items())
    }

  def format_table(self, title: str = "skipped") -> str:
    """A plain-text table: reason, kind, count and the first references."""
    if not self._entries:
      return f"{title}: none"
    width = max(len(r) for r in self._entries)
    lines = [f"{title}: {self.count()} ({self.num_errors} bad input, "
             f"{self.count() - self.num_errors} filtered by design)"]
    for reason, entry in sorted(self._entries.items()):
      lines.append(f"  {reason:<{width}}  {REASONS[reason][0]:<6}  {entry.count:>8}")
      for ref, detail in entry.examples:
        lines.append(f"      - {ref}" + (f": {detail}" if detail else ""))
      if entry.count > len(entry.examples):
        lines.append(f"      ... and {entry.count - len(entry.examples)} more")
    return "\n".join(lines)
