"""GPT-4V-style answers for synthetic faces, written from the emotion and the active AUs.

Emotion answers name the emotion in the FIRST sentence, with a word from the FABA-Bench keyword
list of that class, and with no keyword of any class before it (the scorer reads the first
keyword of the first sentence). Every word of an emotion answer also avoids the substrings the
scorer treats as negations ("not", "no", "nor", ... so also "nose", "know", "normal"): a sentence
holding one would be dropped before scoring. Then 1-3 of the visible AU cues follow in words.

AU answers name every active AU, in ascending order, as "AU12 (lip corner puller)", in one of
several sentence or bullet layouts; an AU that is not active is never written as "AU<number>".
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import numpy as np

from emola_jax.data import facs

# Substrings that make the FABA-Bench emotion scorer drop a sentence (EMOLA_FACTS.md Sec. 5).
NEGATION_SUBSTRINGS = (
    "not", "no", "isn't ", "nothing", "cannot", "won't", "shouldn't", "neither", "nor")

# Per class: adjective phrases ("The person appears ___") and noun phrases ("a sense of ___").
# Each phrase starts (or is) a keyword of its own class and holds no keyword of another class.
EMOTION_TERMS: dict[str, dict[str, tuple[str, ...]]] = {
    "Happiness": {
        "adj": ("happy", "joyful", "cheerful", "amused", "happy and relaxed"),
        "noun": ("happiness", "joy", "contentment", "amusement", "cheerful warmth"),
    },
    "Sadness": {
        "adj": ("somber", "overcome by sadness", "full of sadness", "in distress"),
        "noun": ("sadness", "distress", "anguish", "somber sadness"),
    },
    "Surprise": {
        "adj": ("surprised", "startled", "taken by surprise", "full of astonishment"),
        "noun": ("surprise", "astonishment", "disbelief", "startled surprise"),
    },
    "Anger": {
        "adj": ("irritated", "enraged", "irate", "outraged", "full of anger"),
        "noun": ("anger", "frustration", "irritation mixed with anger", "agitation"),
    },
    "Neutral": {
        "adj": ("neutral", "calm", "calm and neutral", "neutral and composed"),
        "noun": ("neutrality", "a calm state", "a neutral mood", "calm composure"),
    },
    "Disgust": {
        "adj": ("disgusted", "full of disgust", "repelled, showing disgust"),
        "noun": ("disgust", "distaste", "disapproval", "strong disgust", "disdain"),
    },
    "Fear": {
        "adj": ("gripped by fear", "full of fear", "panic-stricken", "in a state of panic"),
        "noun": ("fear", "panic", "alarm", "anxiety", "apprehension"),
    },
}

# First sentences: {adj} or {noun} is the first emotion word of the answer.
_EMOTION_OPENERS: tuple[str, ...] = (
    "The person in this image appears {adj}.",
    "This face conveys a clear sense of {noun}.",
    "The expression on this face is one of {noun}.",
    "The dominant emotion shown here is {noun}.",
    "The person looks {adj}.",
    "The facial expression suggests {noun}.",
    "The emotion displayed by this person is {noun}.",
    "This person's face shows {noun}.",
    "The face in the image expresses {noun}.",
    "Judging by the facial features, the person seems {adj}.",
    "The overall expression reads as {noun}.",
    "The individual in the picture seems to be feeling {noun}.",
    "At first glance, this person looks {adj}.",
)

# Visible cues in words, two phrasings per AU (no negation substrings: "nasal", never "nose").
AU_CUES: dict[int, tuple[str, str]] = {
    1: ("the inner corners of the eyebrows are raised", "the inner brows are lifted"),
    2: ("the outer parts of the eyebrows are raised", "the outer brows are lifted"),
    4: ("the eyebrows are lowered and drawn together", "the brows are knitted downward"),
    5: ("the upper eyelids are raised to widen the eyes", "the eyes are opened wide"),
    6: ("the cheeks are raised with crow's feet around the eyes",
        "the cheeks are lifted and the eyes are narrowed from below"),
    7: ("the eyelids are tightened", "the lower lids are tensed and raised"),
    9: ("the skin along the nasal bridge is wrinkled",
        "wrinkles appear across the bridge between the eyes"),
    10: ("the upper lip is raised",
         "the upper lip is lifted and deepens the folds beside the mouth"),
    12: ("the corners of the mouth are pulled up", "the lip corners are drawn back and up"),
    14: ("dimples form at the corners of the mouth", "the lip corners are tightened into dimples"),
    15: ("the corners of the mouth are pulled down", "the lip corners are turned downward"),
    17: ("the chin is pushed up", "the chin is raised and pushes the lower lip up"),
    20: ("the lips are stretched sideways", "the mouth is stretched horizontally"),
    23: ("the lips are tightened", "the lips are narrowed and tense"),
    24: ("the lips are pressed together", "the lips are pressed firmly together"),
    25: ("the lips are parted", "the lips are slightly apart"),
    26: ("the jaw is dropped to open the mouth", "the jaw hangs open"),
    27: ("the mouth is stretched wide open", "the mouth is pulled wide open"),
    43: ("the eyes are closed", "the eyelids are shut"),
}

# A neutral face has no active AU: these describe a face at rest.
NEUTRAL_CUES: tuple[str, ...] = (
    "the brows rest at their usual height",
    "the eyes are open in a relaxed way",
    "the lips are closed in a relaxed line",
    "the facial muscles appear to be at rest",
    "the cheeks are smooth and relaxed",
)

_CUE_SENTENCES: tuple[str, ...] = (
    "Key signs are that {cues}.",
    "In particular, {cues}.",
    "Looking closely, {cues}.",
    "{Cues}.",
    "Several features support this: {cues}.",
    "You can see that {cues}.",
    "This impression comes from the face itself: {cues}.",
    "The clues are clear, since {cues}.",
    "Here, {cues}.",
    "This is visible because {cues}.",
)

_EMOTION_CLOSERS: tuple[str, ...] = (
    "Together, these features suggest {noun}.",
    "Overall, the face gives an impression of {noun}.",
    "These cues are typical of {noun}.",
    "Taken together, the expression points to {noun}.",
)

_AU_LAYOUTS: tuple[str, ...] = (
    "bullets_intro", "bullets_plain", "inline", "inline_cues", "identify", "observed",
    "involves", "count", "per_au", "facs", "presents", "active",
)

_NUMBER_WORDS = ("zero", "One", "Two", "Three", "Four", "Five", "Six", "Seven", "Eight", "Nine",
                 "Ten", "Eleven", "Twelve")


def _pick(rng: np.random.Generator, options):
  return options[int(rng.integers(len(options)))]


def _join(items: list[str]) -> str:
  if len(items) == 1:
    return items[0]
  return ", ".join(items[:-1]) + " and " + items[-1]


def _au_term(au: int) -> str:
  return f"AU{au} ({facs.AU_NAMES[au]})"


def _check_aus(aus: Iterable[int], where: str) -> list[int]:
  out = sorted(set(int(a) for a in aus))
  unknown = [a for a in out if a not in facs.AU_NAMES]
  if unknown:
    raise ValueError(f"descriptions.{where}: unknown AUs {unknown}; FABA AUs are "
                     f"{list(facs.AU_NAMES)}")
  return out


def _check_emotion(emotion: str, where: str) -> None:
  if emotion not in EMOTION_TERMS:
    raise ValueError(f"descriptions.{where}: unknown emotion {emotion!r}; use one of "
                     f"{list(EMOTION_TERMS)}")


def describe_emotion(emotion: str, aus: Iterable[int], rng: np.random.Generator) -> str:
  """An emotion answer: the emotion in the first sentence, then 1-3 cues of the active AUs."""
  _check_emotion(emotion, "describe_emotion")
  active = _check_aus(aus, "describe_emotion")
  terms = EMOTION_TERMS[emotion]
  opener = _pick(rng, _EMOTION_OPENERS)
  sentences = [opener.format(adj=_pick(rng, terms["adj"]), noun=_pick(rng, terms["noun"]))]
  if active:
    k = int(rng.integers(1, min(3, len(active)) + 1))
    chosen = sorted(rng.choice(active, size=k, replace=False).tolist())
    cues = [AU_CUES[au][int(rng.integers(2))] for au in chosen]
  else:
    k = int(rng.integers(1, 3))
    cues = [NEUTRAL_CUES[i] for i in sorted(rng.choice(len(NEUTRAL_CUES), k, replace=False))]
  text = _join(cues)
  template = _pick(rng, _CUE_SENTENCES)
  sentences.append(template.format(cues=text, Cues=text[:1].upper() + text[1:]))
  if rng.random() < 0.5:
    sentences.append(_pick(rng, _EMOTION_CLOSERS).format(noun=_pick(rng, terms["noun"])))
  return " ".join(sentences)


def describe_aus(aus: Iterable[int], rng: np.random.Generator,
                 emotion: str | None = None) -> str:
  """An AU answer naming every active AU in ascending order as "AU12 (lip corner puller)".

  `emotion`, when given, adds a closing sentence naming the expression the AUs make up.
  """
  active = _check_aus(aus, "describe_aus")
  if not active:
    raise ValueError("descriptions.describe_aus: a face needs at least one active AU to be "
                     "described; leave AU-less faces out of the AU task")
  if emotion is not None:
    _check_emotion(emotion, "describe_aus")
  terms = [_au_term(au) for au in active]
  cues = [AU_CUES[au][int(rng.integers(2))] for au in active]
  listing = _join(terms)
  layout = _pick(rng, _AU_LAYOUTS)
  if layout == "bullets_intro":
    lines = [f"- {t}: {c[:1].upper() + c[1:]}." for t, c in zip(terms, cues)]
    text = ("Based on the Facial Action Coding System (FACS), the following action units are "
            "present in this face:\n" + "\n".join(lines))
  elif layout == "bullets_plain":
    text = "The action units visible in this face are:\n" + "\n".join(f"- {t}" for t in terms)
  elif layout == "inline":
    text = f"The face shows {listing}."
  elif layout == "inline_cues":
    text = f"The active action units are {listing}. " + " ".join(
        f"{c[:1].upper() + c[1:]}." for c in cues)
  elif layout == "identify":
    text = f"In this face, I can identify {listing}."
  elif layout == "observed":
    text = f"Looking at the facial movements, {listing} can be observed."
  elif layout == "involves":
    text = f"This expression involves {listing}, since {_join(cues)}."
  elif layout == "count":
    n = len(terms)
    noun = "action unit appears" if n == 1 else "action units appear"
    text = f"{_NUMBER_WORDS[n]} {noun} in this face: {listing}."
  elif layout == "per_au":
    text = "Several facial movements are visible here. " + " ".join(
        f"{t} is present, as {c}." for t, c in zip(terms, cues))
  elif layout == "facs":
    text = f"According to FACS, this face displays {listing}."
  elif layout == "presents":
    text = f"The face presents {terms[0]}" + (
        f" together with {_join(terms[1:])}." if len(terms) > 1 else ".")
  else:
    text = f"The following AUs are active: {listing}."
  if emotion is not None and emotion != "Neutral" and rng.random() < 0.5:
    noun = _pick(rng, EMOTION_TERMS[emotion]["noun"])
    text += f"\nTogether, these movements are typical of {noun}."
  return text


def _check_vocabulary() -> None:
  # Fail at import if an edit lets a negation substring into emotion answers.
  phrases = list(_EMOTION_OPENERS) + list(_CUE_SENTENCES) + list(_EMOTION_CLOSERS)
  phrases += [c for pair in AU_CUES.values() for c in pair] + list(NEUTRAL_CUES)
  for terms in EMOTION_TERMS.values():
    phrases += list(terms["adj"]) + list(terms["noun"])
  for phrase in phrases:
    text = re.sub(r"\{\w+\}", " ", phrase).lower()  # the slots themselves are checked as terms
    bad = [s for s in NEGATION_SUBSTRINGS if s in text]
    if bad:
      raise ValueError(f"descriptions.py: phrase {phrase!r} holds scorer negation(s) {bad}")
  if set(AU_CUES) != set(facs.AU_NAMES):
    raise ValueError("descriptions.py: AU_CUES needs one entry per facs.AU_NAMES")


_check_vocabulary()
