"""ROUGE-L parity with the PyPI `rouge` 1.0.1 package (the scorer FABA-Bench's S_ge uses)."""

import random

import pytest
from rouge import Rouge

from emola_jax.evaluation import rouge_l as rl

_PACKAGE = Rouge(metrics=["rouge-l"])


def _package_scores(hyp: str, ref: str) -> dict[str, float]:
  return _PACKAGE.get_scores(hyp, ref)[0]["rouge-l"]


# Hand-picked texts that exercise each quirk of the package.
EDGE_PAIRS = [
    ("the cat sat", "the cat sat"),
    ("the the the cat", "the cat the cat"),  # repeated words: counts are of distinct tokens
    ("a b c d e", "e d c b a"),  # reversed: LCS 1, which token depends on the tie-break
    ("a b. c d. e f.", "c d. a b. f e."),  # several sentences on both sides: union LCS
    ("x y z. a b c", "a b c. x y z"),
    ("a. . b", "a b"),  # white-space-only sentence keeps an empty-string token
    ("a . b", "a  .  b ."),  # same on the reference side; "" matches ""
    ("   ", "a"),  # a white-space-only hypothesis is one sentence with token ""
    ("Happy, smiling!", "happy smiling"),  # no lower-casing, punctuation other than "." stays
    ("The person is happy.\nShe smiles.", "The person is happy. She smiles."),  # newlines
    ("e.g. this i.e. that", "this that"),  # dots inside abbreviations split sentences
    ("AU1, AU2 and AU4.", "AU1, AU2, AU4 are present."),
    ("b a b a b a", "a b a b a b"),  # many equal-length LCS, the tie-break decides the tokens
    ("q w e r t y", "z x c v b n"),  # nothing in common: F = 0
    ("a\tb\u00a0c", "a b c"),  # tabs and no-break spaces are white space for str.split()
    ("word", "word."),
    ("...a...b...", "b a"),
    ("x y x z y x", "y x z x y"),
]


@pytest.mark.parametrize("hyp,ref", EDGE_PAIRS)
def test_matches_package_on_edge_cases(hyp, ref):
  ours = rl.rouge_l(hyp, ref)
  theirs = _package_scores(hyp, ref)
  assert ours.f == theirs["f"]
  assert ours.p == theirs["p"]
  assert ours.r == theirs["r"]


def test_matches_package_on_random_texts():
  rng = random.Random(0)
  # A small vocabulary makes repeated tokens, ties and shared sentences common.
  vocab = ["a", "b", "c", "the", "face", "smile", "AU12", "happy,", "", " "]
  separators = [" ", " ", " ", ". ", ".", "  ", "\n", ". . "]

  def text(max_words):
    words = [rng.choice(vocab) for _ in range(rng.randint(1, max_words))]
    return "".join(w + rng.choice(separators) for w in words).strip(" ") or "a"

  for _ in range(400):
    hyp, ref = text(25), text(25)
    ours = rl.rouge_l(hyp, ref)
    theirs = _package_scores(hyp, ref)
    assert (ours.f, ours.p, ours.r) == (theirs["f"], theirs["p"], theirs["r"]), (hyp, ref)


def test_hand_computed_value():
  # ref tokens {the, cat, sat, on, mat} (m = 5), hyp tokens {the, cat, lay, on, a, mat} (n = 6).
  # One sentence each, LCS "the cat on mat" = 4 -> P = 4/6, R = 4/5, F = 2PR / (P + R + 1e-8).
  result = rl.rouge_l("the cat lay on a mat", "the cat sat on the mat")
  p, r = 4 / 6, 4 / 5
  assert result.p == pytest.approx(p, abs=1e-15)
  assert result.r == pytest.approx(r, abs=1e-15)
  assert result.f == pytest.approx(2 * p * r / (p + r + 1e-8), abs=1e-15)


def test_union_over_sentences_hand_computed():
  # Reference sentence "w1 w2 w3 w4 w5" against hypothesis sentences "w1 w2 w6 w7 w8" and
  # "w1 w3 w8 w9 w5": LCSs "w1 w2" and "w1 w3 w5", union {w1, w2, w3, w5} = 4 (Lin 2004's example).
  # Distinct hypothesis tokens: w1 w2 w6 w7 w8 w3 w9 w5 = 8, reference tokens: 5.
  result = rl.rouge_l("w1 w2 w6 w7 w8. w1 w3 w8 w9 w5", "w1 w2 w3 w4 w5")
  assert result.r == 4 / 5
  assert result.p == 4 / 8


@pytest.mark.parametrize("hyp,ref", [("", "a"), ("a", ""), ("...", "a"), ("a", ".")])
def test_empty_texts_raise_like_the_package(hyp, ref):
  with pytest.raises(ValueError):
    _package_scores(hyp, ref)
  with pytest.raises(rl.EmptyTextError):
    rl.rouge_l(hyp, ref)


def test_recursion_limit_matches_package():
  """The package raises RecursionError exactly where our computed depth crosses one threshold."""
  # Measure the threshold of this call site with one family of texts (no common token: the
  # reconstruction walks along the hypothesis only), then check other families against it.
  def package_raises(hyp, ref):
    try:
      _package_scores(hyp, ref)
      return False
    except RecursionError:
      return True

  def no_match(n):
    return " ".join(f"h{i}" for i in range(n)), "x"

  lo, hi = 10, 3000
  while lo < hi:  # largest n that passes
    mid = (lo + hi + 1) // 2
    if package_raises(*no_match(mid)):
      hi = mid - 1
    else:
      lo = mid
  threshold = rl.lcs_recursion_depth(*no_match(lo))
  assert rl.lcs_recursion_depth(*no_match(lo + 1)) == threshold + 1

  # Other shapes: matches (diagonal steps), moves along the reference, mixed sentences.
  rng = random.Random(1)
  families = []
  for _ in range(12):
    k = rng.randint(0, 60)
    common = [f"c{i}" for i in range(k)]
    ref_words = [w for c in common for w in (c, f"r{c}")][: rng.randint(k, 2 * k + 1)] or ["z"]
    target = threshold - rng.randint(-3, 3)
    extra = max(1, target - len(ref_words))
    hyp_words = common + [f"h{i}" for i in range(extra)]
    rng.shuffle(hyp_words)
    families.append((" ".join(hyp_words) + ". short one", " ".join(ref_words) + ". x y"))
  seen = set()
  for hyp, ref in families:
    depth = rl.lcs_recursion_depth(hyp, ref)
    expected = depth > threshold
    seen.add(expected)
    assert package_raises(hyp, ref) == expected, (depth, threshold)
    if expected:
      with pytest.raises(rl.RecursionLimitError):
        rl.rouge_l(hyp, ref, max_recursion_depth=threshold)
    else:
      assert rl.rouge_l(hyp, ref, max_recursion_depth=threshold).f == _package_scores(hyp, ref)["f"]
  assert seen == {True, False}  # both sides of the threshold were exercised


def test_default_depth_and_no_limit():
  hyp = " ".join(f"h{i}" for i in range(rl.REFERENCE_MAX_RECURSION_DEPTH))  # depth = len + 1
  assert rl.lcs_recursion_depth(hyp, "x") == rl.REFERENCE_MAX_RECURSION_DEPTH + 1
  with pytest.raises(rl.RecursionLimitError):
    rl.rouge_l(hyp, "x")
  assert rl.rouge_l(hyp, "x", max_recursion_depth=None).f == 0.0
  short = " ".join(f"h{i}" for i in range(rl.REFERENCE_MAX_RECURSION_DEPTH - 1))
  assert rl.rouge_l(short, "x").f == 0.0


def test_rejects_non_strings():
  with pytest.raises(TypeError, match="hypothesis"):
    rl.rouge_l(None, "a")
