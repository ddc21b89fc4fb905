"""The main command: EmoLA end to end on synthetic faces, from nothing to a scored model, on a CPU.

  ./demo.sh                          # or: python -m emola_jax.demo [--workdir=runs/demo]
  ./demo.sh --ablation               # also the same run without the prior token, side by side

Stages (each prints a header with the elapsed time, and the commands show their own progress):

1. data: render synthetic faces (emola_jax.data.synthetic) for both tasks in the FABA-Instruct
   layout, train and held-out test faces from disjoint seeds, plus a PNG grid of test faces;
2. priors: standardise the 136-d landmark priors with the training set's per-coordinate mean and
   standard deviation (`prior_stats.json`). Raw coordinates lie in [0, 1] and an expression moves
   them by about 1% of the image: a prior projector trained from scratch needs thousands of
   steps to find that signal under the common offset, standardised ones about a hundred;
3. tokenizer: a ~2k-id LLaMA-format SentencePiece model fitted to the training text
   (emola_jax.data.train_tokenizer), so prompts and answers are short;
4. prepare: `emola-prepare --format=faba` writes ArrayRecord shards;
5. train: `emola-train --config=configs/demo.py` (a tiny EmoLA, both tasks in one model, from
   scratch); with --ablation a second model with `--config.model.prior_position=none`;
6. eval: `emola-eval` on the held-out faces of each task (reference protocol): report.json,
   report.md and plots per task and model;
7. photos: the bundled real photos (skimage's astronaut, matplotlib's grace_hopper.jpg),
   cropped around dlib's face like the synthetic faces are framed, with their standardised dlib
   landmarks as `<photo>.npy`, answered by `emola-infer`;
8. summary: S_re / S_ge / S_rege per task and model, times, where everything is; also written
   to `<workdir>/report.json` and `report.md`.

A stage whose output is complete is reused on a rerun with the same workdir (`--fresh` starts
over); a change of data flags needs a new workdir or --fresh.
"""

from __future__ import annotations

import dataclasses
import glob
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = os.path.join(REPO, "configs", "demo.py")
TASKS = ("emotion", "au")
PRIOR_POSITIONS = ("after", "before", "none")
PRIOR_STATS_FILE = "prior_stats.json"
PHOTOS = ("astronaut", "grace_hopper")
# Answers are at most ~25 (emotion) and ~85 (AU) ids with the demo tokenizer; room to spare.
MAX_NEW_TOKENS = {"emotion": 48, "au": 128}
# S_re targets of the demo on held-out synthetic faces (reference protocol).
TARGETS = {"emotion": 85.0, "au": 70.0}


class DemoError(RuntimeError):
  """A stage that failed; the message names the stage and what to look at."""


@dataclasses.dataclass(frozen=True)
class Settings:
  """Everything the pipeline needs; `python -m emola_jax.demo --help` describes each flag."""

  workdir: str = "runs/demo"
  num_train: int = 2000
  num_test: int = 252
  seed: int = 0
  steps: int = 0
  prior_position: str = "after"
  ablation: bool = False
  config: str = DEFAULT_CONFIG
  train_args: tuple[str, ...] = ()
  tasks: tuple[str, ...] = TASKS
  eval_batch_size: int = 64
  eval_limit: int = 0
  photos: bool = True
  workers: int = 2
  fresh: bool = False


class Clock:
  """Elapsed time since the start and per stage, printed with every stage header."""

  def __init__(self):
    self.start = time.perf_counter()
    self.stages: dict[str, float] = {}
    self._current: tuple[str, float] | None = None

  def stage(self, name: str, what: str) -> None:
    self.finish()
    self._current = (name, time.perf_counter())
    print(f"\n=== [{self.elapsed():6.1f}s] {name}: {what}", flush=True)

  def finish(self) -> None:
    if self._current is not None:
      name, began = self._current
      self.stages[name] = self.stages.get(name, 0.0) + time.perf_counter() - began
      self._current = None

  def elapsed(self) -> float:
    return time.perf_counter() - self.start


def load_config(path: str) -> Any:
  """The `get_config()` of an experiment config file."""
  if not os.path.isfile(path):
    raise DemoError(f"--config={path}: no such file (the demo config is configs/demo.py in the "
                    "repository)")
  spec = importlib.util.spec_from_file_location("_demo_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def tokenizer_vocab_size(config: Any) -> int:
  """Ids the tokenizer may use: below the image placeholder when it lies inside the vocabulary."""
  vocab, image = config.model.text.vocab_size, config.model.image_token_index
  return image if image < vocab else vocab


def run_command(args: Sequence[str], stage: str, log_path: str | None = None) -> None:
  """Runs a project command with its output streamed to this terminal; raises on failure."""
  print("$ " + " ".join(args), flush=True)
  env = dict(os.environ)
  env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # XLA's C++ start-up chatter
  result = subprocess.run(list(args), env=env, check=False)
  if result.returncode:
    where = f" (log: {log_path})" if log_path else ""
    raise DemoError(f"stage {stage!r}: `{' '.join(args)}` exited with status "
                    f"{result.returncode}{where}; its output is above")


def module_command(module: str, *args: str) -> list[str]:
  return [sys.executable, "-m", module, *args]


# ----------------------------------------------------------------------------- stages


def make_data(s: Settings, data_dir: str, image_size: int) -> dict[str, Any]:
  """Renders the synthetic dataset (reused when it exists with the same arguments)."""
  from emola_jax.data.synthetic import generate  # pylint: disable=import-outside-toplevel

  if s.num_test < 1 or s.num_train < 1:
    raise DemoError(f"--num_train={s.num_train} and --num_test={s.num_test} must be >= 1")
  info = generate.generate_dataset(data_dir, s.num_train, s.num_test, s.seed,
                                   image_size=image_size, tasks=s.tasks,
                                   num_workers=s.workers)
  print(f"faces: {json.dumps(info['counts'])} ({image_size} px) in {data_dir}", flush=True)
  return info


def prior_files(data_dir: str, split: str) -> list[str]:
  return sorted(glob.glob(os.path.join(data_dir, "FABAInstruct", split, "landmarks", "*",
                                       "*.npy")))


def standardise_priors(raw_dir: str, data_dir: str) -> dict[str, Any]:
  """Mirrors `raw_dir` into `data_dir` with standardised priors; returns the statistics.

  The statistics come from the training priors only. Images and JSON files are linked (or
  copied where links are not possible); `prior_stats.json` is written last, so its presence
  means the mirror is complete.
  """
  stats_path = os.path.join(data_dir, PRIOR_STATS_FILE)
  if os.path.exists(stats_path):
    with open(stats_path, encoding="utf-8") as f:
      return json.load(f)
  train = prior_files(raw_dir, "train")
  if not train:
    raise DemoError(f"{raw_dir}: no training landmark .npy files to standardise")
  priors = np.stack([np.load(p) for p in train]).astype(np.float64)
  mean, std = priors.mean(axis=0), priors.std(axis=0)
  if not np.all(std > 0):
    raise DemoError(f"{raw_dir}: a prior coordinate is constant over the training set")
  if os.path.isdir(data_dir):
    shutil.rmtree(data_dir)  # an incomplete mirror (no stats file): start it again
  for root, _, files in os.walk(raw_dir):
    target_root = os.path.join(data_dir, os.path.relpath(root, raw_dir))
    os.makedirs(target_root, exist_ok=True)
    for name in files:
      src, dst = os.path.join(root, name), os.path.join(target_root, name)
      if name.endswith(".npy"):
        np.save(dst, standardise(np.load(src), mean, std))
      else:
        try:
          os.link(src, dst)
        except OSError:
          shutil.copyfile(src, dst)
  stats = {"mean": mean.tolist(), "std": std.tolist(), "num_train_priors": len(train),
           "formula": "(prior - mean) / std, per coordinate; mean/std over the training priors"}
  with open(stats_path, "w", encoding="utf-8") as f:
    json.dump(stats, f)
  print(f"standardised {len(prior_files(data_dir, 'train')) + len(prior_files(data_dir, 'test'))}"
        f" priors with the statistics of {len(train)} training faces -> {stats_path}", flush=True)
  return stats


def standardise(prior: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
  return ((np.asarray(prior, np.float64) - np.asarray(mean)) / np.asarray(std)).astype(np.float32)


def make_tokenizer(data_dir: str, out_dir: str, vocab_size: int) -> int:
  from emola_jax.data import train_tokenizer  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel

  if os.path.exists(os.path.join(out_dir, "tokenizer_config.json")):
    size = len(transformers.AutoTokenizer.from_pretrained(out_dir))
  else:
    size = train_tokenizer.train_tokenizer(data_dir, out_dir, vocab_size)
  if size > vocab_size:
    raise DemoError(f"{out_dir}: the tokenizer has {size} ids but the model takes {vocab_size}; "
                    "rerun with --fresh")
  print(f"tokenizer: {size} ids in {out_dir}", flush=True)
  return size


def prepare_shards(data_dir: str, out_dir: str) -> None:
  if os.path.exists(os.path.join(out_dir, "prepare.json")):
    print(f"shards exist: {out_dir}", flush=True)
    return
  run_command(module_command("emola_jax.cli.prepare", "--format=faba", f"--input={data_dir}",
                             f"--output={out_dir}", "--strict"), "prepare")


def train_model(s: Settings, prepared: str, tokenizer: str, workdir: str,
                prior_position: str) -> str:
  """Trains (or resumes, or reuses) one model; returns its final checkpoint folder."""
  final = os.path.join(workdir, "final")
  if os.path.exists(os.path.join(final, "config.json")):
    print(f"model exists: {final}", flush=True)
    return final
  args = [f"--config={s.config}", f"--workdir={workdir}", f"--config.data.dir={prepared}",
          f"--config.data.tokenizer={tokenizer}",
          f"--config.model.prior_position={prior_position}"]
  if len(s.tasks) == 1:
    args.append(f"--config.task={s.tasks[0]}")
  if s.steps:
    args.append(f"--config.train.num_steps={s.steps}")
  run_command(module_command("emola_jax.cli.train", *args, *s.train_args), "train")
  return final


def evaluate(s: Settings, checkpoint: str, prepared: str, out_dir: str, task: str) -> dict:
  """emola-eval on the held-out split of `task`; returns its report.json."""
  report_path = os.path.join(out_dir, "report.json")
  if not os.path.exists(report_path):
    args = [f"--checkpoint={checkpoint}", f"--data={prepared}", f"--splits={task}_test",
            f"--task={task}", f"--output={out_dir}", "--protocol=reference",
            f"--max_new_tokens={MAX_NEW_TOKENS[task]}", f"--batch_size={s.eval_batch_size}",
            "--overwrite"]
    if s.eval_limit:
      args.append(f"--limit={s.eval_limit}")
    run_command(module_command("emola_jax.cli.eval", *args), "eval")
  with open(report_path, encoding="utf-8") as f:
    return json.load(f)


def synthetic_frame(raw_dir: str) -> tuple[np.ndarray, float]:
  """Where faces sit in the synthetic images: the mean landmark box centre and side (in image
  units), from the training priors."""
  boxes = []
  for path in prior_files(raw_dir, "train")[:500]:
    points = np.load(path).reshape(-1, 2)
    low, high = points.min(axis=0), points.max(axis=0)
    boxes.append(np.concatenate([(low + high) / 2, [(high - low).max()]]))
  mean = np.mean(boxes, axis=0)
  return mean[:2], float(mean[2])


def prepare_photos(raw_dir: str, stats: dict, out_dir: str, image_size: int) -> list[str]:
  """The bundled real photos, framed like the synthetic faces, each with `<name>.npy`.

  Writes `out_dir/original/<name>.png` (the photo) and `out_dir/framed/<name>.png` + `.npy` (what
  the model is asked about). dlib finds the face and its 68 landmarks in the full photo; the photo is cropped to a square
  that puts the landmark box where the synthetic faces' landmark box sits on average, resized to
  the model's input size, and the landmarks, in crop units, are standardised like the training
  priors. Returns the image paths written.
  """
  import matplotlib.cbook  # pylint: disable=import-outside-toplevel
  import skimage.data  # pylint: disable=import-outside-toplevel
  from PIL import Image  # pylint: disable=import-outside-toplevel

  from emola_jax.data import priors  # pylint: disable=import-outside-toplevel

  framed_dir = os.path.join(out_dir, "framed")
  for folder in ("original", "framed"):
    os.makedirs(os.path.join(out_dir, folder), exist_ok=True)
  with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as f:
    photos = {"astronaut": Image.fromarray(skimage.data.astronaut()),
              "grace_hopper": Image.open(f).convert("RGB")}
  center, side = synthetic_frame(raw_dir)
  detector = priors.DlibPrior(detect=True, upsample=1)
  written = []
  for name in PHOTOS:
    photo = photos[name]
    photo.save(os.path.join(out_dir, "original", f"{name}.png"))
    try:
      points, _ = detector.landmarks(photo, name)
    except priors.NoFaceError as e:
      print(f"photos: {name}: {e}; left out", flush=True)
      continue
    low, high = points.min(axis=0), points.max(axis=0)
    crop_side = (high - low).max() / side  # pixels per synthetic image side
    left_top = (low + high) / 2 - center * crop_side
    box = (*left_top, *(left_top + crop_side))
    crop = photo.crop(tuple(int(round(v)) for v in box)).resize(
        (image_size, image_size), Image.Resampling.BICUBIC)
    path = os.path.join(framed_dir, f"{name}.png")
    crop.save(path)
    in_crop = ((points - left_top) / crop_side).reshape(-1)
    np.save(os.path.join(framed_dir, f"{name}.npy"),
            standardise(in_crop, stats["mean"], stats["std"]))
    written.append(path)
  return written


def infer_photos(checkpoint: str, photo_dir: str, output: str, task: str) -> list[dict]:
  if not os.path.exists(output):
    run_command(module_command(
        "emola_jax.cli.infer", f"--checkpoint={checkpoint}", f"--images={photo_dir}",
        f"--task={task}", f"--output={output}", f"--max_new_tokens={MAX_NEW_TOKENS[task]}",
        "--prior=auto", "--overwrite"), "photos")
  with open(output, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


# ----------------------------------------------------------------------------- summary


def headline(report: dict) -> dict[str, Any]:
  score = report["score"]
  return {"n": score.get("n"), **{k: score.get(k) for k in ("S_re", "S_ge", "S_rege")}}


def _fmt(value: Any) -> str:
  return "-" if value is None else f"{value:.1f}" if isinstance(value, float) else str(value)


def model_label(prior_position: str) -> str:
  return ("EmoLA (prior token after the visual tokens)" if prior_position == "after" else
          "EmoLA (prior token before the visual tokens)" if prior_position == "before" else
          "LLaVA (no prior token; ablation)")


def summary_markdown(summary: dict) -> str:
  lines = ["# EmoLA demo on synthetic faces", "",
           f"Held-out synthetic faces (never seen in training), FABA-Bench reference protocol. "
           f"Targets: emotion S_re >= {TARGETS['emotion']:.0f}, AU S_re >= "
           f"{TARGETS['au']:.0f}.", "",
           "| model | task | n | S_re | S_ge | S_rege | report |", "|---|---|---|---|---|---|---|"]
  for run in summary["runs"]:
    for task, h in run["scores"].items():
      lines.append(f"| {model_label(run['prior_position'])} | {task} | {_fmt(h['n'])} | "
                   f"{_fmt(h['S_re'])} | {_fmt(h['S_ge'])} | {_fmt(h['S_rege'])} | "
                   f"{run['reports'][task]} |")
  lines += ["", "Real photos (not scored; the model has only seen cartoon faces):", ""]
  for run in summary["runs"]:
    for task, rows in run.get("photos", {}).items():
      for row in rows:
        text = (row.get("text") or row.get("reason") or "").replace("\n", " ")
        lines.append(f"- {model_label(run['prior_position'])}, {task}, "
                     f"{os.path.basename(row['path'])}: {text}")
  lines += ["", "| stage | seconds |", "|---|---|"]
  lines += [f"| {k} | {v:.1f} |" for k, v in summary["seconds"].items()]
  lines += ["", f"Total: {summary['total_seconds']:.1f} s for this invocation (stages reused from "
            f"an earlier run of the same workdir take ~0 s); load average at start / end: "
            f"{summary['load_average']['start']} / {summary['load_average']['end']} on "
            f"{summary['cpus']} CPU(s).", "",
            f"Sample faces: {summary['sample_grid']}", ""]
  return "\n".join(lines)


def print_summary(summary: dict) -> None:
  print("\n" + "=" * 78)
  print("EmoLA demo: held-out synthetic faces, FABA-Bench reference protocol")
  print(f"{'model':<46}{'task':<9}{'n':>5}{'S_re':>7}{'S_ge':>7}{'S_rege':>8}")
  for run in summary["runs"]:
    for task, h in run["scores"].items():
      print(f"{model_label(run['prior_position']):<46}{task:<9}{_fmt(h['n']):>5}"
            f"{_fmt(h['S_re']):>7}{_fmt(h['S_ge']):>7}{_fmt(h['S_rege']):>8}")
  for run in summary["runs"]:
    for task, rows in run.get("photos", {}).items():
      for row in rows:
        text = (row.get("text") or row.get("reason") or "").replace("\n", " ")
        print(f"photo {os.path.basename(row['path'])} ({task}, prior "
              f"{run['prior_position']}): {text[:150]}")
  print(f"time of this invocation: {summary['total_seconds']:.0f} s in all ("
        + ", ".join(f"{k} {v:.0f} s" for k, v in summary["seconds"].items()) + ")")
  print(f"load average start/end: {summary['load_average']['start']} / "
        f"{summary['load_average']['end']} ({summary['cpus']} CPUs)")
  for run in summary["runs"]:
    print(f"checkpoint ({run['prior_position']}): {run['checkpoint']}")
    for task in run["reports"]:
      print(f"report ({run['prior_position']}, {task}): {run['reports'][task]}")
  print(f"summary: {summary['report_json']} and {summary['report_md']}")
  print(f"sample faces: {summary['sample_grid']}")
  print("=" * 78, flush=True)


# ----------------------------------------------------------------------------- pipeline


def run_pipeline(s: Settings) -> dict[str, Any]:
  """Runs every stage; returns the summary (also written to `<workdir>/report.json`)."""
  bad = [t for t in s.tasks if t not in TASKS]
  if bad or not s.tasks:
    raise DemoError(f"--tasks={list(s.tasks)}: use names from {TASKS}")
  if s.prior_position not in PRIOR_POSITIONS:
    raise DemoError(f"--prior_position={s.prior_position!r} is not one of {PRIOR_POSITIONS}")
  load_start = os.getloadavg()
  clock = Clock()
  workdir = os.path.abspath(s.workdir)
  if s.fresh and os.path.isdir(workdir):
    shutil.rmtree(workdir)
  os.makedirs(workdir, exist_ok=True)
  config = load_config(s.config)
  image_size = config.model.vision.image_size
  raw_dir, data_dir = os.path.join(workdir, "data_raw"), os.path.join(workdir, "data")
  tokenizer_dir, prepared = os.path.join(workdir, "tokenizer"), os.path.join(workdir, "prepared")

  clock.stage("data", f"{s.num_train} training + {s.num_test} held-out faces per task")
  from emola_jax.data.synthetic import generate  # pylint: disable=import-outside-toplevel
  make_data(s, raw_dir, image_size)
  grid = generate.render_grid(os.path.join(workdir, "sample_faces.png"), raw_dir, n=16)
  print(f"sample grid: {grid}", flush=True)

  clock.stage("priors", "standardise the landmark priors with training statistics")
  stats = standardise_priors(raw_dir, data_dir)

  clock.stage("tokenizer", "SentencePiece on the training text")
  make_tokenizer(data_dir, tokenizer_dir, tokenizer_vocab_size(config))

  clock.stage("prepare", "ArrayRecord shards (emola-prepare)")
  prepare_shards(data_dir, prepared)

  positions = [s.prior_position] + (["none"] if s.ablation and s.prior_position != "none"
                                    else [])
  photo_paths: list[str] = []
  runs = []
  for position in positions:
    label = f"prior_{position}"
    clock.stage(f"train ({label})", f"emola-train, config {os.path.relpath(s.config, REPO)}, "
                f"--config.model.prior_position={position}")
    checkpoint = train_model(s, prepared, tokenizer_dir, os.path.join(workdir, "train", label),
                             position)
    reports, scores = {}, {}
    for task in s.tasks:
      clock.stage(f"eval ({label})", f"emola-eval, {task}_test (held-out faces)")
      out_dir = os.path.join(workdir, "eval", label, task)
      scores[task] = headline(evaluate(s, checkpoint, prepared, out_dir, task))
      reports[task] = os.path.join(out_dir, "report.json")
    run = {"prior_position": position, "checkpoint": checkpoint, "reports": reports,
           "scores": scores, "metrics": os.path.join(workdir, "train", label, "metrics.jsonl")}
    if s.photos:
      clock.stage(f"photos ({label})", "emola-infer on the bundled real photos")
      photo_dir = os.path.join(workdir, "photos")
      if not photo_paths:
        photo_paths = prepare_photos(raw_dir, stats, photo_dir, image_size)
      if photo_paths:
        run["photos"] = {
            task: infer_photos(checkpoint, os.path.join(photo_dir, "framed"),
                               os.path.join(workdir, "infer", f"{label}_{task}.jsonl"), task)
            for task in s.tasks}
    runs.append(run)
  clock.finish()

  summary = {
      "runs": runs,
      "targets_S_re": TARGETS,
      "seconds": {k: round(v, 1) for k, v in clock.stages.items()},
      "total_seconds": round(clock.elapsed(), 1),
      "load_average": {"start": [round(x, 2) for x in load_start],
                       "end": [round(x, 2) for x in os.getloadavg()]},
      "cpus": os.cpu_count(),
      "sample_grid": grid,
      "settings": dataclasses.asdict(s),
      "report_json": os.path.join(workdir, "report.json"),
      "report_md": os.path.join(workdir, "report.md"),
  }
  with open(summary["report_json"], "w", encoding="utf-8") as f:
    json.dump(summary, f, indent=2)
  with open(summary["report_md"], "w", encoding="utf-8") as f:
    f.write(summary_markdown(summary))
  print_summary(summary)
  return summary


# ----------------------------------------------------------------------------- command line


def _define_flags():
  # Defined only when run as a program, so importing this module never clashes with other CLIs.
  from absl import flags  # pylint: disable=import-outside-toplevel
  d = Settings()
  flags.DEFINE_string("workdir", d.workdir, "Folder for data, model, reports (reused if it "
                      "exists).")
  flags.DEFINE_integer("num_train", d.num_train, "Synthetic training faces per task.")
  flags.DEFINE_integer("num_test", d.num_test, "Held-out synthetic faces per task (FABA-Bench "
                       "needs >= 200 for stable scores).")
  flags.DEFINE_integer("seed", d.seed, "Seed of the synthetic faces.")
  flags.DEFINE_integer("steps", d.steps, "Training steps (0: the config's).")
  flags.DEFINE_enum("prior_position", d.prior_position, list(PRIOR_POSITIONS),
                    "Where the landmark prior token goes (none: plain LLaVA).")
  flags.DEFINE_bool("ablation", d.ablation, "Also train and score the same model without the "
                    "prior token (--config.model.prior_position=none) and report it beside.")
  flags.DEFINE_string("config", d.config, "Experiment config file for emola-train.")
  flags.DEFINE_multi_string("train_arg", [], "Extra emola-train flag, e.g. "
                            "--train_arg=--config.train.lr=1e-3 (repeatable).")
  flags.DEFINE_list("tasks", list(d.tasks), "Tasks to generate, train and score.")
  flags.DEFINE_integer("eval_batch_size", d.eval_batch_size, "Answers generated per batch.")
  flags.DEFINE_integer("eval_limit", d.eval_limit, "Score only the first N held-out faces "
                       "(0: all).")
  flags.DEFINE_bool("photos", d.photos, "Answer the bundled real photos with emola-infer.")
  flags.DEFINE_integer("workers", d.workers, "Processes rendering faces.")
  flags.DEFINE_bool("fresh", d.fresh, "Delete the workdir first.")
  return flags.FLAGS


def run() -> None:
  from absl import app  # pylint: disable=import-outside-toplevel
  fv = _define_flags()

  def main(argv):
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    settings = Settings(
        workdir=fv.workdir, num_train=fv.num_train, num_test=fv.num_test, seed=fv.seed,
        steps=fv.steps, prior_position=fv.prior_position, ablation=fv.ablation,
        config=os.path.abspath(fv.config), train_args=tuple(fv.train_arg),
        tasks=tuple(fv.tasks), eval_batch_size=fv.eval_batch_size, eval_limit=fv.eval_limit,
        photos=fv.photos, workers=fv.workers, fresh=fv.fresh)
    try:
      run_pipeline(settings)
    except DemoError as e:
      sys.exit(f"demo: {e}")

  app.run(main)


if __name__ == "__main__":
  run()
