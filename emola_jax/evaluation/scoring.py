"""FABA-Bench scores (S_re, S_ge, S_rege) of a set of generated answers.

A record is {"prediction": str, "label": ..., "reference": str}: the generated text, the
ground truth (emotion: class name or index; AU: a string like "1, 2, 4") and the GPT-4V reference
description. Extra keys are allowed and ignored.

* S_ge = mean ROUGE-L F1 (x100) of prediction against reference over the samples that can be
  scored. Reference protocol: a sample the `rouge` package raises on is skipped (empty text, or
  a sentence pair too long for its recursion). Strict protocol: an empty prediction scores 0, no
  recursion limit applies, only a sample with an empty reference is skipped.
* Emotion S_re = accuracy (x100) over 7 classes. AU S_re = mean per-AU F1 (x100).
* S_rege = S_re + S_ge.

All percentages are on a 0-100 scale (S_rege 0-200); a score that has no sample to average is
None (JSON null), never a made-up number.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from emola_jax.evaluation import au_parse
from emola_jax.evaluation import emotion_parse
from emola_jax.evaluation import rouge_l

PROTOCOLS = ("reference", "strict")
REQUIRED_KEYS = ("prediction", "label", "reference")


class RecordError(ValueError):
  """A record (or a predictions file) that cannot be scored; the message names where it is."""


@dataclasses.dataclass(frozen=True)
class Record:
  """One sample to score; `where` names it in messages ("preds.jsonl:12" or "record 12")."""

  prediction: str
  label: Any
  reference: str
  where: str


def _check_protocol(protocol: str) -> None:
  if protocol not in PROTOCOLS:
    raise ValueError(f"unknown protocol {protocol!r}; use one of {', '.join(PROTOCOLS)}")


def make_record(item: Mapping[str, Any], where: str) -> Record:
  """Validates one mapping and turns it into a Record."""
  if not isinstance(item, Mapping):
    raise RecordError(f"{where}: a record must be a JSON object, got {type(item).__name__}")
  missing = [key for key in REQUIRED_KEYS if key not in item]
  if missing:
    raise RecordError(
        f"{where}: the record has no {', '.join(repr(k) for k in missing)} key (it has "
        f"{sorted(item)}); every record needs {', '.join(REQUIRED_KEYS)}")
  for key in ("prediction", "reference"):
    if not isinstance(item[key], str):
      raise RecordError(
          f"{where}: {key!r} must be a string, got {type(item[key]).__name__} {item[key]!r}")
  return Record(item["prediction"], item["label"], item["reference"], where)


def to_records(items: Iterable[Mapping[str, Any] | Record], source: str = "record") -> list[Record]:
  """Validates mappings (named "record 1", "record 2", ...) and passes Records through."""
  records = []
  for number, item in enumerate(items, start=1):
    records.append(item if isinstance(item, Record) else make_record(item, f"{source} {number}"))
  if not records:
    raise RecordError("there are no records to score")
  return records


def load_records(path: str) -> list[Record]:
  """Reads a JSONL predictions file (one JSON object a line; blank lines are skipped)."""
  records = []
  with open(path, encoding="utf-8") as stream:
    for number, line in enumerate(stream, start=1):
      if not line.strip():
        continue
      where = f"{path}:{number}"
      try:
        item = json.loads(line)
      except json.JSONDecodeError as error:
        raise RecordError(
            f"{where}: not valid JSON ({error.msg} at column {error.colno}); each line must be "
            "one JSON object with prediction, label and reference") from None
      records.append(make_record(item, where))
  if not records:
    raise RecordError(f"{path}: the file holds no records")
  return records


def _percent(numerator: float, denominator: float) -> float | None:
  return 100.0 * numerator / denominator if denominator else None


def _rouge_summary(records: Sequence[Record], protocol: str) -> dict[str, Any]:
  """S_ge and what was skipped, following the protocol's skip rule."""
  total, scored = 0.0, 0
  skipped = {"empty_prediction": 0, "empty_reference": 0, "recursion_limit": 0}
  skipped_where: list[str] = []
  limit = rouge_l.REFERENCE_MAX_RECURSION_DEPTH if protocol == "reference" else None
  for record in records:
    try:
      total += rouge_l.rouge_l_f1(record.prediction, record.reference, max_recursion_depth=limit)
      scored += 1
    except rouge_l.EmptyTextError as error:
      if error.role == "hypothesis" and protocol == "strict":
        scored += 1  # an empty answer shares nothing with the reference: ROUGE-L 0
        continue
      skipped["empty_prediction" if error.role == "hypothesis" else "empty_reference"] += 1
      skipped_where.append(record.where)
    except rouge_l.RecursionLimitError:
      skipped["recursion_limit"] += 1
      skipped_where.append(record.where)
  return {
      "S_ge": _percent(total, scored),
      "n_rouge_scored": scored,
      "n_rouge_skipped": len(skipped_where),
      "rouge_skipped": skipped,
      "rouge_skipped_records": skipped_where,
  }


def _headline(task: str, protocol: str, s_re: float | None,
              records: Sequence[Record]) -> dict[str, Any]:
  """task, protocol, S_re, S_ge, S_rege first, then the ROUGE counts."""
  rouge = _rouge_summary(records, protocol)
  s_ge = rouge.pop("S_ge")
  s_rege = None if s_re is None or s_ge is None else s_re + s_ge
  return {"task": task, "protocol": protocol, "S_re": s_re, "S_ge": s_ge, "S_rege": s_rege,
          **rouge}


def score_emotion(records: Iterable[Mapping[str, Any] | Record],
                  protocol: str = "reference") -> dict[str, Any]:
  """Emotion S_re (7-class accuracy), S_ge and S_rege, with per-class results.

  The confusion matrix has one row per true class and one column per predicted class (index
  order of `emotion_parse.EMOTION_CLASSES`); strict-protocol answers with no class are counted in
  `unclassified` (per true class) and are wrong.
  """
  _check_protocol(protocol)
  records = to_records(records)
  n_classes = len(emotion_parse.EMOTION_CLASSES)
  confusion = [[0] * n_classes for _ in range(n_classes)]
  unclassified = [0] * n_classes
  no_keyword, crash_fallbacks = 0, 0
  for record in records:
    try:
      truth = emotion_parse.parse_emotion_label(record.label)
    except ValueError as error:
      raise RecordError(f"{record.where}: {error}") from None
    parsed = emotion_parse.parse_emotion(record.prediction, protocol)
    no_keyword += parsed.rule == "no_keyword"
    crash_fallbacks += parsed.reference_would_crash
    if parsed.label is None:
      unclassified[truth] += 1
    else:
      confusion[truth][parsed.label] += 1
  correct = sum(confusion[i][i] for i in range(n_classes))
  per_class_n = [sum(row) + unclassified[i] for i, row in enumerate(confusion)]
  return {
      **_headline("emotion", protocol, _percent(correct, len(records)), records),
      "n": len(records),
      "n_correct": correct,
      # Answers without any keyword: the reference protocol calls them Happiness, strict none.
      "n_parse_failures": no_keyword,
      # Answers on which the published scorer crashes (our first-sentence fallback was used).
      "n_reference_crash_fallbacks": crash_fallbacks,
      "classes": list(emotion_parse.EMOTION_CLASSES),
      "per_class_n": dict(zip(emotion_parse.EMOTION_CLASSES, per_class_n)),
      "per_class_accuracy": {
          name: _percent(confusion[i][i], per_class_n[i])
          for i, name in enumerate(emotion_parse.EMOTION_CLASSES)},
      "confusion": confusion,
      "unclassified": unclassified,
  }


def _f1(tp: int, fp: int, fn: int) -> float:
  return 2.0 * tp / (2 * tp + fp + fn) if tp else 0.0


def score_au(records: Iterable[Mapping[str, Any] | Record], protocol: str = "reference",
             aus: Sequence[int] = au_parse.FABA_AUS) -> dict[str, Any]:
  """AU S_re (mean per-AU F1), S_ge and S_rege, with per-AU results.

  Per AU, F1 = 2TP / (2TP + FP + FN) from the 2x2 confusion matrix over samples, 0 without true
  positives. AUs left out of the mean: reference protocol, an AU for which one single value
  (always present or always absent) occurs across all targets and predictions; strict protocol,
  only an AU that is never present and never predicted (its F1 is undefined).
  """
  _check_protocol(protocol)
  records = to_records(records)
  aus = tuple(aus)
  if (not aus or len(set(aus)) != len(aus)
      or not all(isinstance(au, int) and not isinstance(au, bool) for au in aus)):
    raise ValueError(
        f"the evaluated AU list {aus} must be non-empty integers without repeats; "
        "au_parse.parse_au_list reads '1,2,4' or a preset name")
  counts = {au: {"tp": 0, "fp": 0, "fn": 0, "tn": 0} for au in aus}
  no_mention, ignored_predictions, negated = 0, 0, 0
  label_pieces_ignored: list[str] = []
  for record in records:
    try:
      targets, ignored_pieces = au_parse.parse_au_label(record.label, protocol)
    except ValueError as error:
      raise RecordError(f"{record.where}: {error}") from None
    if ignored_pieces:
      label_pieces_ignored.append(f"{record.where}: {list(ignored_pieces)}")
    parsed = au_parse.parse_au_prediction(record.prediction, protocol)
    no_mention += parsed.n_mentions == 0
    ignored_predictions += len(parsed.ignored)
    negated += len(parsed.negated)
    for au in aus:
      truth, guess = au in targets, au in parsed.aus
      key = ("tp" if guess else "fn") if truth else ("fp" if guess else "tn")
      counts[au][key] += 1
  per_au_f1, left_out = {}, []
  for au in aus:
    c = counts[au]
    if protocol == "reference":
      # One value in targets and predictions together: the published scorer's confusion matrix is
      # 1x1 and the AU is not averaged (even when every sample is a true positive).
      single_class = (c["tp"] == len(records)) or (c["tn"] == len(records))
    else:
      single_class = c["tp"] + c["fp"] + c["fn"] == 0
    if single_class:
      left_out.append(au)
      per_au_f1[str(au)] = None
    else:
      per_au_f1[str(au)] = 100.0 * _f1(c["tp"], c["fp"], c["fn"])
  averaged = [f for f in per_au_f1.values() if f is not None]
  s_re = sum(averaged) / len(averaged) if averaged else None
  return {
      **_headline("au", protocol, s_re, records),
      "n": len(records),
      "aus": list(aus),
      "per_au_f1": per_au_f1,
      "left_out_aus": left_out,
      "per_au_counts": {str(au): counts[au] for au in aus},
      # Answers in which the protocol's pattern finds no AU mention at all.
      "n_parse_failures": no_mention,
      "n_ignored_prediction_matches": ignored_predictions,  # reference: "AU06"-style matches
      "n_negated_mentions_dropped": negated,  # strict: AUs dropped as negated
      "label_pieces_ignored": label_pieces_ignored,  # reference: label pieces naming no AU
  }
