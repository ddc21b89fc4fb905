"""Reads facial action units (AUs) from a free-text answer and from a ground-truth label.

Two protocols:

* `reference`: the published FABA-Bench rule. Predicted AUs are the digit strings of every
  `AU(\\d+)` match (case-sensitive, no space allowed, no negation handling); targets are the label
  string split on ", ". AUs are compared as strings, so "AU06" (-> "06") never equals AU 6 and a
  label piece such as "4 " or "1,2" never equals any AU. We return integers and keep the
  non-canonical strings aside (`ignored`), which compares exactly like the strings do.
* `strict`: the mention forms "AU12", "AU 12", "AU-12", "AU_12", "AU#12", "au12", "AU06" (-> 6) and
  "Action Unit 12" / "action units 12", in any case, not glued to a preceding letter or digit
  ("FAU12" is no mention); an AU mentioned only in negated clauses ("no AU4", "AU4 is not
  present", "absence of AU 9") is dropped. Labels: every integer in the label, separated by commas,
  semicolons, "+" or white space, optionally prefixed "AU".

Strict negation scope: the text is cut into sentences (white space after ".", "!" or "?", line
breaks, ";") and each sentence into clauses at the words but, while, whereas, although, though,
however and at commas outside parentheses, except a comma that separates two items of an AU list
("AU1 (Inner Brow Raiser), AU2 and AU4 are absent" stays one clause). A clause is negated when it
holds a whole negation word (`STRICT_AU_NEGATION_WORDS`) or an "n't" contraction. An AU mentioned
in at least one non-negated clause is predicted.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

PROTOCOLS = ("reference", "strict")

# The 12 AUs FABA-Bench evaluates, and the sets other benchmarks evaluate with the same scorer.
AU_PRESETS: dict[str, tuple[int, ...]] = {
    "faba": (1, 2, 4, 5, 6, 10, 12, 17, 24, 25, 26, 43),
    "disfa": (1, 2, 4, 6, 9, 12, 25, 26),
    "bp4d": (1, 2, 4, 6, 7, 10, 12, 14, 15, 17, 23, 24),
    "gft": (1, 2, 4, 6, 10, 12, 14, 15, 23, 24),
}
FABA_AUS = AU_PRESETS["faba"]

_REFERENCE_AU = re.compile(r"AU(\d+)")

_MENTION_HEAD = r"(?:au|action[ \t]+units?)[ \t]*[-_#]?[ \t]*"
_STRICT_AU = re.compile(r"(?<![a-z0-9])" + _MENTION_HEAD + r"([0-9]+)", re.IGNORECASE)
# A comma between two AU-list items: the text before ends with a mention (and maybe a
# parenthesised name), the text after starts with one (maybe after and/or/plus/as well as).
_LIST_ITEM_BEFORE = re.compile(
    r"(?<![a-z0-9])" + _MENTION_HEAD + r"[0-9]+\s*(?:\([^()]*\))?\s*$", re.IGNORECASE)
_LIST_ITEM_AFTER = re.compile(
    r"\s*(?:(?:and|or|plus|as[ \t]+well[ \t]+as)\s+)?" + _MENTION_HEAD + r"[0-9]", re.IGNORECASE)
_MAX_ITEM_CHARS = 200
_SENTENCE_SPLIT = re.compile(r"(?<!\w\.\w.)(?<![A-Z][a-z]\.)(?<=[.!?])\s+|\n|;")
_CONTRAST_SPLIT = re.compile(
    r"\b(?:but|while|whereas|although|though|however)\b", re.IGNORECASE)
STRICT_AU_NEGATION_WORDS = (
    "not", "no", "nothing", "none", "never", "cannot", "neither", "nor", "without", "absent",
    "absence", "lack", "lacks", "lacking", "inactive")
_NEGATION = re.compile(
    r"\b(?:" + "|".join(STRICT_AU_NEGATION_WORDS) + r")\b|\b\w+n['\u2019]t\b", re.IGNORECASE)
_LABEL_AU_PREFIX = re.compile(r"(?<![a-z])au[ \t]*[-_#]?[ \t]*(?=[0-9])", re.IGNORECASE)
_LABEL_SEPARATORS = re.compile(r"[\s,;+]+")


@dataclasses.dataclass(frozen=True)
class AuParse:
  """AUs read from one answer.

  Attributes:
    aus: the predicted AU numbers.
    n_mentions: how many AU mentions the protocol's pattern found (0 = nothing parsed).
    negated: AUs dropped because every mention of them is in a negated clause (strict only).
    ignored: reference matches that equal no AU number because of a leading zero ("06").
  """

  aus: frozenset[int]
  n_mentions: int
  negated: frozenset[int] = frozenset()
  ignored: tuple[str, ...] = ()


def _check_protocol(protocol: str) -> None:
  if protocol not in PROTOCOLS:
    raise ValueError(f"unknown protocol {protocol!r}; use one of {', '.join(PROTOCOLS)}")


def _canonical_number(text: str) -> int | None:
  """The integer a digit string denotes if it is written as Python writes that integer."""
  if text.isascii() and text.isdigit() and str(int(text)) == text:
    return int(text)
  return None


def _split_commas(sentence: str) -> list[str]:
  """Cuts at commas outside parentheses, except between two items of an AU list."""
  clauses, start, depth = [], 0, 0
  for pos, char in enumerate(sentence):
    if char == "(":
      depth += 1
    elif char == ")":
      depth = max(0, depth - 1)
    elif char == "," and depth == 0:
      # An AU item ("AU12 (Lip Corner Puller)") is short: looking back a bounded window keeps
      # long, comma-heavy answers linear.
      if (_LIST_ITEM_BEFORE.search(sentence, max(start, pos - _MAX_ITEM_CHARS), pos)
          and _LIST_ITEM_AFTER.match(sentence, pos + 1)):
        continue
      clauses.append(sentence[start:pos])
      start = pos + 1
  clauses.append(sentence[start:])
  return clauses


def strict_clauses(text: str) -> list[str]:
  """The clauses the strict protocol judges for negation, in order."""
  clauses = []
  for sentence in _SENTENCE_SPLIT.split(text):
    for part in _CONTRAST_SPLIT.split(sentence):
      clauses.extend(c for c in _split_commas(part) if c.strip())
  return clauses


def parse_au_prediction(text: str, protocol: str = "reference") -> AuParse:
  """The AUs a generated answer predicts (see the module docstring for both protocols)."""
  _check_protocol(protocol)
  if not isinstance(text, str):
    raise TypeError(f"the prediction must be a string, got {type(text).__name__}")
  if protocol == "reference":
    matches = _REFERENCE_AU.findall(text)
    numbers = [_canonical_number(m) for m in matches]
    return AuParse(
        aus=frozenset(n for n in numbers if n is not None),
        n_mentions=len(matches),
        ignored=tuple(m for m, n in zip(matches, numbers) if n is None))
  asserted, denied, n_mentions = set(), set(), 0
  for clause in strict_clauses(text):
    found = [int(m) for m in _STRICT_AU.findall(clause)]
    n_mentions += len(found)
    (denied if _NEGATION.search(clause) else asserted).update(found)
  return AuParse(
      aus=frozenset(asserted), n_mentions=n_mentions, negated=frozenset(denied - asserted))


def parse_au_label(label: str | int | Sequence[str | int],
                   protocol: str = "reference") -> tuple[frozenset[int], tuple[str, ...]]:
  """The ground-truth AUs of a label, and the pieces that name no AU.

  Reference protocol: a string is split on ", " and each piece compared as a string, so only
  pieces written like "12" count; an int counts as its decimal string; a list's items are the
  pieces. Pieces that name no AU are returned (the empty label "" has none).
  Strict protocol: every integer, optionally prefixed "AU", separated by commas, semicolons, "+" or
  white space; any other token raises ValueError.
  """
  _check_protocol(protocol)
  if isinstance(label, bool):
    raise ValueError(f"AU label {label!r} must be a string like '1, 2, 4', an int or a list")
  if isinstance(label, int):
    pieces = [str(label)]
  elif isinstance(label, str):
    pieces = label.split(", ") if protocol == "reference" else [label]
  elif isinstance(label, (list, tuple)) and all(
      isinstance(p, (str, int)) and not isinstance(p, bool) for p in label):
    pieces = [str(p) for p in label]
  else:
    raise ValueError(f"AU label {label!r} must be a string like '1, 2, 4', an int or a list")
  if protocol == "reference":
    numbers = [_canonical_number(p) for p in pieces]
    return (frozenset(n for n in numbers if n is not None),
            tuple(p for p, n in zip(pieces, numbers) if n is None and p != ""))
  aus = set()
  for piece in pieces:
    for token in _LABEL_SEPARATORS.split(_LABEL_AU_PREFIX.sub("", piece).strip()):
      if not token:
        continue
      if not (token.isascii() and token.isdigit()):
        raise ValueError(
            f"AU label {label!r}: {token!r} is not an AU number; write labels like '1, 2, 4'")
      aus.add(int(token))
  return frozenset(aus), ()


def parse_au_list(spec: str) -> tuple[int, ...]:
  """An AU set from a preset name (faba, disfa, bp4d, gft) or a comma-separated list of numbers."""
  name = spec.strip().lower()
  if name in AU_PRESETS:
    return AU_PRESETS[name]
  aus = []
  for piece in spec.split(","):
    piece = piece.strip()
    if not (piece.isascii() and piece.isdigit()):
      raise ValueError(
          f"AU list {spec!r}: {piece!r} is not an AU number; give numbers like 1,2,4 or a preset "
          f"({', '.join(AU_PRESETS)})")
    aus.append(int(piece))
  if len(set(aus)) != len(aus):
    raise ValueError(f"AU list {spec!r} names an AU twice")
  return tuple(aus)
