"""ROUGE-L F1 exactly as the PyPI `rouge` 1.0.1 package computes it (FABA-Bench S_ge).

FABA-Bench's S_ge is `Rouge().get_scores(hyp, ref)[0]["rouge-l"]["f"]`. That number is a
summary-level union-LCS score with several quirks, all reproduced here:

* sentences are the pieces of `text.split(".")` that are non-empty *before* white space is
  normalised, so a white-space-only piece ("a. . b") survives as a sentence whose single token is
  the empty string "";
* tokens are the result of splitting each white-space-normalised sentence on " " (no lower-casing,
  no stemming, punctuation other than "." stays attached to words);
* m and n are the numbers of *distinct* tokens in the reference and the hypothesis;
* for every (reference sentence, hypothesis sentence) pair ONE longest common subsequence is
  reconstructed, with the package's tie-break (diagonal on a match, else up when the cell above is
  strictly larger, else left), and the union of the *distinct* tokens of all those subsequences is
  the LCS count;
* P = LCS / n, R = LCS / m, F = 2PR / (P + R + 1e-8).

The package raises, and the reference evaluator then skips the sample, in two cases reproduced as
exceptions of ours: a text with no sentence at all ("" or only dots; `EmptyTextError`) and a
reconstruction deeper than Python's recursion limit, because the package reconstructs each
subsequence recursively (`RecursionLimitError`). This module itself never recurses.
"""

from __future__ import annotations

import dataclasses

# Python's default recursion limit (1000 frames) less the 8 frames that sit above the package's
# recursive helper when an evaluation script calls `Rouge().get_scores` from its evaluation
# function (script, evaluation function, get_scores, _get_scores, metric lambda,
# rouge_l_summary_level, _union_lcs, _recon_lcs). Measured with rouge 1.0.1 on CPython 3.11.
REFERENCE_MAX_RECURSION_DEPTH = 992

_EPS = 1e-8


class RougeError(ValueError):
  """A text pair the `rouge` package cannot score (the reference evaluator skips such samples)."""


class EmptyTextError(RougeError):
  """The hypothesis or the reference has no sentence: it is empty or consists only of dots."""

  def __init__(self, message: str, role: str):
    super().__init__(message)
    self.role = role  # "hypothesis" or "reference"


class RecursionLimitError(RougeError):
  """The package's recursive LCS reconstruction would exceed Python's recursion limit."""


@dataclasses.dataclass(frozen=True)
class RougeL:
  """ROUGE-L scores of one pair, as fractions in [0, 1] (f has the package's 1e-8 in it)."""

  f: float
  p: float
  r: float


def split_sentences(text: str) -> list[list[str]]:
  """Splits a text into sentences of tokens the way the package prepares hypotheses/references."""
  # Empty pieces are dropped before white space is normalised: that is what keeps "" tokens alive.
  pieces = [piece for piece in text.split(".") if piece]
  return [" ".join(piece.split()).split(" ") for piece in pieces]


def _lcs_lengths(x: list[str], y: list[str]) -> list[list[int]]:
  """table[i][j] = length of the LCS of x[:i] and y[:j]."""
  table = [[0] * (len(y) + 1)]
  for i in range(1, len(x) + 1):
    row = [0] * (len(y) + 1)
    above = table[i - 1]
    xi = x[i - 1]
    for j in range(1, len(y) + 1):
      if xi == y[j - 1]:
        row[j] = above[j - 1] + 1
      else:
        row[j] = above[j] if above[j] > row[j - 1] else row[j - 1]
    table.append(row)
  return table


def _reconstruct(x: list[str], y: list[str]) -> tuple[list[str], int]:
  """One LCS of x (reference) and y (hypothesis) with the package's tie-break, and the call depth.

  The depth is how many nested calls the package's recursive reconstruction makes: one for the
  first call plus one per step until a sequence is exhausted.
  """
  table = _lcs_lengths(x, y)
  i, j = len(x), len(y)
  tokens = []
  depth = 1
  while i > 0 and j > 0:
    depth += 1
    if x[i - 1] == y[j - 1]:
      tokens.append(x[i - 1])
      i -= 1
      j -= 1
    elif table[i - 1][j] > table[i][j - 1]:
      i -= 1
    else:
      j -= 1
  return tokens, depth


def _sentences_or_raise(text: str, role: str) -> list[list[str]]:
  if not isinstance(text, str):
    raise TypeError(f"ROUGE-L {role} must be a string, got {type(text).__name__}")
  sentences = split_sentences(text)
  if not sentences:
    raise EmptyTextError(
        f"the {role} {text!r} has no sentence (it is empty or only dots); the rouge package "
        "raises on it and the reference evaluator skips the sample", role)
  return sentences


def lcs_recursion_depth(hypothesis: str, reference: str) -> int:
  """The deepest recursion the `rouge` package would reach on this pair (no limit applied)."""
  hyp = _sentences_or_raise(hypothesis, "hypothesis")
  ref = _sentences_or_raise(reference, "reference")
  return max(_reconstruct(r, h)[1] for r in ref for h in hyp)


def rouge_l(hypothesis: str, reference: str, *,
            max_recursion_depth: int | None = REFERENCE_MAX_RECURSION_DEPTH) -> RougeL:
  """Summary-level ROUGE-L of `hypothesis` against `reference`, as `rouge` 1.0.1 computes it.

  Args:
    hypothesis: the generated text.
    reference: the reference text.
    max_recursion_depth: raise `RecursionLimitError` where the package's recursive reconstruction
      would go deeper than this (the package raises RecursionError there); None never raises.

  Raises:
    EmptyTextError: either text has no sentence.
    RecursionLimitError: see `max_recursion_depth`.
  """
  hyp = _sentences_or_raise(hypothesis, "hypothesis")
  ref = _sentences_or_raise(reference, "reference")
  m = len({token for sentence in ref for token in sentence})
  n = len({token for sentence in hyp for token in sentence})
  union: set[str] = set()
  for ref_sentence in ref:
    for hyp_sentence in hyp:
      tokens, depth = _reconstruct(ref_sentence, hyp_sentence)
      if max_recursion_depth is not None and depth > max_recursion_depth:
        raise RecursionLimitError(
            f"a sentence pair of {len(ref_sentence)} reference and {len(hyp_sentence)} hypothesis "
            f"tokens needs recursion depth {depth} > {max_recursion_depth}; the rouge package "
            "raises RecursionError on it and the reference evaluator skips the sample")
      union.update(tokens)
  lcs = len(union)
  recall = lcs / m
  precision = lcs / n
  f1 = 2.0 * ((precision * recall) / (precision + recall + _EPS))
  return RougeL(f=f1, p=precision, r=recall)


def rouge_l_f1(hypothesis: str, reference: str, *,
               max_recursion_depth: int | None = REFERENCE_MAX_RECURSION_DEPTH) -> float:
  """`rouge_l(...).f`: the number FABA-Bench averages (before the x100)."""
  return rouge_l(hypothesis, reference, max_recursion_depth=max_recursion_depth).f
