"""AU parsing and scoring, against AU sets and F1 values derived by hand from the FABA-Bench rules.

Reference rule (EMOLA_FACTS.md section 5): predicted AUs are the digit strings of every match of
`AU(\\d+)` (case-sensitive, no space, no negation handling), compared as strings with the label
split on ", "; per-AU F1 from the 2x2 confusion matrix, 0 without true positives; an AU with one
single value across all targets and predictions is left out of the mean.
"""

import pytest

from emola_jax.evaluation import au_parse as ap
from emola_jax.evaluation import scoring

# (text, AUs under the reference protocol, why)
REFERENCE_CASES = [
    ("AU1 and AU2 are present.", {1, 2}, "two plain mentions"),
    ("AU 12 is present.", set(), "a space between AU and the number does not match"),
    ("AU06 is visible.", set(), "'06' is not the string '6'"),
    ("au12 is active", set(), "lower case does not match"),
    ("No AU4 is visible.", {4}, "no negation handling"),
    ("AU4 is not present.", {4}, "no negation handling"),
    ("The absence of AU9 and AU15.", {9, 15}, "no negation handling"),
    ("AU45 shows a blink.", {45}, "digits are taken greedily: 45, not 4"),
    ("AU12AU6", {12, 6}, "matches may touch"),
    ("FAU7 is a typo.", {7}, "no word boundary before AU"),
    ("AU1,2 raised", {1}, "only the digits right after 'AU'"),
    ("AU1-AU2", {1, 2}, "hyphenated pair"),
    ("AU25/26", {25}, "'26' has no 'AU' before it"),
    ("(AU9)", {9}, "parentheses"),
    ("AU 4, AU5", {5}, "the spaced one is missed"),
    ("AU17.", {17}, "end of sentence"),
    ("AU-4 is raised.", set(), "a hyphen between AU and the number does not match"),
    ("Action Unit 12 is active.", set(), "spelled out: no match"),
    ("AU10 AU10 AU10", {10}, "repeats count once"),
    ("", set(), "empty answer"),
    ("AU", set(), "no digits"),
    ("AUs 1 and 2 are active.", set(), "'AUs' is followed by 's'"),
    ("AU0", {0}, "AU0 is a (non-evaluated) number"),
    ("AU\u0661\u0662", set(), "Arabic-Indic digits match \\d but are not the string '12'"),
    ("AU24\nAU43", {24, 43}, "across a line break"),
    ("AU 25AU26", {26}, "the spaced 25 is missed, the glued 26 is found"),
    ("Au12", set(), "mixed case does not match"),
    ("AU012", set(), "'012' is not '12'"),
    ("AU1AU2AU4AU5AU6", {1, 2, 4, 5, 6}, "a run of mentions"),
    ("AU12 (Lip Corner Puller) and AU6 (Cheek Raiser) are active.", {6, 12}, "names in brackets"),
    ("AU4AU", {4}, "trailing AU without digits"),
    ("AU100", {100}, "any number of digits"),
    ("xAU5y", {5}, "letters around"),
    ("AU_5", set(), "underscore does not match"),
    ("AU5.AU6", {5, 6}, "no space after the full stop"),
    ("AU\t5", set(), "tab does not match"),
    ("Neither AU1 nor AU2 is active.", {1, 2}, "no negation handling"),
    ("AU2, AU2 and AU02", {2}, "'02' is ignored, '2' counted once"),
    ("The eyes are wide (AU5) and the jaw drops (AU26).", {5, 26}, "in brackets mid-sentence"),
    ("AU12 is intense (AU12E).", {12}, "intensity letter after the digits"),
    ("AU6+AU12", {6, 12}, "plus sign"),
    ("AU 6 + AU 12", set(), "spaced mentions"),
    ("AU7 AU 7", {7}, "one glued, one spaced"),
    ("AU43: eyes closed", {43}, "colon after"),
    ("AUAU4", {4}, "only the AU right before the digits counts"),
    ("AU1 AU2 AU4 AU5 AU6 AU10 AU12 AU17 AU24 AU25 AU26 AU43",
     {1, 2, 4, 5, 6, 10, 12, 17, 24, 25, 26, 43}, "all twelve"),
    ("AU9 wrinkles the nose; AU10 raises the lip.", {9, 10}, "semicolon"),
    ("AU 1AU2", {2}, "spaced then glued"),
    ("The AU set is AU14.", {14}, "'AU set' has no digits"),
    ("AU15\u00a0AU17", {15, 17}, "no-break space between mentions"),
    ("AU١٢ and AU12", {12}, "the Arabic-Indic one is ignored"),
    ("AU05AU5", {5}, "'05' ignored, '5' counted"),
]

# (label, target AUs under the reference protocol, label pieces that name no AU)
REFERENCE_LABELS = [
    ("1, 2, 4", {1, 2, 4}, ()),
    ("1,2,4", set(), ("1,2,4",)),  # not split: one piece that is no AU
    ("12", {12}, ()),
    ("", set(), ()),
    ("1, 2, ", {1, 2}, ()),  # trailing empty piece is not reported
    ("04, 5", {5}, ("04",)),
    ("1,  2", {1}, (" 2",)),  # the second piece keeps a space
    (12, {12}, ()),
    ("AU1, AU2", set(), ("AU1", "AU2")),
    (["1", 2], {1, 2}, ()),
]

# (text, AUs under the strict protocol, why)
STRICT_CASES = [
    ("AU 12 is present.", {12}, "a space is allowed"),
    ("AU06 is visible.", {6}, "leading zero read as 6"),
    ("au12 is active", {12}, "any case"),
    ("No AU4 is visible.", set(), "negated sentence"),
    ("AU4 is not present.", set(), "negated sentence"),
    ("There is an absence of AU 9.", set(), "'absence' negates"),
    ("AU6 and AU12 are active, but AU4 is absent.", {6, 12}, "'but' starts a new clause"),
    ("Action Unit 25 (Lips Part) is visible.", {25}, "spelled out"),
    ("FAU7 is a typo.", set(), "glued to a preceding letter: no mention"),
    ("AU1 (Inner Brow Raiser), AU2 (Outer Brow Raiser), and AU4 (Brow Lowerer) are not "
     "activated.", set(), "commas inside an AU list do not cut the negated clause"),
    ("AU12 is present, suggesting the person is not sad.", {12},
     "a comma before a non-AU word cuts the clause"),
    ("There is no sign of tension, and AU6 is active.", {6}, "the negation stays in clause 1"),
    ("AU4 isn't visible; AU7 is.", {7}, "';' cuts; 'isn't' negates"),
    ("AU4 isn\u2019t visible.", set(), "typographic apostrophe"),
    ("AU5 is present. AU5 is not strong.", {5}, "one non-negated mention is enough"),
    ("Neither AU1 nor AU2 is active, while AU26 is.", {26}, "'while' cuts"),
    ("AU-10 and AU_17 and AU#24", {10, 17, 24}, "separators between AU and the number"),
    ("AU45 shows a blink.", {45}, "greedy digits as in the reference"),
    ("Lack of AU15; AU17 present", {17}, "'lack' negates"),
    ("Without AU 43, the eyes stay open; AU 5 is raised.", {5}, "'without' negates its clause"),
    ("AU12\nAU4 not visible", {12}, "line break ends a sentence"),
    ("action units 1 and 2", {1}, "only the number right after the head"),
    ("AUs 1 and 2 are active.", set(), "'AUs' lists are not read"),
    ("AU6 AU12 inactive", set(), "'inactive' negates"),
    ("AU12 is active although AU6 is absent", {12}, "'although' cuts"),
    ("AU012", {12}, "leading zero"),
    ("The AU1 (Inner Brow Raiser, Frontalis) is raised, AU4 is not.", {1},
     "a comma inside brackets never cuts; the one after 'raised' does"),
    ("No AU4, AU6 is present.", set(),
     "documented limit: a comma between two AU mentions never cuts, so AU6 shares the negation"),
]


def test_enough_hand_derived_cases():
  assert len(REFERENCE_CASES) >= 50
  assert len({text for text, _, _ in REFERENCE_CASES}) == len(REFERENCE_CASES)


@pytest.mark.parametrize("text,expected,why", REFERENCE_CASES)
def test_reference_protocol(text, expected, why):
  assert ap.parse_au_prediction(text, "reference").aus == frozenset(expected), why


@pytest.mark.parametrize("text,expected,why", STRICT_CASES)
def test_strict_protocol(text, expected, why):
  assert ap.parse_au_prediction(text, "strict").aus == frozenset(expected), why


def test_parse_details():
  ref = ap.parse_au_prediction("AU06 and AU6, AU 7", "reference")
  assert ref.n_mentions == 2 and ref.ignored == ("06",) and ref.aus == {6}
  strict = ap.parse_au_prediction("AU6 is active. No AU4 or AU 9.", "strict")
  assert strict.n_mentions == 3 and strict.negated == {4, 9} and strict.aus == {6}
  # ";" ends a sentence, "but" starts a clause, the list commas do not cut, the comma after
  # "absent" does (leaving an empty clause, dropped).
  assert ap.strict_clauses("AU1, AU2 and AU4 are absent, but AU6 shows; AU7.") == [
      "AU1, AU2 and AU4 are absent", " AU6 shows", " AU7."]


@pytest.mark.parametrize("label,expected,ignored", REFERENCE_LABELS)
def test_reference_labels(label, expected, ignored):
  assert ap.parse_au_label(label, "reference") == (frozenset(expected), ignored)


@pytest.mark.parametrize("label,expected", [
    ("1, 2, 4", {1, 2, 4}), ("1,2,4", {1, 2, 4}), ("04, 5", {4, 5}), ("AU1, AU 2", {1, 2}),
    ("1;2 + 4", {1, 2, 4}), ("", set()), (12, {12}), ([1, "2"], {1, 2}), (" 6 ", {6})])
def test_strict_labels(label, expected):
  assert ap.parse_au_label(label, "strict") == (frozenset(expected), ())


@pytest.mark.parametrize("label", ["1, two", "AU", "1.5", None, True, 1.0, [1, None]])
def test_bad_strict_labels(label):
  with pytest.raises(ValueError):
    ap.parse_au_label(label, "strict")


def test_au_lists():
  assert ap.parse_au_list("faba") == (1, 2, 4, 5, 6, 10, 12, 17, 24, 25, 26, 43)
  assert ap.parse_au_list("DISFA") == (1, 2, 4, 6, 9, 12, 25, 26)
  assert ap.parse_au_list("bp4d") == (1, 2, 4, 6, 7, 10, 12, 14, 15, 17, 23, 24)
  assert ap.parse_au_list("gft") == (1, 2, 4, 6, 10, 12, 14, 15, 23, 24)
  assert ap.parse_au_list("1, 2,4") == (1, 2, 4)
  for bad in ("1,x", "1,,2", "1,1", "emotion"):
    with pytest.raises(ValueError):
      ap.parse_au_list(bad)


# A small set whose scores are computed by hand, evaluated on AUs 1, 2, 4, 6.
AGGREGATE_RECORDS = [
    {"prediction": "AU1 and AU2 are active.", "label": "1, 2",
     "reference": "AU1 and AU2 are active."},  # ROUGE: identical, P = R = 1
    {"prediction": "AU1 is active. No AU4.", "label": "1, 4",
     "reference": "AU1 is active."},  # ROUGE: m = 3, n = 5 ({AU1,is,active,No,AU4}), LCS 3
    {"prediction": "AU 2 is visible.", "label": "2",
     "reference": "AU2 is visible."},  # ROUGE: {AU,2,is,visible} vs {AU2,is,visible}: LCS 2
    {"prediction": "Nothing notable.", "label": "",
     "reference": "."},  # the reference has no sentence: ROUGE skipped in both protocols
]


def _f(p, r):
  return 2.0 * ((p * r) / (p + r + 1e-8))


def test_aggregate_reference():
  # AU1: targets T T F F, predictions T T F F: TP 2 -> F1 1.
  # AU2: targets T F T F, predictions T F F F ("AU 2" missed): TP 1, FN 1 -> F1 2/3.
  # AU4: targets F T F F, predictions F T F F ("No AU4" counts): TP 1 -> F1 1.
  # AU6: never present, never predicted: one class only -> left out.
  result = scoring.score_au(AGGREGATE_RECORDS, "reference", aus=(1, 2, 4, 6))
  assert result["per_au_f1"] == {
      "1": 100.0, "2": pytest.approx(200 / 3), "4": 100.0, "6": None}
  assert result["left_out_aus"] == [6]
  assert result["S_re"] == pytest.approx((100 + 200 / 3 + 100) / 3)
  s_ge = 100 * (_f(1, 1) + _f(3 / 5, 3 / 3) + _f(2 / 4, 2 / 3)) / 3
  assert result["S_ge"] == pytest.approx(s_ge, abs=1e-12)
  assert result["S_rege"] == pytest.approx(result["S_re"] + s_ge, abs=1e-12)
  assert result["per_au_counts"]["2"] == {"tp": 1, "fp": 0, "fn": 1, "tn": 2}
  assert result["n"] == 4 and result["n_rouge_skipped"] == 1
  assert result["rouge_skipped"]["empty_reference"] == 1
  assert result["n_parse_failures"] == 2  # "AU 2 ..." and "Nothing notable."
  assert result["aus"] == [1, 2, 4, 6]


def test_aggregate_strict():
  # AU1: TP 2 -> 1. AU2: "AU 2" now read: TP 2 -> 1. AU4: "No AU4" dropped: TP 0, FN 1 -> 0.
  result = scoring.score_au(AGGREGATE_RECORDS, "strict", aus=(1, 2, 4, 6))
  assert result["per_au_f1"] == {"1": 100.0, "2": 100.0, "4": 0.0, "6": None}
  assert result["S_re"] == pytest.approx(200 / 3)
  assert result["n_negated_mentions_dropped"] == 1
  assert result["n_parse_failures"] == 1


def test_single_class_rule():
  # AU12 present in every label and every prediction: the reference's confusion matrix is 1x1,
  # so AU12 is left out although it is perfect; strict keeps it (F1 100). AU4: FP only -> 0.
  records = [
      {"prediction": "AU12", "label": "12", "reference": "x"},
      {"prediction": "AU12 AU4", "label": "12", "reference": "x"},
  ]
  ref = scoring.score_au(records, "reference", aus=(4, 12))
  assert ref["left_out_aus"] == [12] and ref["per_au_f1"] == {"4": 0.0, "12": None}
  assert ref["S_re"] == 0.0
  strict = scoring.score_au(records, "strict", aus=(4, 12))
  assert strict["left_out_aus"] == [] and strict["per_au_f1"] == {"4": 0.0, "12": 100.0}
  assert strict["S_re"] == 50.0


def test_default_aus_and_all_left_out():
  records = [{"prediction": "AU9", "label": "9", "reference": "AU9"}]
  result = scoring.score_au(records)  # FABA's 12 AUs; 9 is not one of them
  assert result["aus"] == list(ap.FABA_AUS)
  assert result["left_out_aus"] == list(ap.FABA_AUS)
  assert result["S_re"] is None and result["S_rege"] is None  # nothing to average: no number


def test_label_pieces_reported():
  records = [{"prediction": "AU1", "label": "1,2", "reference": "x"}]
  result = scoring.score_au(records, "reference", aus=(1, 2))
  assert result["label_pieces_ignored"] == ["record 1: ['1,2']"]
  assert result["per_au_counts"]["1"]["fp"] == 1


def test_bad_records_are_named():
  with pytest.raises(scoring.RecordError, match="record 1: AU label"):
    scoring.score_au([{"prediction": "AU1", "label": "1, x", "reference": "x"}], "strict")
  with pytest.raises(scoring.RecordError, match="record 1: the record has no 'prediction'"):
    scoring.score_au([{"label": "1", "reference": "x"}])
  with pytest.raises(ValueError, match="AU list"):
    scoring.score_au([{"prediction": "AU1", "label": "1", "reference": "x"}], aus=(1, 1))
