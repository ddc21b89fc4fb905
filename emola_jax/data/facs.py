"""FACS tables: action units, the seven FABA emotion classes and their AU prototypes.

Pure data, shared by the synthetic face generator, the description writer and the converters.

- `AU_NAMES`: the 19 action units annotated in FABA-Instruct (supplementary Tab. 1), with their
  FACS names (lower case, as written inside "AU12 (lip corner puller)").
- `EVAL_AUS`: the 12 AUs that FABA-Bench scores (supplementary Sec. C.2).
- `EMOTIONS`: the 7 classes in FABA-Bench index order (Happiness 0 ... Fear 6).
- `EMOTION_PROTOTYPES`: the usual prototypical AU combinations of each emotion, in the style of the
  EMFACS emotion predictions (Friesen & Ekman, 1983) and the basic-emotion AU tables that follow
  them (e.g. happiness = AU6+AU12, surprise = AU1+AU2+AU5+AU26). They are a common convention,
  not the only valid coding of an emotion.
- `EXCLUSIVE_AUS` / `IMPLIED_AUS`: pairs that cannot be shown together (antagonist muscles, or a
  closed mouth against an open one) and AUs that make another visible, as our renderer draws them.
"""

from __future__ import annotations

import dataclasses

# Supplementary Tab. 1, in AU order.
AU_NAMES: dict[int, str] = {
    1: "inner brow raiser",
    2: "outer brow raiser",
    4: "brow lowerer",
    5: "upper lid raiser",
    6: "cheek raiser",
    7: "lid tightener",
    9: "nose wrinkler",
    10: "upper lip raiser",
    12: "lip corner puller",
    14: "dimpler",
    15: "lip corner depressor",
    17: "chin raiser",
    20: "lip stretcher",
    23: "lip tightener",
    24: "lip pressor",
    25: "lips part",
    26: "jaw drop",
    27: "mouth stretch",
    43: "eyes closed",
}

AUS: tuple[int, ...] = tuple(AU_NAMES)

# FABA-Bench AU S_re is the mean F1 over these (supplementary Sec. C.2).
EVAL_AUS: tuple[int, ...] = (1, 2, 4, 5, 6, 10, 12, 17, 24, 25, 26, 43)

# FABA-Bench class indices: the order is part of the metric, do not reorder.
EMOTIONS: tuple[str, ...] = (
    "Happiness", "Sadness", "Surprise", "Anger", "Neutral", "Disgust", "Fear")
EMOTION_INDEX: dict[str, int] = {name: i for i, name in enumerate(EMOTIONS)}


@dataclasses.dataclass(frozen=True)
class EmotionPrototype:
  """AUs of one prototypical expression.

  `core` is always present; exactly one of `one_of` is added when it is non-empty; each AU of
  `optional` is added independently (the generator decides how often).
  """

  core: tuple[int, ...]
  one_of: tuple[tuple[int, ...], ...] = ()
  optional: tuple[int, ...] = ()

  def all_aus(self) -> frozenset[int]:
    """Every AU this prototype may show."""
    aus = set(self.core) | set(self.optional)
    for choice in self.one_of:
      aus |= set(choice)
    return frozenset(aus)


EMOTION_PROTOTYPES: dict[str, EmotionPrototype] = {
    "Happiness": EmotionPrototype(core=(6, 12), optional=(25,)),
    "Sadness": EmotionPrototype(core=(1, 4, 15), optional=(17,)),
    "Surprise": EmotionPrototype(core=(1, 2, 5, 26), optional=(25,)),
    "Anger": EmotionPrototype(core=(4, 5, 23), one_of=((), (17,), (24,), (17, 24))),
    "Neutral": EmotionPrototype(core=()),
    "Disgust": EmotionPrototype(core=(9,), one_of=((10,), (15,), (10, 15)), optional=(17,)),
    "Fear": EmotionPrototype(core=(1, 2, 4, 5, 20, 26), optional=(25,)),
}

# Pairs never shown together: antagonists (12/15 pull the lip corners up/down), a raised or
# tightened lid against a closed eye, pressed or chin-pushed lips against an open mouth, and the
# two grades of mouth opening (27 replaces 26).
EXCLUSIVE_AUS: tuple[tuple[int, int], ...] = (
    (5, 43), (7, 43), (12, 15), (14, 15), (12, 14),
    (24, 25), (24, 26), (24, 27), (23, 26), (23, 27),
    (17, 26), (17, 27), (26, 27), (20, 27),
)

# An open jaw parts the lips in our renderer, so its label carries AU25 too (FACS codes 25+26).
IMPLIED_AUS: dict[int, tuple[int, ...]] = {26: (25,), 27: (25,)}


def is_compatible(aus: frozenset[int] | set[int]) -> bool:
  """True when no pair of `EXCLUSIVE_AUS` is in `aus`."""
  return not any(a in aus and b in aus for a, b in EXCLUSIVE_AUS)


def with_implied(aus: frozenset[int] | set[int]) -> frozenset[int]:
  """`aus` plus the AUs they make visible (`IMPLIED_AUS`)."""
  out = set(aus)
  for au in aus:
    out.update(IMPLIED_AUS.get(au, ()))
  return frozenset(out)


def format_au_label(aus: frozenset[int] | set[int] | list[int]) -> str:
  """The FABA-Bench AU label string: active AUs ascending, joined by ", " (e.g. "1, 2, 4")."""
  return ", ".join(str(au) for au in sorted(aus))


def _check_tables() -> None:
  # Fail at import if an edit breaks the tables, rather than producing silently bad data.
  for name, proto in EMOTION_PROTOTYPES.items():
    unknown = proto.all_aus() - set(AU_NAMES)
    if unknown:
      raise ValueError(f"facs.py: prototype {name} uses unknown AUs {sorted(unknown)}")
    for choice in proto.one_of or ((),):
      full = with_implied(set(proto.core) | set(choice) | set(proto.optional))
      if not is_compatible(full):
        raise ValueError(f"facs.py: prototype {name} combines exclusive AUs {sorted(full)}")
  if set(EMOTION_PROTOTYPES) != set(EMOTIONS):
    raise ValueError("facs.py: EMOTION_PROTOTYPES must have one entry per EMOTIONS class")
  if not set(EVAL_AUS) <= set(AU_NAMES):
    raise ValueError("facs.py: EVAL_AUS must be a subset of AU_NAMES")


_check_tables()
