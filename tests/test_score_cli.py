"""emola-score end to end: the hand-derived cases of the parser tests, scored through the CLI.

This is the acceptance check of the reference protocol: S_re is recomputed here from the classes
and AU sets derived by hand in test_emotion_scoring.py / test_au_scoring.py, S_ge from the PyPI
`rouge` package (the published S_ge scorer), and both must equal what the CLI prints.
"""

import json
import os
import subprocess
import sys

import pytest
from rouge import Rouge


from tests import test_au_scoring
from tests import test_emotion_scoring

_SCRIPT = os.path.join(os.path.dirname(sys.executable), "emola-score")
_COMMAND = [_SCRIPT] if os.path.exists(_SCRIPT) else [sys.executable, "-m", "emola_jax.cli.score"]
_FABA_AUS = (1, 2, 4, 5, 6, 10, 12, 17, 24, 25, 26, 43)
_REFERENCE_TEXT = "The person looks happy. AU6 and AU12 are active. The mouth is relaxed."


def _write_jsonl(path, records, extra_lines=()):
  with open(path, "w", encoding="utf-8") as stream:
    for record in records:
      stream.write(json.dumps(record) + "\n")
    for line in extra_lines:
      stream.write(line + "\n")
  return str(path)


def _cli(*args):
  return subprocess.run(_COMMAND + list(args), capture_output=True, text=True, timeout=60)


def _package_s_ge(records):
  """Mean ROUGE-L F (x100) by the `rouge` package, skipping the samples it raises on."""
  scores = []
  for record in records:
    try:
      scores.append(Rouge().get_scores(record["prediction"], record["reference"])[0]
                    ["rouge-l"]["f"])
    except (ValueError, RecursionError):
      pass
  return 100 * sum(scores) / len(scores), len(records) - len(scores)


def test_emotion_reference_matches_hand_derived(tmp_path):
  cases = test_emotion_scoring.REFERENCE_CASES
  assert len(cases) >= 50
  # Labels cycle through the classes (as names, indices and digit strings), so that some answers
  # are right and some wrong.
  names = ["Happiness", "sadness", 2, "3", "NEUTRAL", 5, "Fear"]
  records = [{"prediction": text, "label": names[i % 7], "reference": _REFERENCE_TEXT, "id": i}
             for i, (text, _, _) in enumerate(cases)]
  path = _write_jsonl(tmp_path / "emotion.jsonl", records)
  run = _cli("--task=emotion", f"--predictions={path}", "--protocol=reference")
  assert run.returncode == 0, run.stderr
  result = json.loads(run.stdout)

  expected_classes = [expected for _, expected, _ in cases]
  correct = sum(expected == i % 7 for i, expected in enumerate(expected_classes))
  confusion = [[0] * 7 for _ in range(7)]
  for i, expected in enumerate(expected_classes):
    confusion[i % 7][expected] += 1
  s_ge, skipped = _package_s_ge(records)
  assert result["S_re"] == pytest.approx(100 * correct / len(cases), abs=1e-12)
  assert result["confusion"] == confusion
  assert result["S_ge"] == pytest.approx(s_ge, abs=1e-12)
  assert result["n_rouge_skipped"] == skipped == 1  # the empty answer
  assert result["S_rege"] == pytest.approx(result["S_re"] + s_ge, abs=1e-12)
  assert result["n"] == len(cases) and result["protocol"] == "reference"


def test_au_reference_matches_hand_derived(tmp_path):
  cases = test_au_scoring.REFERENCE_CASES
  assert len(cases) >= 50
  # Even samples: label = the hand-derived set itself (a hit); odd samples: one rotating AU.
  labels = [sorted(expected & set(_FABA_AUS)) if i % 2 == 0 else [_FABA_AUS[i % 12]]
            for i, (_, expected, _) in enumerate(cases)]
  records = [{"prediction": text, "label": ", ".join(map(str, label)), "reference": _REFERENCE_TEXT}
             for (text, _, _), label in zip(cases, labels)]
  path = _write_jsonl(tmp_path / "au.jsonl", records)
  run = _cli("--task=au", f"--predictions={path}")
  assert run.returncode == 0, run.stderr
  result = json.loads(run.stdout)

  f1s, left_out = {}, []
  for au in _FABA_AUS:
    truth = [au in label for label in labels]
    guess = [au in expected for _, expected, _ in cases]
    if len(set(truth) | set(guess)) == 1:
      left_out.append(au)
      continue
    tp = sum(t and g for t, g in zip(truth, guess))
    fp = sum(g and not t for t, g in zip(truth, guess))
    fn = sum(t and not g for t, g in zip(truth, guess))
    f1s[au] = 100 * 2 * tp / (2 * tp + fp + fn) if tp else 0.0
  assert result["left_out_aus"] == left_out
  for au, f1 in f1s.items():
    assert result["per_au_f1"][str(au)] == pytest.approx(f1, abs=1e-12), au
  assert result["S_re"] == pytest.approx(sum(f1s.values()) / len(f1s), abs=1e-12)
  s_ge, skipped = _package_s_ge(records)
  assert result["S_ge"] == pytest.approx(s_ge, abs=1e-12)
  assert result["n_rouge_skipped"] == skipped


def _json(*args):
  run = _cli(*args)
  assert run.returncode == 0, run.stderr
  return json.loads(run.stdout)


def test_strict_protocol_and_au_presets(tmp_path):
  records = [{"prediction": "AU 9 and AU06 are active; no AU4.", "label": "4, 6, 9",
              "reference": "AU4, AU6 and AU9."}]
  path = _write_jsonl(tmp_path / "au.jsonl", records)
  result = _json("--task=au", f"--predictions={path}", "--protocol=strict", "--aus=disfa")
  assert result["protocol"] == "strict" and result["aus"] == [1, 2, 4, 6, 9, 12, 25, 26]
  # 6 and 9 found (spaced / zero-padded forms), 4 negated; other AUs never occur: left out.
  assert result["per_au_f1"]["6"] == result["per_au_f1"]["9"] == 100.0
  assert result["per_au_f1"]["4"] == 0.0
  assert result["S_re"] == pytest.approx(200 / 3)
  assert result["predictions"] == path
  result = _json("--task=au", f"--predictions={path}", "--aus=6,9")
  assert result["aus"] == [6, 9] and result["protocol"] == "reference"
  assert result["per_au_f1"] == {"6": 0.0, "9": 0.0}  # "AU06", "AU 9" are missed: FN only


def _fails(*args):
  run = _cli(*args)
  assert run.returncode != 0 and run.stdout == ""
  return run.stderr


def test_malformed_json_line_is_named(tmp_path):
  good = {"prediction": "happy", "label": 0, "reference": "happy"}
  path = _write_jsonl(tmp_path / "bad.jsonl", [good], extra_lines=["", '{"prediction": "x",'])
  assert f"{path}:3: not valid JSON" in _fails("--task=emotion", f"--predictions={path}")


def test_bad_records_are_named(tmp_path):
  good = {"prediction": "happy", "label": 0, "reference": "happy"}
  path = _write_jsonl(tmp_path / "missing.jsonl", [good, good, {"prediction": "x", "label": 1}])
  assert f"{path}:3: the record has no 'reference' key" in _fails(
      "--task=emotion", f"--predictions={path}")
  path = _write_jsonl(tmp_path / "label.jsonl", [good, {**good, "label": "Joy"}])
  assert f"{path}:2: emotion label 'Joy'" in _fails("--task=emotion", f"--predictions={path}")


def test_flag_errors(tmp_path):
  path = _write_jsonl(tmp_path / "ok.jsonl", [{"prediction": "a", "label": 0, "reference": "a"}])
  assert "--aus applies to --task=au only" in _fails(
      "--task=emotion", f"--predictions={path}", "--aus=1,2")
  assert "--aus: AU list '1,x'" in _fails("--task=au", f"--predictions={path}", "--aus=1,x")
  assert "cannot read --predictions" in _fails(
      "--task=emotion", f"--predictions={tmp_path / 'absent.jsonl'}")
