"""Train a small LLaMA-format SentencePiece tokenizer on the text of a FABA-Instruct-layout dataset.

The real EmoLA uses LLaMA's 32k vocabulary. A model trained from scratch on synthetic faces
needs far fewer ids, and a domain vocabulary makes prompts and answers short, which is what makes
a CPU demo fast. Pieces may span spaces (`multiword`, the default here; LLaMA's do not): the
demo's 2k vocabulary turns "▁The▁face▁in▁the▁image▁expresses" or the system prompt's
"▁artificial▁intelligence▁assistant" into one id each, so an emotion answer is ~12-25 ids
instead of ~35-60 with whole-word pieces.

Everything else follows LLaMA: BPE, byte fallback (any text stays encodable), split digits,
`<unk>`=0, `<s>`=1, `</s>`=2, no pad id, identity normalisation, whitespace kept, dummy prefix.
It is saved as `<output>/tokenizer.model` and, through `transformers.LlamaTokenizer`'s
`save_pretrained`, as a folder `AutoTokenizer.from_pretrained` loads like a real checkpoint's
tokenizer (BOS added, EOS not).

Training text: the dataset's training JSON files (`*train*.json`), cut into the very chunks
`emola_jax.data.tokenize` encodes (system prompt + "USER: ", question + " ASSISTANT:", answer),
plus the FABA-Bench evaluation prompts. Test files are never read, so held-out references do not
shape the vocabulary.

  python -m emola_jax.data.train_tokenizer --data_dir=DATA --output=DATA/tokenizer \
      --vocab_size=2047
"""

from __future__ import annotations

import glob
import io
import json
import os
import tempfile
from collections.abc import Iterator, Sequence

from emola_jax.data import conversation as conv
from emola_jax.data import instructions

SP_MODEL_FILE = "tokenizer.model"
SPECIAL_IDS = {"unk": 0, "bos": 1, "eos": 2}
# Byte-fallback pieces (256) + the three specials: a smaller vocabulary cannot be trained.
MIN_VOCAB_SIZE = 256 + 3 + 1


class TokenizerDataError(ValueError):
  """The dataset folder has no usable training text (the message names the file)."""


def training_files(data_dir: str) -> list[str]:
  """The training JSON files of a FABA-Instruct-layout folder, sorted (test files excluded)."""
  files = sorted(p for p in glob.glob(os.path.join(data_dir, "*.json"))
                 if "train" in os.path.basename(p).lower())
  if not files:
    raise TokenizerDataError(
        f"{data_dir}: no *train*.json file; point --data_dir at a FABA-Instruct-layout folder "
        "(e.g. the output of emola_jax.data.synthetic.generate)")
  return files


def conversation_chunks(path: str) -> Iterator[str]:
  """The text chunks each record of a FABA-Instruct JSON list is tokenised as.

  The chunks are those `emola_jax.data.tokenize` encodes one by one (system prompt + "USER: ",
  the question + " ASSISTANT:", the answer without its leading space), so the vocabulary is
  fitted to exactly the strings the model will see, each as often as in training.
  """
  with open(path, encoding="utf-8") as f:
    try:
      records = json.load(f)
    except json.JSONDecodeError as e:
      raise TokenizerDataError(f"{path}: not valid JSON ({e.msg}, line {e.lineno})") from None
  if not isinstance(records, list):
    raise TokenizerDataError(f"{path}: expected a JSON list of records, got "
                             f"{type(records).__name__}")
  for number, record in enumerate(records):
    messages = record.get("conversations") if isinstance(record, dict) else None
    if not isinstance(messages, list):
      raise TokenizerDataError(f"{path}: record {number} has no 'conversations' list")
    try:
      turns = conv.turns_from_records(messages, record_id=f"{path}: record {number}")
    except conv.ConversationError as e:
      raise TokenizerDataError(str(e)) from None
    for segment in conv.segments(turns):
      if segment.kind in (conv.SegmentKind.PROMPT, conv.SegmentKind.ANSWER):
        text = segment.text[1:] if segment.kind is conv.SegmentKind.ANSWER else segment.text
        if text.strip():
          yield text


def corpus(data_dir: str) -> list[str]:
  """The training sentences: the dataset's chunks, then the evaluation prompts as asked."""
  lines = []
  for path in training_files(data_dir):
    lines.extend(conversation_chunks(path))
  if not lines:
    raise TokenizerDataError(f"{data_dir}: the training JSON files hold no conversation text")
  # Evaluation always asks the FABA-Bench prompts; keep them encodable in few ids even if the
  # training templates hold them rarely.
  eval_chunks = [f"\n{q} {conv.ASSISTANT_ROLE}:" for q in instructions.EVAL_PROMPTS.values()]
  return lines + eval_chunks * max(1, len(lines) // 100)


def train_sentencepiece(sentences: Sequence[str], vocab_size: int,
                        multiword: bool = False) -> bytes:
  """The serialized model proto of a LLaMA-style BPE SentencePiece model.

  `multiword` lets pieces span spaces ("▁the▁person▁looks"), as LLaMA's do not: templated text
  then takes several times fewer ids.
  """
  import sentencepiece as spm  # pylint: disable=import-outside-toplevel

  if vocab_size < MIN_VOCAB_SIZE:
    raise ValueError(f"--vocab_size={vocab_size} must be >= {MIN_VOCAB_SIZE} (256 byte pieces + "
                     "3 special tokens + at least one merge)")
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(sentences), model_writer=model, vocab_size=vocab_size,
      model_type="bpe", byte_fallback=True, split_digits=True, unk_id=SPECIAL_IDS["unk"],
      bos_id=SPECIAL_IDS["bos"], eos_id=SPECIAL_IDS["eos"], pad_id=-1,
      normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=True,
      allow_whitespace_only_pieces=True, character_coverage=1.0,
      # A small corpus may support fewer merges than asked; the vocabulary is then smaller
      # (never larger), which any model with vocab_size >= it accepts.
      hard_vocab_limit=False, max_sentence_length=1 << 16, num_threads=1, minloglevel=2,
      split_by_whitespace=not multiword, max_sentencepiece_length=48 if multiword else 16)
  return model.getvalue()


def train_tokenizer(data_dir: str, output: str, vocab_size: int, multiword: bool = True) -> int:
  """Trains on `data_dir`'s training text and saves the tokenizer in `output`.

  Returns the vocabulary size of the saved tokenizer (at most `vocab_size`).
  """
  import transformers  # pylint: disable=import-outside-toplevel

  proto = train_sentencepiece(corpus(data_dir), vocab_size, multiword=multiword)
  # Load from a fresh folder: a tokenizer.json left in `output` by an earlier run would be
  # loaded instead of the new model.
  with tempfile.TemporaryDirectory() as tmp:
    with open(os.path.join(tmp, SP_MODEL_FILE), "wb") as f:
      f.write(proto)
    # LLaMA checkpoints add BOS (not EOS) when add_special_tokens=True.
    tokenizer = transformers.LlamaTokenizer.from_pretrained(tmp, add_bos_token=True,
                                                            add_eos_token=False)
  os.makedirs(output, exist_ok=True)
  tokenizer.save_pretrained(output)
  with open(os.path.join(output, SP_MODEL_FILE), "wb") as f:
    f.write(proto)
  return len(tokenizer)


def _define_flags():
  # Defined only when run as a program, so importing this module never clashes with other CLIs.
  from absl import flags  # pylint: disable=import-outside-toplevel
  flags.DEFINE_string("data_dir", None, "FABA-Instruct-layout folder with *train*.json files.",
                      required=True)
  flags.DEFINE_string("output", None, "Tokenizer folder to write.", required=True)
  flags.DEFINE_integer("vocab_size", 2047, "Vocabulary size at most (byte pieces included).")
  flags.DEFINE_bool("multiword", True, "Let pieces span spaces (shorter sequences).")
  return flags.FLAGS


def run() -> None:
  from absl import app  # pylint: disable=import-outside-toplevel
  flag_values = _define_flags()

  def main(argv):
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    size = train_tokenizer(flag_values.data_dir, flag_values.output, flag_values.vocab_size,
                           multiword=flag_values.multiword)
    print(f"tokenizer: {size} ids -> {flag_values.output}")

  app.run(main)


if __name__ == "__main__":
  run()
