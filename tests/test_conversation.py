"""Tests for the vicuna_v1 template and conversation tokenisation (ids and loss mask)."""

import numpy as np
import pytest

from emola_jax.data import conversation as conv
from emola_jax.data import tokenize as tok
from tests.fixtures_tokenizer import llama_tokenizer  # noqa: F401  (pytest fixture)

SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant "
          "gives helpful, detailed, and polite answers to the user's questions.")
IMG = 32000
SLOTS = 5  # A tiny stand-in for 576 visual tokens + 1 prior token.
BOS, EOS = 1, 2

TWO_TURNS = [
    {"from": "human", "value": "What is the emotion of this face?\n<image>"},
    {"from": "gpt", "value": "The person looks happy."},
    {"from": "human", "value": "Which AUs?"},
    {"from": "gpt", "value": "4, 6 and 12."},
]


def test_render_two_turns_exact_string():
  turns = conv.turns_from_records(TWO_TURNS)
  assert conv.render(turns) == (
      SYSTEM + " USER: <image>\nWhat is the emotion of this face? ASSISTANT: The person looks "
      "happy.</s>USER: Which AUs? ASSISTANT: 4, 6 and 12.</s>")


def test_image_placeholder_moved_to_front_and_stripped():
  turns = conv.turns_from_records([{"from": "human", "value": "  Look <image> here.\n"},
                                   {"from": "gpt", "value": "ok"}])
  assert turns[0].question == "<image>\nLook  here."
  # A first question without the placeholder still gets the image.
  turns = conv.turns_from_records([{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "x"}])
  assert turns[0].question == "<image>\nHi"
  turns = conv.turns_from_records([{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "x"}],
                                  has_image=False)
  assert conv.render(turns) == SYSTEM + " USER: Hi ASSISTANT: x</s>"


def test_generation_prompt():
  turns = conv.generation_turns("What emotions are conveyed by this face?")
  assert conv.render(turns) == (SYSTEM + " USER: <image>\nWhat emotions are conveyed by this face?"
                                " ASSISTANT:")
  turns = conv.generation_turns("Why?", history=[("<image>\nWhat?", "Happy.")])
  assert conv.render(turns) == (SYSTEM + " USER: <image>\nWhat? ASSISTANT: Happy.</s>"
                                "USER: Why? ASSISTANT:")


@pytest.mark.parametrize("messages, match", [
    ([{"from": "gpt", "value": "a"}, {"from": "human", "value": "b"}], "expected 'human'"),
    ([{"from": "human", "value": "a"}, {"from": "human", "value": "b"}], "expected 'gpt'"),
    ([{"from": "human", "value": "a"}], "no gpt answer"),
    ([{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"},
      {"from": "human", "value": "<image>c"}, {"from": "gpt", "value": "d"}], "later user turn"),
    ([], "empty"),
])
def test_bad_conversations_name_the_record(messages, match):
  with pytest.raises(conv.ConversationError, match=match) as e:
    conv.turns_from_records(messages, record_id="rec-7")
  assert "rec-7" in str(e.value)


def _tokenizer(llama_tokenizer, max_length=None):
  return tok.ConversationTokenizer(llama_tokenizer.hf(), num_image_slots=SLOTS,
                                   image_token_index=IMG, max_length=max_length)


def test_two_turn_ids_and_mask_hand_written(llama_tokenizer):
  sp = llama_tokenizer.sentencepiece()
  enc = sp.encode  # A fresh SentencePiece encoding: dummy prefix, no BOS/EOS.
  # Expected ids written piece by piece: BOS, system + first user turn up to the image, image
  # slots, rest of the first user turn through "ASSISTANT:", answer, </s>, second user turn, ...
  pieces = [
      ([BOS], 0),
      (enc(SYSTEM + " USER: "), 0),
      ([IMG] * SLOTS, 0),
      (enc("\nWhat is the emotion of this face? ASSISTANT:"), 0),
      (enc("The person looks happy."), 1),
      ([EOS], 1),
      (enc("USER: Which AUs? ASSISTANT:"), 0),
      (enc("4, 6 and 12."), 1),
      ([EOS], 1),
  ]
  expected_ids = [i for ids, _ in pieces for i in ids]
  expected_mask = [bool(m) for ids, m in pieces for _ in ids]
  ids, mask, truncated = tok.tokenize_conversation(TWO_TURNS, llama_tokenizer.hf(), SLOTS, IMG,
                                                   max_length=4096)
  assert ids.dtype == np.int32 and mask.dtype == bool and not truncated
  assert ids.tolist() == expected_ids
  assert mask.tolist() == expected_mask
  # The supervised ids are exactly the answers' tokens plus </s>.
  assert ids[mask].tolist() == enc("The person looks happy.") + [EOS] + enc("4, 6 and 12.") + [EOS]
  # An answer starting with a digit begins with a lone "▁" piece, which is supervised (LLaVA too).
  assert sp.id_to_piece(enc("4, 6 and 12.")[0]) == "▁"
  # Spelled out: the system text ends with "questions." and "USER" follows; "ASSISTANT" is masked.
  pieces_text = [sp.id_to_piece(int(i)) if i != IMG else "<IMG>" for i in ids]
  first_target = int(np.argmax(mask))
  assert pieces_text[first_target - 1] == ":" and pieces_text[first_target] == "▁The"


def _llava_reference(prompt, sp, num_slots):
  """LLaVA-1.5's published recipe, written from its description (legacy tokenizer semantics).

  Ids: every piece between `<image>` / `</s>` is encoded fresh; one BOS; one placeholder per image.
  Labels: rounds split at `</s>`, each at " ASSISTANT: "; round_len = len(tok(round)) counting its
  BOS, instruction_len = len(tok(instruction + " ASSISTANT: ")) - 2.
  """
  def tok_image(text):
    ids = [BOS]
    for k, chunk in enumerate(text.split("<image>")):
      if k:
        ids.append(-200)
      for m, piece in enumerate(chunk.split("</s>")):
        if m:
          ids.append(EOS)
        ids += sp.encode(piece)
    return ids

  ids = tok_image(prompt)
  labels = list(ids)
  cur = 1
  labels[:cur] = [-100]
  sep = " ASSISTANT: "
  for rnd in prompt.split("</s>"):
    if not rnd:
      break
    head, _ = rnd.split(sep)
    round_len = len(tok_image(rnd))
    instruction_len = len(tok_image(head + sep)) - 2
    labels[cur:cur + instruction_len] = [-100] * instruction_len
    cur += round_len
  labels[cur:] = [-100] * (len(labels) - cur)
  assert cur == len(ids), "the reference's own consistency check"
  # Expand the single placeholder to the image slots (ignored in the loss).
  out_ids, out_mask = [], []
  for i, lab in zip(ids, labels):
    n = num_slots if i == -200 else 1
    out_ids += [IMG if i == -200 else i] * n
    out_mask += [lab != -100] * n
  return out_ids, out_mask


@pytest.mark.parametrize("messages", [
    TWO_TURNS,
    TWO_TURNS[:2],
    [{"from": "human", "value": "<image>\nDescribe the face in detail."},
     {"from": "gpt", "value": "Her lips are pulled up at the corners, showing a broad smile.\n"
                              "AU6 and AU12 are active; the emotion is happiness."}],
])
def test_matches_llava_reference_recipe(llama_tokenizer, messages):
  sp = llama_tokenizer.sentencepiece()
  prompt = conv.render(conv.turns_from_records(messages))
  ref_ids, ref_mask = _llava_reference(prompt, sp, SLOTS)
  ids, mask, _ = tok.tokenize_conversation(messages, llama_tokenizer.hf(), SLOTS, IMG, None)
  assert ids.tolist() == ref_ids
  assert mask.tolist() == ref_mask


def test_equals_whole_string_tokenisation_with_legacy_hf_tokenizer(llama_tokenizer):
  # transformers' legacy LLaMA tokenizer restarts the dummy prefix after every special token;
  # tokenising each side of the image as ONE string must give our segment-by-segment ids.
  legacy = llama_tokenizer.hf(legacy=True)
  prompt = conv.render(conv.turns_from_records(TWO_TURNS))
  before, after = prompt.split("<image>")
  expected = ([BOS] + legacy.encode(before, add_special_tokens=False) + [IMG] * SLOTS +
              legacy.encode(after, add_special_tokens=False))
  ids, _, _ = tok.tokenize_conversation(TWO_TURNS, llama_tokenizer.hf(), SLOTS, IMG, None)
  assert ids.tolist() == expected


def test_truncation_counts_and_rejections(llama_tokenizer):
  full = _tokenizer(llama_tokenizer)(TWO_TURNS)
  n = len(full.input_ids)
  image_end = int(np.flatnonzero(full.input_ids == IMG)[-1]) + 1
  first_target = int(np.argmax(full.loss_mask))

  cut = _tokenizer(llama_tokenizer, max_length=n - 3)(TWO_TURNS)
  assert cut.truncated and len(cut.input_ids) == n - 3
  np.testing.assert_array_equal(cut.input_ids, full.input_ids[:n - 3])
  np.testing.assert_array_equal(cut.loss_mask, full.loss_mask[:n - 3])

  exact = _tokenizer(llama_tokenizer, max_length=n)(TWO_TURNS)
  assert not exact.truncated and len(exact.input_ids) == n

  with pytest.raises(tok.SampleRejected, match="image slots") as e:
    _tokenizer(llama_tokenizer, max_length=image_end - 1)(TWO_TURNS, record_id="r1")
  assert e.value.reason == tok.IMAGE_DOES_NOT_FIT and "r1" in str(e.value)

  with pytest.raises(tok.SampleRejected) as e:
    _tokenizer(llama_tokenizer, max_length=first_target)(TWO_TURNS)
  assert e.value.reason == tok.NO_TARGET_LEFT
  kept = _tokenizer(llama_tokenizer, max_length=first_target + 1)(TWO_TURNS)
  assert kept.loss_mask.sum() == 1


def test_generation_prompt_ids(llama_tokenizer):
  sp = llama_tokenizer.sentencepiece()
  turns = conv.generation_turns("What emotions are conveyed by this face?")
  ids = _tokenizer(llama_tokenizer).prompt_ids(turns)
  assert ids.tolist() == ([BOS] + sp.encode(SYSTEM + " USER: ") + [IMG] * SLOTS +
                          sp.encode("\nWhat emotions are conveyed by this face? ASSISTANT:"))


def test_rejects_tokenizer_without_prefix_space(llama_tokenizer):
  with pytest.raises(ValueError, match="prefix space"):
    tok.ConversationTokenizer(llama_tokenizer.hf(add_prefix_space=False), num_image_slots=SLOTS,
                              image_token_index=IMG)


def _mistral_tokenizer(directory):
  """The 32k LLaMA-format SentencePiece model that mistral-common ships (Mistral-7B v0.1's),
  loaded through transformers as a LLaMA checkpoint's tokenizer would be."""
  import importlib.util  # pylint: disable=import-outside-toplevel
  import os  # pylint: disable=import-outside-toplevel
  import shutil  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  spec = importlib.util.find_spec("mistral_common")
  if spec is None:
    pytest.fail("the test extra mistral-common is not installed: pip install -e '.[test]'")
  path = os.path.join(list(spec.submodule_search_locations)[0], "data", "tokenizer.model.v1")
  shutil.copy(path, directory / "tokenizer.model")
  return transformers.LlamaTokenizer.from_pretrained(str(directory), add_bos_token=True,
                                                     add_eos_token=False)


def test_two_turn_ids_with_a_real_llama_format_tokenizer(tmp_path):
  """Literal ids, read off the model's pieces (shown beside each), not computed by the test."""
  expected = [
      1,  # <s>
      # "▁A ▁chat ▁between ▁a ▁curious ▁user ▁and ▁an ▁artificial ▁intelligence ▁assistant ."
      330, 10706, 1444, 264, 13903, 2188, 304, 396, 18278, 10895, 13892, 28723,
      # "▁The ▁assistant ▁gives ▁helpful , ▁detailed , ▁and ▁polite ▁answers ▁to ▁the ▁user ' s
      #  ▁questions ."
      415, 13892, 5212, 10865, 28725, 10537, 28725, 304, 27057, 11194, 298, 272, 2188, 28742,
      28713, 4224, 28723,
      2223, 725, 28747, 28705,  # "▁US ER : ▁"
      *[IMG] * SLOTS,  # the image slots
      # "▁ <0x0A> What ▁is ▁the ▁emotion ▁of ▁this ▁face ? ▁ASS IST ANT :"
      28705, 13, 3195, 349, 272, 13197, 302, 456, 2105, 28804, 8602, 8048, 12738, 28747,
      415, 1338, 4674, 4610, 28723, 2,  # "▁The ▁person ▁looks ▁happy ." </s>
      # "▁US ER : ▁Which ▁A Us ? ▁ASS IST ANT :"
      2223, 725, 28747, 9595, 330, 5495, 28804, 8602, 8048, 12738, 28747,
      28705, 28781, 28725, 28705, 28784, 304, 28705, 28740, 28750, 28723, 2,  # "▁ 4 , ▁ 6 ▁and ▁ 1 2 ." </s>
  ]
  supervised = {(53, 59), (70, 81)}  # [start, end) of each answer + </s>
  ids, mask, truncated = tok.tokenize_conversation(TWO_TURNS, _mistral_tokenizer(tmp_path), SLOTS,
                                                   IMG, max_length=4096)
  assert not truncated
  assert ids.tolist() == expected
  want = np.zeros(len(expected), bool)
  for start, end in supervised:
    want[start:end] = True
  assert mask.tolist() == want.tolist()
