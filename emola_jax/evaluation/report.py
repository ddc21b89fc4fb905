"""The emola-eval report: report.json, a readable report.md and PNG plots.

A report is a JSON-ready dict that emola-eval builds:

  task, protocol, score (the scoring dict of `scoring.score_emotion` / `score_au`; with several
  splits, their average from `average_scores`), per_split (split -> scoring dict, only with
  several splits), settings, timing, counts, predictions (the predictions file) ...

`write_report` draws the plots (emotion: the 7x7 confusion matrix; AU: per-AU F1 bars; one per
split too when there are several), adds their file names and pixel sizes under `plots`, and
writes report.json and report.md. Plots use matplotlib's Agg canvas directly (no display, no
global pyplot state) at fixed pixel sizes.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from emola_jax.data import facs

DPI = 100
CONFUSION_SIZE = (700, 600)  # pixels
AU_HEIGHT = 450  # pixels; the width grows with the number of AUs (`au_plot_size`)
HEADLINE = ("S_re", "S_ge", "S_rege")
AVERAGE_METHOD = ("mean over splits, each split scored on its own (the cross-validation "
                  "protocol: scores averaged over folds)")


def au_plot_size(num_aus: int) -> tuple[int, int]:
  """Pixel size of the per-AU F1 bar chart for `num_aus` bars."""
  return max(600, 60 * num_aus + 200), AU_HEIGHT


def _mean(values: Sequence[float | None]) -> float | None:
  defined = [v for v in values if v is not None]
  return sum(defined) / len(defined) if defined else None


def average_scores(per_split: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
  """The average of several splits' scoring dicts (same task and protocol).

  S_re, S_ge and S_rege are the means of the splits' values (splits where a value is None are
  left out of that mean). Emotion: per-class accuracy is averaged per class, the confusion
  matrix and the unclassified counts are summed. AU: per-AU F1 is averaged over the splits where
  the AU is scored (`per_au_n_splits` says over how many).
  """
  if not per_split:
    raise ValueError("average_scores needs at least one split")
  scores = list(per_split.values())
  task, protocol = scores[0]["task"], scores[0]["protocol"]
  if any(s["task"] != task or s["protocol"] != protocol for s in scores):
    raise ValueError("average_scores: the splits were scored for different tasks or protocols")
  out: dict[str, Any] = {"task": task, "protocol": protocol}
  for key in HEADLINE:
    out[key] = _mean([s[key] for s in scores])
  out["averaged_over"] = list(per_split)
  out["average_method"] = AVERAGE_METHOD
  out["n"] = sum(s["n"] for s in scores)
  out["per_split_n"] = {name: s["n"] for name, s in per_split.items()}
  if task == "emotion":
    classes = scores[0]["classes"]
    out["classes"] = list(classes)
    out["per_class_n"] = {c: sum(s["per_class_n"][c] for s in scores) for c in classes}
    out["per_class_accuracy"] = {
        c: _mean([s["per_class_accuracy"][c] for s in scores]) for c in classes}
    out["confusion"] = np.sum([s["confusion"] for s in scores], axis=0).astype(int).tolist()
    out["unclassified"] = np.sum([s["unclassified"] for s in scores], axis=0).astype(int).tolist()
    out["confusion_note"] = "counts summed over the splits"
  else:
    aus = scores[0]["aus"]
    if any(s["aus"] != aus for s in scores):
      raise ValueError("average_scores: the splits were scored on different AU lists")
    out["aus"] = list(aus)
    out["per_au_f1"] = {str(au): _mean([s["per_au_f1"][str(au)] for s in scores]) for au in aus}
    out["per_au_n_splits"] = {
        str(au): sum(s["per_au_f1"][str(au)] is not None for s in scores) for au in aus}
  return out


def _safe(name: str) -> str:
  return re.sub(r"[^\w.-]+", "_", name)


def _figure(size: tuple[int, int]) -> Figure:
  fig = Figure(figsize=(size[0] / DPI, size[1] / DPI), dpi=DPI)
  FigureCanvasAgg(fig)
  return fig


def _save(fig: Figure, path: str) -> tuple[int, int]:
  fig.savefig(path, dpi=DPI, format="png")
  width, height = fig.canvas.get_width_height()
  return int(width), int(height)


def confusion_png(path: str, confusion: Sequence[Sequence[int]], classes: Sequence[str],
                  title: str, unclassified: Sequence[int] | None = None) -> tuple[int, int]:
  """Draws the confusion matrix (rows: true class, columns: predicted), colour = share of the
  true class, numbers = counts; returns the PNG's (width, height) in pixels."""
  counts = np.asarray(confusion, dtype=float)
  totals = counts.sum(axis=1, keepdims=True)
  if unclassified is not None:
    totals = totals + np.asarray(unclassified, float)[:, None]
  share = np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)
  fig = _figure(CONFUSION_SIZE)
  ax = fig.add_axes((0.2, 0.2, 0.62, 0.68))
  image = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
  for i in range(counts.shape[0]):
    for j in range(counts.shape[1]):
      ax.text(j, i, f"{int(counts[i, j])}", ha="center", va="center", fontsize=9,
              color="white" if share[i, j] > 0.55 else "black")
  ax.set_xticks(range(len(classes)), labels=classes, rotation=45, ha="right")
  ax.set_yticks(range(len(classes)), labels=classes)
  xlabel = "predicted class"
  if unclassified is not None and sum(unclassified):
    xlabel += f"  (no class read: {int(sum(unclassified))})"
  ax.set_xlabel(xlabel)
  ax.set_ylabel("true class")
  ax.set_title(title, fontsize=10)
  colorbar = fig.colorbar(image, cax=fig.add_axes((0.85, 0.2, 0.03, 0.68)))
  colorbar.set_label("share of the true class")
  return _save(fig, path)


def au_f1_png(path: str, per_au_f1: Mapping[str, float | None], title: str,
              mean: float | None = None) -> tuple[int, int]:
  """Draws one bar per AU (F1 in %, "n/a" for an AU left out of the mean) and the mean as a
  line; returns the PNG's (width, height) in pixels."""
  aus = list(per_au_f1)
  values = [per_au_f1[au] for au in aus]
  fig = _figure(au_plot_size(len(aus)))
  ax = fig.add_axes((0.1, 0.18, 0.85, 0.7))
  x = np.arange(len(aus))
  heights = [v if v is not None else 0.0 for v in values]
  bars = ax.bar(x, heights, color="tab:blue", width=0.7)
  for bar, value in zip(bars, values):
    label = "n/a" if value is None else f"{value:.1f}"
    ax.text(bar.get_x() + bar.get_width() / 2, bar.get_height() + 1.5, label, ha="center",
            va="bottom", fontsize=8)
  if mean is not None:
    ax.axhline(mean, color="tab:red", linestyle="--", linewidth=1)
    ax.text(len(aus) - 0.5, mean + 1.5, f"mean {mean:.1f}", color="tab:red", ha="right",
            va="bottom", fontsize=9)
  ax.set_xticks(x, labels=[f"AU{au}" for au in aus])
  ax.set_xlim(-0.6, len(aus) - 0.4)
  ax.set_ylim(0, 110)
  ax.set_ylabel("F1 (%)")
  ax.set_title(title, fontsize=10)
  return _save(fig, path)


def _plot_title(report: Mapping[str, Any], score: Mapping[str, Any], where: str) -> str:
  value = score.get("S_re")
  metric = "accuracy" if report["task"] == "emotion" else "mean F1"
  shown = "n/a" if value is None else f"{value:.2f}"
  return f"{where}: S_re ({metric}) {shown}  [{report['protocol']} protocol, n={score['n']}]"


def draw_plots(out_dir: str, report: Mapping[str, Any]) -> list[dict[str, Any]]:
  """Draws the report's plots into `out_dir`; returns [{file, kind, split, width, height}]."""
  targets = [("all", report["score"], "")]
  per_split = report.get("per_split") or {}
  if per_split:
    targets[0] = ("mean", report["score"], "")
    targets += [(name, score, f"_{_safe(name)}") for name, score in per_split.items()]
  plots = []
  for split, score, suffix in targets:
    if split == "mean":
      where = f"mean over {len(per_split)} splits"
    else:
      where = ", ".join(report.get("splits", [])) if split == "all" else split
    title = _plot_title(report, score, where)
    if report["task"] == "emotion":
      name, kind = f"confusion{suffix}.png", "confusion"
      size = confusion_png(os.path.join(out_dir, name), score["confusion"], score["classes"],
                           title, score.get("unclassified"))
    else:
      name, kind = f"au_f1{suffix}.png", "au_f1"
      size = au_f1_png(os.path.join(out_dir, name), score["per_au_f1"], title, score.get("S_re"))
    plots.append({"file": name, "kind": kind, "split": split, "width": size[0],
                  "height": size[1]})
  return plots


def _fmt(value: Any, digits: int = 2) -> str:
  if value is None:
    return "n/a"
  if isinstance(value, float):
    return f"{value:.{digits}f}"
  return str(value)


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]],
           align: Sequence[str] | None = None) -> list[str]:
  align = align or ["---"] + ["---:"] * (len(header) - 1)
  lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
  lines += ["| " + " | ".join(_fmt(c) for c in row) + " |" for row in rows]
  return lines


def score_rows(report: Mapping[str, Any]) -> list[list[Any]]:
  """Rows (split, n, S_re, S_ge, S_rege) of the score table, the average last."""
  per_split = report.get("per_split") or {}
  score = report["score"]
  if not per_split:
    name = ", ".join(report.get("splits", [])) or "all"
    return [[name, score["n"], *(score[k] for k in HEADLINE)]]
  rows = [[name, s["n"], *(s[k] for k in HEADLINE)] for name, s in per_split.items()]
  rows.append([f"**mean over {len(per_split)} splits**", score["n"],
               *(score[k] for k in HEADLINE)])
  return rows


def markdown(report: Mapping[str, Any]) -> str:
  """report.md: settings, the score table, per-class or per-AU tables, plots, failures, timing."""
  task, protocol = report["task"], report["protocol"]
  per_split = report.get("per_split") or {}
  score = report["score"]
  lines = [f"# emola-eval: {task} ({protocol} protocol)", ""]
  settings = report.get("settings", {})
  setting_rows = [["checkpoint", report.get("checkpoint")], ["data", report.get("data")],
                  ["splits", ", ".join(report.get("splits", []))]]
  setting_rows += [[key, json.dumps(value) if isinstance(value, (list, dict)) else value]
                   for key, value in settings.items()]
  lines += _table(["setting", "value"], setting_rows, ["---", "---"]) + [""]

  lines += ["## Scores", ""]
  lines += _table(["split", "n", "S_re", "S_ge", "S_rege"], score_rows(report)) + [""]
  measure = "7-class accuracy" if task == "emotion" else "mean per-AU F1"
  lines.append(f"S_re: {measure} (%); S_ge: mean ROUGE-L F1 x100 against the reference "
               "description; S_rege = S_re + S_ge.")
  if per_split:
    lines.append(f"Several splits: the last row is the {AVERAGE_METHOD}.")
  lines.append("")

  columns = list(per_split) + (["mean"] if per_split else [])
  per = list(per_split.values()) + ([score] if per_split else [])
  if not per_split:
    columns, per = ["accuracy" if task == "emotion" else "F1"], [score]
  if task == "emotion":
    lines += ["## Per-class accuracy (%)", ""]
    rows = [[c, score["per_class_n"][c], *(s["per_class_accuracy"][c] for s in per)]
            for c in score["classes"]]
    lines += _table(["class", "n", *columns], rows) + [""]
    note = " (counts summed over the splits)" if per_split else ""
    lines += [f"## Confusion matrix{note}", "", "Rows: true class; columns: predicted class.", ""]
    header = ["true \\ predicted", *score["classes"]]
    unclassified = score.get("unclassified") or [0] * len(score["classes"])
    with_none = any(unclassified)
    if with_none:
      header.append("no class")
    rows = [[c, *score["confusion"][i], *([unclassified[i]] if with_none else [])]
            for i, c in enumerate(score["classes"])]
    lines += _table(header, rows) + [""]
  else:
    lines += ["## Per-AU F1 (%)", ""]
    rows = [[f"AU{au}", facs.AU_NAMES.get(int(au), ""), *(s["per_au_f1"][str(au)] for s in per)]
            for au in score["aus"]]
    lines += _table(["AU", "name", *columns], rows, ["---", "---"] + ["---:"] * len(columns))
    lines += ["", "n/a: the AU is left out of the mean (reference protocol: one single value "
              "across all targets and predictions; strict: never present nor predicted).", ""]
  for plot in report.get("plots", []):
    lines += [f"![{plot['kind']} {plot['split']}]({plot['file']})", ""]

  counts = report.get("counts", {})
  if counts:
    lines += ["## Samples", ""]
    rows = [["examples", counts.get("n_examples")], ["scored", counts.get("n_scored")],
            ["failed (not scored)", counts.get("n_failed")]]
    rows += [[f"failed: {status}", n] for status, n in counts.get("failed_by_status", {}).items()]
    lines += _table(["", "count"], rows) + [""]
    if counts.get("n_failed"):
      lines += [f"The failed samples and their reasons are in {counts.get('failures_file')}.", ""]
  timing = report.get("timing", {})
  if timing:
    lines += ["## Timing", ""]
    rows = [[key, value] for key, value in timing.items()]
    lines += _table(["", "value"], rows) + [""]
    lines += ["seconds_first_batch includes compiling the decoding loop.", ""]
  return "\n".join(lines)


def write_report(out_dir: str, report: dict[str, Any]) -> dict[str, Any]:
  """Draws the plots, then writes report.json and report.md into `out_dir`; returns the report
  with `plots` filled in."""
  os.makedirs(out_dir, exist_ok=True)
  report["plots"] = draw_plots(out_dir, report)
  with open(os.path.join(out_dir, "report.json"), "w", encoding="utf-8") as f:
    json.dump(report, f, indent=2)
    f.write("\n")
  with open(os.path.join(out_dir, "report.md"), "w", encoding="utf-8") as f:
    f.write(markdown(report))
  return report
