"""Test helper: a tiny LLaMA-format SentencePiece tokenizer, trained in the test, in transformers.

The SentencePiece model is trained with LLaMA's settings (BPE, byte fallback, split digits,
`<unk>`=0, `<s>`=1, `</s>`=2, no pad, identity normalisation, whitespace kept, dummy prefix), then
loaded as `transformers.LlamaTokenizer` and saved with `save_pretrained`, so code under test can
load it with `AutoTokenizer.from_pretrained(dir)` like a real checkpoint's tokenizer.

Use from a test module with `from tests.fixtures_tokenizer import llama_tokenizer  # noqa: F401`.
"""

from __future__ import annotations

import dataclasses
import io
import pathlib

import pytest
import sentencepiece as spm
import transformers

from emola_jax.data.conversation import SYSTEM_PROMPT

_SENTENCES = [
    SYSTEM_PROMPT,
    "USER: What is the emotion of this face? ASSISTANT: The person looks happy and relaxed.",
    "USER: What AUs are conveyed by this face? ASSISTANT: AU1, AU2, AU12 and AU25 are active.",
    "The eyebrows are raised, the eyes are wide open and the mouth is slightly open.",
    "Her lips are pulled up at the corners, showing a broad smile with visible teeth.",
    "The face shows sadness: the inner brows are raised and the lip corners are depressed.",
    "Anger, disgust, fear, happiness, sadness, surprise and neutral are the basic emotions.",
    "He frowns; his brows are lowered and drawn together, the lips pressed tightly.",
    "Why do you think so? Because the cheeks are raised and the eyes narrowed.",
    "Describe the facial expression in detail, including action units 4, 6, 7, 10 and 17.",
]


def corpus() -> list[str]:
  """A deterministic training text: the sentences above in varied combinations."""
  lines = []
  for i in range(40):
    for j, s in enumerate(_SENTENCES):
      lines.append(s if (i + j) % 3 else s.lower())
  return lines


def train_sentencepiece(vocab_size: int = 512) -> bytes:
  """Returns the serialized model proto of a LLaMA-style BPE SentencePiece model."""
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(corpus()), model_writer=model, vocab_size=vocab_size,
      model_type="bpe", byte_fallback=True, split_digits=True, unk_id=0, bos_id=1, eos_id=2,
      pad_id=-1, normalization_rule_name="identity", remove_extra_whitespaces=False,
      add_dummy_prefix=True, allow_whitespace_only_pieces=True, character_coverage=1.0,
      hard_vocab_limit=False, num_threads=1, minloglevel=2)
  return model.getvalue()


@dataclasses.dataclass(frozen=True)
class TinyLlamaTokenizer:
  hf_dir: pathlib.Path  # load with transformers.AutoTokenizer.from_pretrained(hf_dir)
  sp_model: pathlib.Path  # the raw SentencePiece model (an independent reference for ids)

  def sentencepiece(self) -> spm.SentencePieceProcessor:
    return spm.SentencePieceProcessor(model_file=str(self.sp_model))

  def hf(self, **kwargs) -> transformers.PreTrainedTokenizerBase:
    return transformers.AutoTokenizer.from_pretrained(str(self.hf_dir), **kwargs)


def make_llama_tokenizer(directory: pathlib.Path, vocab_size: int = 512) -> TinyLlamaTokenizer:
  """Trains the model into `directory/sp` and saves the transformers tokenizer in `directory/hf`."""
  sp_dir = directory / "sp"
  sp_dir.mkdir(parents=True, exist_ok=True)
  (sp_dir / "tokenizer.model").write_bytes(train_sentencepiece(vocab_size))
  # LLaMA checkpoints add BOS (not EOS) when add_special_tokens=True.
  tokenizer = transformers.LlamaTokenizer.from_pretrained(str(sp_dir), add_bos_token=True,
                                                          add_eos_token=False)
  hf_dir = directory / "hf"
  tokenizer.save_pretrained(str(hf_dir))
  return TinyLlamaTokenizer(hf_dir=hf_dir, sp_model=sp_dir / "tokenizer.model")


@pytest.fixture(scope="session")
def llama_tokenizer(tmp_path_factory) -> TinyLlamaTokenizer:
  return make_llama_tokenizer(tmp_path_factory.mktemp("llama_tokenizer"))
