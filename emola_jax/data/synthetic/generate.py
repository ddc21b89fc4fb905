"""Write a synthetic FABA-Instruct dataset: face images, landmark priors and instruction JSONs.

Layout (the real FABA-Instruct one, with "Synthetic" as the source):

  <out_dir>/FABAInstruct/<split>/images/Synthetic/<task>_<split>_<index>.jpg
  <out_dir>/FABAInstruct/<split>/landmarks/Synthetic/<task>_<split>_<index>.npy   (136 float32)
  <out_dir>/<task>_train.json, <task>_test.json      (one JSON list per task and split)
  <out_dir>/synthetic_annotations.json               (emotion, AU intensities per record id)
  <out_dir>/dataset_info.json                        (counts, seed, sizes, generator version)

The landmark prior is the 68 landmarks divided by the image width/height, flattened as
(x0, y0, x1, y1, ...). Every sample draws from its own seed (seed, task, split, index), so the
output is deterministic and train and test faces never share an identity seed.

Emotion samples are prototype faces (facs.EMOTION_PROTOTYPES), classes balanced. AU samples
mix prototype faces (sometimes with one AU added or removed) and random AU combinations, so that
AU occurrence is not a function of the emotion and the face itself must be read.

Command line: python -m emola_jax.data.synthetic.generate --out_dir=DIR --num_train=N ...
"""

from __future__ import annotations

import concurrent.futures
import json
import math
import multiprocessing
import os
import shutil
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from emola_jax.data import facs
from emola_jax.data import instructions
from emola_jax.data.synthetic import descriptions
from emola_jax.data.synthetic import faces

GENERATOR_VERSION = "1.0"
SOURCE = "Synthetic"
PRIOR_DIM = 2 * faces.NUM_LANDMARKS
TASKS = ("emotion", "au")
SPLITS = ("train", "test")
IMAGE_FORMATS = ("jpg", "png")
ANNOTATIONS_FILE = "synthetic_annotations.json"
INFO_FILE = "dataset_info.json"

_TASK_IDS = {"emotion": 0, "au": 1}
_SPLIT_IDS = {"train": 0, "test": 1}
_ORDER_STREAM = 2**31 - 1  # seed-sequence word of the class-order stream, apart from indices
# A neutral face has no AU to describe, so the AU task uses the other six prototypes.
_AU_TASK_EMOTIONS = tuple(e for e in facs.EMOTIONS if e != "Neutral")
_MIN_INTENSITY, _MAX_INTENSITY = 0.65, 1.0
# Probability of each AU in a random AU combination: scored AUs more often than the others.
_RANDOM_AU_P = {au: (0.3 if au in facs.EVAL_AUS else 0.12) for au in facs.AU_NAMES}


def _intensity(rng: np.random.Generator) -> float:
  return round(float(rng.uniform(_MIN_INTENSITY, _MAX_INTENSITY)), 3)


def _resolve(aus: set[int], rng: np.random.Generator) -> set[int]:
  """Drop one AU of every exclusive pair (chosen at random), then add the implied AUs."""
  out = set(aus)
  for i in rng.permutation(len(facs.EXCLUSIVE_AUS)):
    a, b = facs.EXCLUSIVE_AUS[i]
    if a in out and b in out:
      out.discard(a if rng.random() < 0.5 else b)
  return set(facs.with_implied(out))


def prototype_aus(emotion: str, rng: np.random.Generator) -> set[int]:
  """The AUs of one prototypical face of `emotion` (optional AUs each with probability 1/2)."""
  proto = facs.EMOTION_PROTOTYPES[emotion]
  aus = set(proto.core)
  if proto.one_of:
    aus |= set(proto.one_of[int(rng.integers(len(proto.one_of)))])
  aus |= {au for au in proto.optional if rng.random() < 0.5}
  return set(facs.with_implied(aus))


def random_aus(rng: np.random.Generator) -> set[int]:
  """A random, renderable AU combination with at least one scored AU."""
  aus = {au for au, p in _RANDOM_AU_P.items() if rng.random() < p}
  aus = _resolve(aus, rng)
  while not aus & set(facs.EVAL_AUS):
    aus = _resolve(aus | {int(rng.choice(facs.EVAL_AUS))}, rng)
  return aus


def _perturbed_prototype(emotion: str, rng: np.random.Generator) -> set[int]:
  """A prototype face with, sometimes, one AU added and/or one removed."""
  aus = prototype_aus(emotion, rng)
  if rng.random() < 0.35:
    extra = int(rng.choice(list(facs.AU_NAMES)))
    if facs.is_compatible(facs.with_implied(aus | {extra})):
      aus = set(facs.with_implied(aus | {extra}))
  if rng.random() < 0.25 and len(aus) > 2:
    aus.discard(int(rng.choice(sorted(aus))))
    aus = set(facs.with_implied(aus))
  if not aus & set(facs.EVAL_AUS):
    aus = random_aus(rng)
  return aus


def _class_order(seed: int, task: str, split: str, n: int, num_classes: int) -> np.ndarray:
  """Balanced class indices for n samples, shuffled deterministically."""
  rng = np.random.default_rng([seed, _TASK_IDS[task], _SPLIT_IDS[split], _ORDER_STREAM])
  return rng.permutation(np.arange(n) % num_classes)


def _sample_name(task: str, split: str, index: int) -> str:
  return f"{task}_{split}_{index:06d}"


def _make_sample(job: tuple) -> tuple[dict, dict]:
  """Render and write one sample; returns (JSON record, annotation)."""
  out_dir, seed, task, split, index, class_index, image_size, image_format = job
  rng = np.random.default_rng([seed, _TASK_IDS[task], _SPLIT_IDS[split], index])
  if task == "emotion":
    emotion = facs.EMOTIONS[class_index]
    aus = prototype_aus(emotion, rng)
  elif class_index < len(_AU_TASK_EMOTIONS):  # AU task: half prototype faces, half random
    emotion = _AU_TASK_EMOTIONS[class_index]
    aus = _perturbed_prototype(emotion, rng)
  else:
    emotion, aus = None, random_aus(rng)
  intensities = {au: _intensity(rng) for au in sorted(aus)}
  image, landmarks = faces.random_face(rng, intensities, size=image_size)

  name = _sample_name(task, split, index)
  image_rel = f"FABAInstruct/{split}/images/{SOURCE}/{name}.{image_format}"
  landmark_rel = f"FABAInstruct/{split}/landmarks/{SOURCE}/{name}.npy"
  pil = Image.fromarray(image)
  if image_format == "jpg":
    pil.save(os.path.join(out_dir, image_rel), quality=95, subsampling=0)
  else:
    pil.save(os.path.join(out_dir, image_rel))
  prior = (landmarks / np.array([image_size, image_size], np.float32)).reshape(-1)
  np.save(os.path.join(out_dir, landmark_rel), prior.astype(np.float32))

  if task == "emotion":
    answer = descriptions.describe_emotion(emotion, aus, rng)
  else:
    answer = descriptions.describe_aus(aus, rng, emotion=emotion)
  question = (instructions.sample_instruction(task, rng) if split == "train"
              else instructions.EVAL_PROMPTS[task])
  record = {
      "source": SOURCE,
      "id": f"{SOURCE}/{name}",
      "image": image_rel,
      "landmark": landmark_rel,
      "conversations": [{"from": "human", "value": f"{question}\n<image>"},
                        {"from": "gpt", "value": answer}],
  }
  if split == "test":
    record["label"] = emotion if task == "emotion" else facs.format_au_label(aus)
    record["gpt4"] = answer
  annotation = {"task": task, "split": split, "emotion": emotion,
                "aus": {str(au): v for au, v in intensities.items()}}
  return record, annotation


def _expected_info(num_train: int, num_test: int, seed: int, image_size: int,
                   tasks: Sequence[str], image_format: str) -> dict:
  return {
      "generator": "emola_jax.data.synthetic",
      "generator_version": GENERATOR_VERSION,
      "seed": seed,
      "image_size": image_size,
      "image_format": image_format,
      "prior_dim": PRIOR_DIM,
      "num_landmarks": faces.NUM_LANDMARKS,
      "landmark_format": "68 iBUG landmarks / (width, height), flattened x0, y0, x1, y1, ...",
      "tasks": list(tasks),
      "counts": {task: {"train": num_train, "test": num_test} for task in tasks},
      "files": {task: {split: f"{task}_{split}.json" for split in SPLITS} for task in tasks},
      "emotions": list(facs.EMOTIONS),
      "eval_aus": list(facs.EVAL_AUS),
      "source": SOURCE,
  }


def generate_dataset(out_dir: str, num_train: int, num_test: int, seed: int,
                     image_size: int = 128, tasks: Sequence[str] = TASKS,
                     image_format: str = "jpg", num_workers: int = 1,
                     overwrite: bool = False) -> dict:
  """Write a synthetic FABA-Instruct dataset (see the module docstring for the layout).

  Args:
    out_dir: data root; JSON paths are relative to it.
    num_train, num_test: samples per task in each split.
    seed: the whole output is a function of the arguments (byte-identical reruns).
    image_size: square image side in pixels.
    tasks: any of "emotion", "au"; each task gets its own faces.
    image_format: "jpg" (quality 95, no chroma subsampling) or "png".
    num_workers: processes used to render (the output does not depend on it).
    overwrite: replace a dataset made with other arguments; without it that is an error.
      A dataset already made with the same arguments is reused as it is.

  Returns:
    The dataset info dict (also written to <out_dir>/dataset_info.json).
  """
  tasks = tuple(tasks)
  bad = [t for t in tasks if t not in TASKS]
  if bad or not tasks or len(set(tasks)) != len(tasks):
    raise ValueError(f"generate_dataset: tasks={list(tasks)} must be distinct names from {TASKS}")
  if num_train < 0 or num_test < 0 or num_train + num_test == 0:
    raise ValueError(f"generate_dataset: num_train={num_train}, num_test={num_test} must be "
                     ">= 0 and not both 0")
  if image_format not in IMAGE_FORMATS:
    raise ValueError(f"generate_dataset: image_format={image_format!r}; use one of "
                     f"{IMAGE_FORMATS}")
  info = _expected_info(num_train, num_test, seed, image_size, tasks, image_format)
  info_path = os.path.join(out_dir, INFO_FILE)
  if os.path.exists(info_path):
    with open(info_path, encoding="utf-8") as f:
      old = json.load(f)
    if old == info:
      return info
    if not overwrite:
      raise FileExistsError(
          f"generate_dataset: {info_path} describes another dataset (seed/sizes/tasks differ); "
          "choose a new out_dir or pass overwrite=True (--overwrite) to replace it")
  for split in SPLITS:
    for kind in ("images", "landmarks"):
      folder = os.path.join(out_dir, "FABAInstruct", split, kind, SOURCE)
      if overwrite and os.path.isdir(folder):
        shutil.rmtree(folder)  # only our own "Synthetic" folders, never the rest of out_dir
      os.makedirs(folder, exist_ok=True)

  jobs = {}
  for task in tasks:
    # AU task: slots 0-5 are the prototype emotions, 6-11 random AU combinations.
    num_classes = len(facs.EMOTIONS) if task == "emotion" else 2 * len(_AU_TASK_EMOTIONS)
    for split, n in (("train", num_train), ("test", num_test)):
      order = _class_order(seed, task, split, n, num_classes)
      jobs[task, split] = [(out_dir, seed, task, split, i, int(order[i]), image_size,
                            image_format) for i in range(n)]
  all_jobs = [job for key in jobs for job in jobs[key]]
  if num_workers > 1:
    # "spawn": forking a process that already runs JAX threads can deadlock.
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(num_workers, mp_context=context) as pool:
      results = list(pool.map(_make_sample, all_jobs, chunksize=64))
  else:
    results = [_make_sample(job) for job in all_jobs]

  annotations = {}
  position = 0
  for (task, split), task_jobs in jobs.items():
    records = []
    for record, annotation in results[position:position + len(task_jobs)]:
      records.append(record)
      annotations[record["id"]] = annotation
    position += len(task_jobs)
    with open(os.path.join(out_dir, f"{task}_{split}.json"), "w", encoding="utf-8") as f:
      json.dump(records, f, indent=2, ensure_ascii=False)
  with open(os.path.join(out_dir, ANNOTATIONS_FILE), "w", encoding="utf-8") as f:
    json.dump(annotations, f, indent=1, sort_keys=True)
  with open(info_path, "w", encoding="utf-8") as f:
    json.dump(info, f, indent=2)
  return info


def render_grid(out_png: str, dataset_dir: str, n: int = 16, split: str = "test") -> str:
  """A PNG grid of `n` faces of a generated dataset, each captioned with emotion and AUs."""
  path = os.path.join(dataset_dir, ANNOTATIONS_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f"render_grid: {path} is missing; {dataset_dir} must be made by "
                            "generate_dataset")
  with open(path, encoding="utf-8") as f:
    annotations = json.load(f)
  with open(os.path.join(dataset_dir, INFO_FILE), encoding="utf-8") as f:
    info = json.load(f)
  # Alternate tasks so a grid shows both kinds of sample.
  per_task = [[k for k, a in annotations.items() if a["task"] == t and a["split"] == split]
              for t in info["tasks"]]
  chosen = []
  while len(chosen) < n and any(per_task):
    for ids in per_task:
      if ids and len(chosen) < n:
        chosen.append(ids.pop(0))
  if not chosen:
    raise ValueError(f"render_grid: {dataset_dir} has no {split} samples")
  cell, caption = 128, 30
  cols = math.ceil(math.sqrt(len(chosen)))
  rows = math.ceil(len(chosen) / cols)
  grid = Image.new("RGB", (cols * cell, rows * (cell + caption)), (255, 255, 255))
  draw = ImageDraw.Draw(grid)
  font = ImageFont.load_default(size=11)
  ext = info["image_format"]
  for k, rid in enumerate(chosen):
    name = rid.split("/", 1)[1]
    img = Image.open(os.path.join(dataset_dir, "FABAInstruct", split, "images", SOURCE,
                                  f"{name}.{ext}")).convert("RGB")
    x, y = (k % cols) * cell, (k // cols) * (cell + caption)
    grid.paste(img.resize((cell, cell), Image.BICUBIC), (x, y))
    a = annotations[rid]
    aus = ",".join(sorted(a["aus"], key=int)) or "none"
    draw.text((x + 3, y + cell + 2), f"{a['emotion'] or 'random AUs'} ({a['task']})",
              fill=(0, 0, 0), font=font)
    draw.text((x + 3, y + cell + 15), f"AU {aus}", fill=(60, 60, 60), font=font)
  os.makedirs(os.path.dirname(os.path.abspath(out_png)), exist_ok=True)
  grid.save(out_png)
  return out_png


def _define_flags():
  # Flags are defined only when run as a program, so importing this module never clashes with
  # the flags of another CLI.
  from absl import flags
  flags.DEFINE_string("out_dir", None, "Data root to write.", required=True)
  flags.DEFINE_integer("num_train", 700, "Training samples per task.")
  flags.DEFINE_integer("num_test", 140, "Test samples per task.")
  flags.DEFINE_integer("seed", 0, "Random seed.")
  flags.DEFINE_integer("image_size", 128, "Image side in pixels.")
  flags.DEFINE_list("tasks", list(TASKS), "Tasks: emotion, au.")
  flags.DEFINE_enum("image_format", "jpg", list(IMAGE_FORMATS), "Image file format.")
  flags.DEFINE_integer("num_workers", 1, "Rendering processes.")
  flags.DEFINE_bool("overwrite", False, "Replace a dataset made with other arguments.")
  flags.DEFINE_string("grid", None, "Also write a PNG grid of test faces to this path.")
  return flags.FLAGS


def run() -> None:
  from absl import app
  flag_values = _define_flags()

  def main(argv):
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    info = generate_dataset(flag_values.out_dir, flag_values.num_train, flag_values.num_test,
                            flag_values.seed, flag_values.image_size, flag_values.tasks,
                            flag_values.image_format, flag_values.num_workers,
                            flag_values.overwrite)
    print(json.dumps(info["counts"]), "->", flag_values.out_dir)
    if flag_values.grid:
      print("grid:", render_grid(flag_values.grid, flag_values.out_dir))

  app.run(main)


if __name__ == "__main__":
  run()
