"""Reads one of FABA-Bench's 7 emotion classes from a free-text answer.

Two protocols:

* `reference`: the published FABA-Bench rule, defects included, so our numbers are comparable
  with the paper's. Where the published scorer crashes (the first ".", "!" or "?" comes after a
  line break, or there is none) we do not: the first sentence then ends at the first line break.
  On every other text the answer is the published scorer's.
* `strict`: the same keyword rule with the known defects fixed (see `parse_emotion` and
  docs/scoring.md): whole-word negation, case folding with typographic apostrophes normalised,
  sentences that also end at "!" and line breaks, and no class (a parse failure, counted wrong)
  instead of a silent "Happiness" when nothing is found.

Class indices: Happiness 0, Sadness 1, Surprise 2, Anger 3, Neutral 4, Disgust 5, Fear 6.
"""

from __future__ import annotations

import dataclasses
import re

PROTOCOLS = ("reference", "strict")

EMOTION_CLASSES = ("Happiness", "Sadness", "Surprise", "Anger", "Neutral", "Disgust", "Fear")

# Keywords per class index (exact, lower-case words). A word may belong to two classes
# ("curiosity", "discomfort", "displeased"): the class order then decides in the first sentence,
# and it counts for both classes in the rest of the text.
KEYWORDS: tuple[frozenset[str], ...] = (
    frozenset((  # Happiness
        "happiness", "happy", "smiling", "smile", "pleasant", "content", "contentment", "relaxed",
        "relaxation", "cheerful", "joy", "amusement", "amused", "positivity", "positive",
        "lightheartedness", "joyful", "friendly", "warmth", "bright")),
    frozenset((  # Sadness
        "sadness", "crying", "distress", "concern", "discomfort", "anguish", "somber")),
    frozenset((  # Surprise
        "surprise", "surprised", "startled", "puzzled", "astonishment", "disbelief", "wonder",
        "curiosity", "curious", "confusion", "bewilderment", "skepticism", "excitement",
        "uncertainty")),
    frozenset((  # Anger
        "anger", "mad", "irate", "outraged", "agitation", "irritated", "enraged", "annoyed",
        "incensed", "serious", "frustration", "displeased", "stern")),
    frozenset((  # Neutral
        "neutral", "neutrality", "calm", "contemplative", "concerned", "thoughtful", "focused",
        "solemn", "mild")),
    frozenset((  # Disgust
        "disgust", "distaste", "disgusted", "discomfort", "displeasure", "displeased",
        "disapproval", "disdain", "contempt")),
    frozenset((  # Fear
        "fear", "shock", "anxiety", "apprehension", "tension", "panic", "alertness", "focus",
        "worry", "alarm", "curiosity", "contemplation")),
)

# --- reference protocol -------------------------------------------------------------------------

# A sentence ends at white space preceded by "." or "?" (not "!"), except after "x.y." style
# abbreviations and "Mr."-style titles.
_REFERENCE_SENTENCE_SPLIT = re.compile(r"(?<!\w\.\w.)(?<![A-Z][a-z]\.)(?<=\.|\?)\s")
# Plain substrings of the lower-cased sentence: "no" also hits "nose", "know", "normal", ...
_REFERENCE_NEGATIONS = (
    "not", "no", "isn't ", "nothing", "cannot", "won't", "shouldn't", "neither", "nor")
# "." does not match a line break: this is why the published scorer crashes on some texts.
_REFERENCE_FIRST_SENTENCE = re.compile(r"^(.*?)[.!?]")
_FALLBACK_FIRST_SENTENCE_END = re.compile(r"[\n.!?]")
_WORD = re.compile(r"\b\w+\b")

# --- strict protocol ----------------------------------------------------------------------------

# Sentences end at white space after ".", "!" or "?" (same abbreviation guards) and at line breaks.
_STRICT_SENTENCE_SPLIT = re.compile(
    r"(?<!\w\.\w.)(?<![A-Z][a-z]\.)(?<=[.!?])\s+|\s*\n\s*")
_APOSTROPHES = str.maketrans({"\u2019": "'", "\u2018": "'", "\u02bc": "'", "\uff07": "'"})
# Whole negation words and any "n't" contraction (isn't, don't, can't, won't, ...).
STRICT_NEGATION_WORDS = (
    "not", "no", "nothing", "none", "never", "cannot", "neither", "nor", "without")
_STRICT_NEGATION = re.compile(
    r"\b(?:" + "|".join(STRICT_NEGATION_WORDS) + r")\b|\b\w+n't\b")


@dataclasses.dataclass(frozen=True)
class EmotionParse:
  """The class read from one answer, and how it was found.

  Attributes:
    label: class index 0-6, or None when the strict protocol finds no class.
    rule: "first_sentence" (a keyword in the first sentence decided), "keyword_count" (the most
      keyword hits in the rest decided) or "no_keyword" (nothing found: the reference protocol
      answers Happiness, the strict one no class).
    reference_would_crash: the published scorer crashes on this text (reference protocol only).
    kept_text: the text left after dropping negated sentences (what steps 3-4 read).
  """

  label: int | None
  rule: str
  reference_would_crash: bool
  kept_text: str


def _check_protocol(protocol: str) -> None:
  if protocol not in PROTOCOLS:
    raise ValueError(f"unknown protocol {protocol!r}; use one of {', '.join(PROTOCOLS)}")


def _first_sentence_class(words: list[str]) -> int | None:
  """The first word that is a keyword decides; per word the classes are tried in index order."""
  for word in words:
    for index, keywords in enumerate(KEYWORDS):
      if word in keywords:
        return index
  return None


def _most_hits_class(words: list[str]) -> int | None:
  """Class with the most keyword hits; ties go to the lowest index; None without any hit."""
  counts = [sum(word in keywords for word in words) for keywords in KEYWORDS]
  best = max(range(len(KEYWORDS)), key=lambda index: (counts[index], -index))
  return best if counts[best] > 0 else None


def _reference_kept_text(text: str) -> str:
  sentences = _REFERENCE_SENTENCE_SPLIT.split(text)
  kept = [s for s in sentences if not any(neg in s.lower() for neg in _REFERENCE_NEGATIONS)]
  return " ".join(kept) if kept else text


def _parse_reference(text: str) -> EmotionParse:
  kept = _reference_kept_text(text)
  match = _REFERENCE_FIRST_SENTENCE.match(kept)
  if match:
    first, rest, crash = match.group(1), kept[match.end():], False
  else:
    # The published scorer crashes here (its pattern cannot cross a line break); end the first
    # sentence at the first line break or punctuation instead.
    cut = _FALLBACK_FIRST_SENTENCE_END.search(kept)
    first, rest = (kept[:cut.start()], kept[cut.end():]) if cut else (kept, "")
    crash = True
  label = _first_sentence_class(_WORD.findall(first.lower()))
  if label is not None:
    return EmotionParse(label, "first_sentence", crash, kept)
  # Lower-cased like the first sentence's words (the published description of this step says
  # "words" without repeating it; see docs/scoring.md).
  label = _most_hits_class(_WORD.findall(rest.lower()))
  if label is not None:
    return EmotionParse(label, "keyword_count", crash, kept)
  return EmotionParse(0, "no_keyword", crash, kept)  # zero hits: the earliest class


def _parse_strict(text: str) -> EmotionParse:
  # Split on the original text (the "Mr." guard needs the capital), then fold case per sentence.
  sentences = [s.strip() for s in _STRICT_SENTENCE_SPLIT.split(text.translate(_APOSTROPHES))]
  folded = [s.casefold() for s in sentences if s.strip()]
  kept = [s for s in folded if not _STRICT_NEGATION.search(s)]
  kept_text = " ".join(kept)
  if not kept:  # every sentence is negated: the answer names no emotion it asserts
    return EmotionParse(None, "no_keyword", False, kept_text)
  # The splitter already ends sentences at ".", "!", "?" and line breaks (abbreviations aside).
  label = _first_sentence_class(_WORD.findall(kept[0]))
  if label is not None:
    return EmotionParse(label, "first_sentence", False, kept_text)
  label = _most_hits_class(_WORD.findall(" ".join(kept[1:])))
  if label is not None:
    return EmotionParse(label, "keyword_count", False, kept_text)
  return EmotionParse(None, "no_keyword", False, kept_text)


def parse_emotion(text: str, protocol: str = "reference") -> EmotionParse:
  """Reads the emotion class of a generated answer.

  Reference protocol (the published FABA-Bench rule):
    1. split into sentences at white space preceded by "." or "?";
    2. drop sentences whose lower-cased text contains any of not, no, "isn't ", nothing, cannot,
       won't, shouldn't, neither, nor as a plain substring ("nose" drops a sentence); if none is
       left keep the whole text, else re-join the kept ones with single spaces;
    3. the first sentence is the text up to the first ".", "!" or "?" (up to the first line break
       where that punctuation comes after one or is missing); its first keyword decides, classes
       tried in index order for each word;
    4. otherwise the class with most keyword hits in the rest wins; ties and zero hits go to the
       lowest index (zero hits: Happiness).

  Strict protocol, same steps with these fixes: sentences also end at "!" and at line breaks;
  typographic apostrophes become "'" and the text is case-folded; a sentence is negated only by
  the whole words not, no, nothing, none, never, cannot, neither, nor, without or an "n't"
  contraction; the first sentence is the first kept sentence;
  if every sentence is negated, or no keyword occurs, there is no class (label None).
  """
  _check_protocol(protocol)
  if not isinstance(text, str):
    raise TypeError(f"the prediction must be a string, got {type(text).__name__}")
  return _parse_reference(text) if protocol == "reference" else _parse_strict(text)


def parse_emotion_label(label: str | int) -> int:
  """A ground-truth label (class name in any case, or index as int or digit string) -> 0-6."""
  if isinstance(label, bool) or not isinstance(label, (int, str)):
    raise ValueError(
        f"emotion label {label!r} must be a class name or an index, not {type(label).__name__}")
  if isinstance(label, str):
    name = label.strip()
    if name.isascii() and name.isdigit():
      label = int(name)
    else:
      for index, class_name in enumerate(EMOTION_CLASSES):
        if name.casefold() == class_name.casefold():
          return index
      raise ValueError(
          f"emotion label {label!r} is not one of {', '.join(EMOTION_CLASSES)} (any case) "
          f"nor an index 0-{len(EMOTION_CLASSES) - 1}")
  if not 0 <= label < len(EMOTION_CLASSES):
    raise ValueError(
        f"emotion label index {label} is out of range 0-{len(EMOTION_CLASSES) - 1} "
        f"({', '.join(f'{i} {n}' for i, n in enumerate(EMOTION_CLASSES))})")
  return label
