"""Conversation -> (input_ids, loss_mask) for a LLaMA SentencePiece tokenizer, as LLaVA-1.5 trains.

What LLaVA-1.5 does (facts, for reference):
- Ids: the rendered prompt is split at `<image>`; each piece is tokenised as a fresh string (so
  each piece gets SentencePiece's dummy-prefix "▁"), the pieces' BOS tokens are dropped, one BOS
  goes in front and ONE placeholder id (-200) goes between pieces; the model later replaces that id
  with the 576 (+1 prior) image embeddings and truncates the expanded sequence to max_length.
- Loss mask: the rendering is split at `</s>` into rounds and each round at " ASSISTANT: ".
  round_len = len(tokenize(round)) (its BOS stands in for the round's `</s>`) and
  instruction_len = len(tokenize(instruction + " ASSISTANT: ")) - 2: minus its BOS, and minus the
  "▁" the trailing space becomes, because inside the whole round that space belongs to the answer's
  first token ("▁word"). After the BOS, instruction_len tokens are ignored and the rest of the round
  (the answer tokens and `</s>`) is supervised. With transformers' non-legacy LLaMA tokenizer
  (tokenizers >= 0.14) LLaVA subtracts one more from both lengths for rounds after the first, since
  then the text after `</s>` loses its dummy prefix; a total that disagrees with the sum of rounds
  masks the whole sample.

What we do: build the ids segment by segment (see `conversation.segments`), so the boundaries are
known rather than inferred from lengths:

  [BOS] + enc(prompt chunk) + [image id] * num_image_slots + enc(prompt chunk)
        + enc(answer without its leading space) + [EOS] + enc(next prompt chunk) ...

where enc() tokenises a fresh string (dummy prefix included). A LLaMA SentencePiece vocabulary has
"▁" only at the start of a piece, so no piece spans the ":" | " answer" boundary, and
enc("...ASSISTANT:") + enc(answer) equals the tokenisation of "...ASSISTANT: answer" as one chunk:
the ids are LLaVA's, and the supervised ids are exactly enc(answer) + [EOS], what LLaVA's "-2"
arithmetic selects. Text after `</s>` starts a fresh chunk ("▁USER"), as a legacy LLaMA tokenizer
produces and as LLaVA's length arithmetic assumes without its -1 correction. FABA-Instruct is
single-turn, so that choice never arises for EmoLA data.

The image placeholder is expanded here to `num_image_slots` copies of `image_token_index` (one id
per embedding), so max_length counts the expanded sequence, like LLaVA's truncation does.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from emola_jax.data import conversation as conv

SPIECE_UNDERLINE = "▁"
# Rejection reasons (the loader counts rejected samples per reason).
IMAGE_DOES_NOT_FIT = "image_does_not_fit"
NO_TARGET_LEFT = "no_target_left"


class SampleRejected(ValueError):
  """A sample that cannot be trained on at this max_length; `reason` says why."""

  def __init__(self, reason: str, message: str):
    super().__init__(message)
    self.reason = reason


@dataclasses.dataclass(frozen=True)
class TokenizedConversation:
  input_ids: np.ndarray  # int32 [n]
  loss_mask: np.ndarray  # bool [n], True where input_ids[t] is a supervised target
  truncated: bool


class ConversationTokenizer:
  """Tokenises vicuna_v1 conversations with a `transformers` LLaMA tokenizer (picklable)."""

  def __init__(self, tokenizer: Any, *, num_image_slots: int, image_token_index: int,
               max_length: int | None = None):
    """
    Args:
      tokenizer: a `transformers` tokenizer of a LLaMA-style SentencePiece model (it must add the
        dummy-prefix "▁" to a fresh string, as LLaMA's does).
      num_image_slots: placeholder ids per image (`EmolaConfig.num_image_slots`).
      image_token_index: the placeholder id (`EmolaConfig.image_token_index`).
      max_length: truncation length of the expanded sequence; None: no truncation.
    """
    self.tokenizer = tokenizer
    self.num_image_slots = int(num_image_slots)
    self.image_token_index = int(image_token_index)
    self.max_length = max_length
    self.bos_id = tokenizer.bos_token_id
    self.eos_id = tokenizer.eos_token_id
    name = getattr(tokenizer, "name_or_path", type(tokenizer).__name__)
    if self.bos_id is None or self.eos_id is None:
      raise ValueError(f"tokenizer {name!r} has no BOS or EOS token; a LLaMA tokenizer is needed")
    probe = tokenizer.convert_ids_to_tokens(tokenizer.encode("a", add_special_tokens=False))
    if not probe or not probe[0].startswith(SPIECE_UNDERLINE):
      raise ValueError(
          f"tokenizer {name!r} does not add the SentencePiece prefix space to a fresh string "
          f"('a' -> {probe}); load a LLaMA SentencePiece tokenizer with add_prefix_space=True")
    if max_length is not None and max_length < 2:
      raise ValueError(f"max_length={max_length} is too small")
    # The first prompt chunk (system text + "USER: ") is the same in every sample.
    self._cache: dict[str, list[int]] = {}

  def encode_chunk(self, text: str) -> list[int]:
    """Ids of `text` tokenised as a fresh string (dummy prefix included, no BOS/EOS)."""
    ids = self._cache.get(text)
    if ids is None:
      ids = list(self.tokenizer.encode(text, add_special_tokens=False))
      if len(self._cache) < 64 and len(text) < 1024:
        self._cache[text] = ids
    return ids

  def encode_segments(self, segments: Sequence[conv.Segment]) -> tuple[list[int], list[bool], int]:
    """[BOS] + ids of the segments, per id whether it is a supervised target, and the end of the
    image slots (0 without an image)."""
    ids, mask, image_end = [self.bos_id], [False], 0
    for seg in segments:
      if seg.kind is conv.SegmentKind.PROMPT:
        piece = self.encode_chunk(seg.text)
      elif seg.kind is conv.SegmentKind.ANSWER:
        # The space after "ASSISTANT:" is the "▁" a fresh encoding puts in front of the answer.
        piece = self.encode_chunk(seg.text[1:] if seg.text.startswith(" ") else seg.text)
      elif seg.kind is conv.SegmentKind.IMAGE:
        if self.num_image_slots < 1:
          raise ValueError("a sample with an image needs num_image_slots >= 1")
        piece = [self.image_token_index] * self.num_image_slots
        image_end = len(ids) + len(piece)
      else:
        piece = [self.eos_id]
      ids.extend(piece)
      mask.extend([seg.supervised] * len(piece))
    return ids, mask, image_end

  def __call__(self, conversations: Sequence[Mapping[str, str]], *, has_image: bool = True,
               record_id: str = "<unknown>") -> TokenizedConversation:
    """Tokenises a training conversation and truncates it to max_length.

    Raises:
      conversation.ConversationError: the messages do not fit the template.
      SampleRejected: the image slots do not fit in max_length, or no supervised token is left.
    """
    turns = conv.turns_from_records(conversations, has_image=has_image, record_id=record_id)
    ids, mask, image_end = self.encode_segments(conv.segments(turns))
    return self._truncate(ids, mask, image_end, record_id)

  def prompt_ids(self, turns: Sequence[conv.Turn]) -> np.ndarray:
    """Ids of a generation prompt (turns from `conversation.generation_turns`), no truncation."""
    ids, _, _ = self.encode_segments(conv.segments(turns))
    return np.asarray(ids, np.int32)

  def _truncate(self, ids: list[int], mask: list[bool], image_end: int,
                record_id: str) -> TokenizedConversation:
    n = len(ids)
    limit = self.max_length
    truncated = limit is not None and n > limit
    if truncated:
      if image_end > limit:
        raise SampleRejected(
            IMAGE_DOES_NOT_FIT,
            f"record {record_id!r}: its image slots end at token {image_end} > max_length={limit}; "
            "raise max_length or shorten the prompt")
      ids, mask = ids[:limit], mask[:limit]
      if not any(mask):
        raise SampleRejected(
            NO_TARGET_LEFT,
            f"record {record_id!r}: no answer token is left within max_length={limit} "
            f"(the sample has {n} tokens); raise max_length")
    return TokenizedConversation(np.asarray(ids, np.int32), np.asarray(mask, bool), truncated)


def tokenize_conversation(conversations: Sequence[Mapping[str, str]], tokenizer: Any,
                          num_image_slots: int, image_token_index: int, max_length: int | None,
                          *, has_image: bool = True,
                          record_id: str = "<unknown>") -> tuple[np.ndarray, np.ndarray, bool]:
  """`ConversationTokenizer(...)(conversations)` as a tuple (input_ids, loss_mask, truncated)."""
  out = ConversationTokenizer(tokenizer, num_image_slots=num_image_slots,
                              image_token_index=image_token_index,
                              max_length=max_length)(conversations, has_image=has_image,
                                                     record_id=record_id)
  return out.input_ids, out.loss_mask, out.truncated
