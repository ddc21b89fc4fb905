"""emola-eval's report: fold averaging by hand, the PNG plots looked at, report.md tables."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from emola_jax.evaluation import report
from emola_jax.evaluation import scoring

# matplotlib's "Blues" colour map ends at this RGB (its value 1.0); "tab:blue" bars.
DARKEST_BLUE = np.array([8, 48, 107])
TAB_BLUE = np.array([31, 119, 180])
CLASSES = ["Happiness", "Sadness", "Surprise", "Anger", "Neutral", "Disgust", "Fear"]


def _au(prediction: str, label: str) -> dict:
  return {"prediction": prediction, "label": label, "reference": "AU1 is active."}


def _fold_scores():
  # Fold A: AU1 TP, FN -> F1 2/3; AU2 FP -> F1 0; AU4 never present nor predicted -> left out.
  fold_a = scoring.score_au([_au("AU1 AU2", "1"), _au("nothing", "1")], "reference", (1, 2, 4))
  # Fold B: AU1 present in every target and prediction -> one single value, left out (reference
  # protocol); AU2 TP, FN -> F1 2/3; AU4 FP, TN -> F1 0.
  fold_b = scoring.score_au([_au("AU1 AU2", "1, 2"), _au("AU1 AU4", "1, 2")], "reference",
                            (1, 2, 4))
  return fold_a, fold_b


def test_fold_scores_are_averaged_per_metric_and_per_au():
  fold_a, fold_b = _fold_scores()
  assert fold_a["per_au_f1"] == {"1": pytest.approx(200 / 3), "2": 0.0, "4": None}
  assert fold_b["per_au_f1"] == {"1": None, "2": pytest.approx(200 / 3), "4": 0.0}
  mean = report.average_scores({"fold0": fold_a, "fold1": fold_b})
  # S_re per fold: mean over its scored AUs = (200/3 + 0) / 2 = 100/3 in both folds.
  assert mean["S_re"] == pytest.approx(100 / 3)
  assert mean["S_ge"] == pytest.approx((fold_a["S_ge"] + fold_b["S_ge"]) / 2)
  assert mean["S_rege"] == pytest.approx((fold_a["S_rege"] + fold_b["S_rege"]) / 2)
  # Per AU: the mean over the folds where the AU is scored.
  assert mean["per_au_f1"] == {"1": pytest.approx(200 / 3), "2": pytest.approx(100 / 3),
                               "4": 0.0}
  assert mean["per_au_n_splits"] == {"1": 1, "2": 2, "4": 1}
  assert mean["n"] == 4 and mean["averaged_over"] == ["fold0", "fold1"]


def test_emotion_average_sums_confusion_and_averages_class_accuracy():
  first = scoring.score_emotion([
      {"prediction": "She looks happy.", "label": "Happiness", "reference": "happy"},
      {"prediction": "She looks happy.", "label": "Fear", "reference": "fear"}])
  second = scoring.score_emotion([
      {"prediction": "Fear is visible.", "label": "Fear", "reference": "fear"},
      {"prediction": "Fear is visible.", "label": "Fear", "reference": "fear"},
      {"prediction": "The face shows sadness.", "label": "Happiness", "reference": "happy"}])
  mean = report.average_scores({"a": first, "b": second})
  assert mean["S_re"] == pytest.approx((50.0 + 200 / 3) / 2)
  expected = np.zeros((7, 7), int)
  expected[0, 0] = 1  # a: Happiness -> Happiness
  expected[6, 0] = 1  # a: Fear -> Happiness
  expected[6, 6] = 2  # b: Fear -> Fear twice
  expected[0, 1] = 1  # b: Happiness -> Sadness
  assert mean["confusion"] == expected.tolist()
  # Happiness: 100 % in a, 0 % in b; Fear: 0 % in a, 100 % in b; Sadness: no sample anywhere.
  assert mean["per_class_accuracy"]["Happiness"] == 50.0
  assert mean["per_class_accuracy"]["Fear"] == 50.0
  assert mean["per_class_accuracy"]["Sadness"] is None
  assert mean["per_class_n"]["Fear"] == 3


def _pixels(path) -> np.ndarray:
  return np.asarray(Image.open(path).convert("RGB")).astype(int)


def _count(pixels: np.ndarray, colour: np.ndarray, tol: int = 6) -> int:
  return int((np.abs(pixels - colour).max(axis=-1) <= tol).sum())


def _looks_drawn(pixels: np.ndarray) -> None:
  assert pixels.size > 0
  assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50  # not one flat colour
  assert (pixels.std(axis=(0, 1)) > 10).all()


def test_confusion_png_size_and_content(tmp_path):
  one = np.zeros((7, 7), int)
  one[2, 2] = 3
  drawn = {}
  for name, matrix in (("zeros", np.zeros((7, 7), int)), ("one", one),
                       ("diagonal", np.eye(7, dtype=int) * 5)):
    path = tmp_path / f"{name}.png"
    size = report.confusion_png(str(path), matrix.tolist(), CLASSES, name)
    assert size == report.CONFUSION_SIZE == (700, 600)
    assert Image.open(path).size == (700, 600)
    drawn[name] = _pixels(path)
    _looks_drawn(drawn[name])
  # Full cells are drawn in the colour map's darkest blue: none, one, then seven cells of it (the
  # colour bar holds the same small amount in each).
  dark = {name: _count(p, DARKEST_BLUE) for name, p in drawn.items()}
  assert dark["zeros"] < dark["one"] < dark["diagonal"]
  assert dark["diagonal"] - dark["zeros"] > 6 * (dark["one"] - dark["zeros"])


def test_au_f1_png_size_and_bars(tmp_path):
  aus = ["1", "2", "4", "5", "6", "10", "12", "17", "24", "25", "26", "43"]
  high = tmp_path / "high.png"
  low = tmp_path / "low.png"
  empty = tmp_path / "empty.png"
  assert report.au_f1_png(str(high), {au: 90.0 for au in aus}, "high", 90.0) == (920, 450)
  assert report.au_f1_png(str(low), {au: 10.0 for au in aus}, "low", 10.0) == (920, 450)
  assert report.au_f1_png(str(empty), {au: None for au in aus}, "none") == (920, 450)
  assert report.au_plot_size(3) == (600, 450)
  for path in (high, low, empty):
    assert Image.open(path).size == (920, 450)
  blue = {path: _count(_pixels(path), TAB_BLUE) for path in (high, low, empty)}
  _looks_drawn(_pixels(high))
  assert blue[empty] == 0  # no bar for AUs that are not scored
  assert blue[high] > 5 * blue[low] > 0  # bar area follows F1


def test_write_report_renders_markdown_tables_and_plots(tmp_path):
  fold_a, fold_b = _fold_scores()
  data = {"task": "au", "protocol": "reference",
          "score": report.average_scores({"fold0": fold_a, "fold1": fold_b}),
          "per_split": {"fold0": fold_a, "fold1": fold_b}, "splits": ["fold0", "fold1"],
          "settings": {"batch_size": 4}, "counts": {"n_examples": 5, "n_scored": 4,
                                                    "n_failed": 1,
                                                    "failed_by_status": {"unreadable": 1},
                                                    "failures_file": "failures.jsonl"},
          "timing": {"seconds_total": 1.5}}
  written = report.write_report(str(tmp_path), data)
  files = sorted(p["file"] for p in written["plots"])
  assert files == ["au_f1.png", "au_f1_fold0.png", "au_f1_fold1.png"]
  for plot in written["plots"]:
    assert Image.open(tmp_path / plot["file"]).size == (plot["width"], plot["height"])
  saved = json.loads((tmp_path / "report.json").read_text())
  assert saved["score"]["S_re"] == pytest.approx(100 / 3)
  md = (tmp_path / "report.md").read_text()
  assert "| split | n | S_re | S_ge | S_rege |" in md
  a = fold_a
  assert (f"| fold0 | 2 | {a['S_re']:.2f} | {a['S_ge']:.2f} | {a['S_rege']:.2f} |") in md
  assert f"| **mean over 2 splits** | 4 | {100 / 3:.2f} |" in md
  # Per-AU table: F1 per fold and the mean, n/a where an AU is not scored.
  assert "| AU1 | inner brow raiser | 66.67 | n/a | 66.67 |" in md
  assert "| AU2 | outer brow raiser | 0.00 | 66.67 | 33.33 |" in md
  assert "| failed: unreadable | 1 |" in md
  assert "![au_f1 mean](au_f1.png)" in md
