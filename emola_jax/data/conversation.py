"""The LLaVA-1.5 "vicuna_v1" conversation template, as segments a tokenizer can consume.

A conversation renders as

  {system} USER: <image>\\n{q1} ASSISTANT: {a1}</s>USER: {q2} ASSISTANT: {a2}</s>

The rendering is kept as a list of `Segment`s rather than one string so that the tokenizer knows
where the image goes, which text is supervised (assistant answers and their `</s>`), and where a
SentencePiece chunk starts. Joining the segments' `text` gives exactly the rendered string.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping, Sequence

SYSTEM_PROMPT = ("A chat between a curious user and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the user's "
                 "questions.")
USER_ROLE = "USER"
ASSISTANT_ROLE = "ASSISTANT"
IMAGE_PLACEHOLDER = "<image>"
EOS_TEXT = "</s>"
# Record role names in LLaVA-format conversations ("from" field).
HUMAN = "human"
GPT = "gpt"


class SegmentKind(enum.Enum):
  PROMPT = "prompt"  # Unsupervised text that starts a fresh SentencePiece chunk.
  ANSWER = "answer"  # Supervised text; starts with the single space that follows "ASSISTANT:".
  IMAGE = "image"  # The image placeholder (expanded to the image slots by the tokenizer).
  EOS = "eos"  # The `</s>` that closes an assistant turn (supervised).


@dataclasses.dataclass(frozen=True)
class Segment:
  kind: SegmentKind
  text: str

  @property
  def supervised(self) -> bool:
    return self.kind in (SegmentKind.ANSWER, SegmentKind.EOS)


@dataclasses.dataclass(frozen=True)
class Turn:
  """One round: a user question and, except for a generation prompt's last round, an answer."""

  question: str
  answer: str | None


class ConversationError(ValueError):
  """A record's conversation does not fit the template."""


def turns_from_records(conversations: Sequence[Mapping[str, str]], *, has_image: bool = True,
                       record_id: str = "<unknown>",
                       allow_open_last_turn: bool = False) -> list[Turn]:
  """Pairs LLaVA-format messages into turns and puts `<image>` at the front of the first question.

  Args:
    conversations: [{"from": "human"|"gpt", "value": str}, ...], alternating, starting with human.
    has_image: whether the sample has an image. If so the first question becomes
      `<image>\\n{question without the placeholder, stripped}` (LLaVA-1.5 does the same; a first
      question without the placeholder gets one, since every image must reach the model).
    record_id: named in errors.
    allow_open_last_turn: accept a trailing human message without an answer (generation prompts).

  Raises:
    ConversationError: roles out of order, an empty conversation, or a misplaced placeholder.
  """
  if not conversations:
    raise ConversationError(f"record {record_id!r}: empty conversation")
  turns = []
  for i in range(0, len(conversations), 2):
    human = conversations[i]
    gpt = conversations[i + 1] if i + 1 < len(conversations) else None
    if human.get("from") != HUMAN:
      raise ConversationError(f"record {record_id!r}: message {i} is from {human.get('from')!r}, "
                              f"expected {HUMAN!r} (messages must alternate human, gpt)")
    if gpt is None:
      if not allow_open_last_turn:
        raise ConversationError(f"record {record_id!r}: the last human message has no gpt answer")
    elif gpt.get("from") != GPT:
      raise ConversationError(f"record {record_id!r}: message {i + 1} is from {gpt.get('from')!r}, "
                              f"expected {GPT!r} (messages must alternate human, gpt)")
    question = str(human.get("value", ""))
    answer = None if gpt is None else str(gpt.get("value", ""))
    if answer is not None and IMAGE_PLACEHOLDER in answer:
      raise ConversationError(f"record {record_id!r}: {IMAGE_PLACEHOLDER} inside answer {i + 1}")
    if i == 0 and has_image:
      question = IMAGE_PLACEHOLDER + "\n" + question.replace(IMAGE_PLACEHOLDER, "").strip()
    elif IMAGE_PLACEHOLDER in question:
      where = "a later user turn" if i else "a sample without an image"
      raise ConversationError(f"record {record_id!r}: {IMAGE_PLACEHOLDER} in {where}; only one "
                              "image per sample, carried by the first user turn, is supported")
    turns.append(Turn(question, answer))
  return turns


def segments(turns: Sequence[Turn], system: str = SYSTEM_PROMPT) -> list[Segment]:
  """Renders turns as segments; an unanswered last turn ends with `ASSISTANT:` (for generation)."""
  out: list[Segment] = []
  for r, turn in enumerate(turns):
    if turn.answer is None and r != len(turns) - 1:
      raise ConversationError(f"turn {r} has no answer but is not the last turn")
    head = f"{system} {USER_ROLE}: " if r == 0 else f"{USER_ROLE}: "
    question = turn.question
    if IMAGE_PLACEHOLDER in question:
      before, after = question.split(IMAGE_PLACEHOLDER, 1)
      out.append(Segment(SegmentKind.PROMPT, head + before))
      out.append(Segment(SegmentKind.IMAGE, IMAGE_PLACEHOLDER))
      out.append(Segment(SegmentKind.PROMPT, f"{after} {ASSISTANT_ROLE}:"))
    else:
      out.append(Segment(SegmentKind.PROMPT, f"{head}{question} {ASSISTANT_ROLE}:"))
    if turn.answer is not None:
      out.append(Segment(SegmentKind.ANSWER, " " + turn.answer))
      out.append(Segment(SegmentKind.EOS, EOS_TEXT))
  return out


def render(turns: Sequence[Turn], system: str = SYSTEM_PROMPT) -> str:
  """The prompt as one string (for logs and for comparing with the reference rendering)."""
  return "".join(s.text for s in segments(turns, system))


def generation_turns(question: str, history: Sequence[tuple[str, str]] = (), *,
                     has_image: bool = True) -> list[Turn]:
  """Turns of an inference prompt: earlier (question, answer) rounds, then `question`."""
  messages = []
  for q, a in history:
    messages += [{"from": HUMAN, "value": q}, {"from": GPT, "value": a}]
  messages.append({"from": HUMAN, "value": question})
  return turns_from_records(messages, has_image=has_image, record_id="<prompt>",
                            allow_open_last_turn=True)
