"""emola-infer: answer the FABA-Bench question (or your own) for image files, one record each.

  emola-infer --checkpoint=run/final --images='photos/*.jpg' --task=emotion --output=out.jsonl
  emola-infer --checkpoint=run/final --images=faces/ --task=au --detect --output=out.csv

For each image: decode it, optionally detect the face and crop around it (`--detect`), compute
the landmark prior (`--prior`), build the vicuna_v1 prompt with the fixed FABA-Bench question of
`--task` (or `--prompt`), generate in batches, and write one record: path, status, reason, text,
emotion (the class read by the strict parser, or null), aus (the AU numbers read by the strict
parser), seconds (this image's preparation plus its share of its batch's generation), n_tokens,
finished (the answer ended with EOS), prior (where the prior came from), face_box (the detected
face as [left, top, width, height] pixels, with --detect or a computed prior).

An image that cannot be read, has no face, or has no usable prior gets status `unreadable`,
`no_face` or `no_prior` with the reason, and the run goes on. `--images` takes a file, a folder
(its image files, recursively), or a glob; repeat it for several. The output is JSONL or CSV by
its extension. Exit status: 0 when the run finished (even with failed images), 1 on an error
that stops it (bad flags, checkpoint, prior that does not fit the model).
"""

from __future__ import annotations

import collections
import csv
import glob
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
from absl import flags
from PIL import Image

from emola_jax.cli import runner
from emola_jax.data import images as images_lib
from emola_jax.data import instructions
from emola_jax.evaluation import au_parse
from emola_jax.evaluation import emotion_parse
from emola_jax.evaluation import predict

PROG = "emola-infer"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif")
OUTPUT_FORMATS = {".jsonl": "jsonl", ".csv": "csv"}
MAX_FAILURES_SHOWN = 10
COLUMNS = ("path", "status", "reason", "text", "emotion", "aus", "seconds", "n_tokens",
           "finished", "prior", "face_box")


class InferError(ValueError):
  """A flag or input that stops the run; the message names it."""


def define_flags(fv: flags.FlagValues) -> flags.FlagValues:
  """Defines emola-infer's flags in `fv` and returns it."""
  predict.define_shared_flags(fv, batch_size=4, max_new_tokens=1024)
  flags.DEFINE_multi_string("images", None, "An image file, a folder (its image files, "
                            "recursively) or a glob (quote it); repeat for several.",
                            flag_values=fv)
  flags.DEFINE_enum("task", "emotion", ["emotion", "au"], "Which FABA-Bench question to ask.",
                    flag_values=fv)
  flags.DEFINE_string("prompt", None, "Ask this question instead of the task's FABA-Bench one.",
                      flag_values=fv)
  flags.DEFINE_string("output", None, "Output file: .jsonl or .csv.", flag_values=fv)
  flags.DEFINE_bool("detect", False, "Detect the face (dlib) and give the model a square crop "
                    "around it; an image without a face is reported as no_face.", flag_values=fv)
  flags.DEFINE_float("crop_scale", 1.5, "--detect: side of the square crop as a multiple of the "
                     "detected face box's longer side.", flag_values=fv)
  return fv


def list_images(specs: Sequence[str]) -> tuple[list[str], list[str]]:
  """The image paths named by `--images` values, in order, without repeats, and notes about
  files left out (non-image files in folders, .npy priors matched by a glob).

  Raises:
    InferError: a value that names nothing.
  """
  paths: list[str] = []
  notes: list[str] = []
  for spec in specs:
    if os.path.isdir(spec):
      found, other = [], []
      for root, dirs, files in os.walk(spec):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
          if name.startswith("."):
            continue
          path = os.path.join(root, name)
          (found if name.lower().endswith(IMAGE_EXTENSIONS) else other).append(path)
      if other:
        shown = ", ".join(os.path.basename(p) for p in other[:5])
        notes.append(f"{spec}: left out {len(other)} file(s) without an image extension "
                     f"({shown}{', ...' if len(other) > 5 else ''})")
      if not found:
        raise InferError(f"--images={spec}: the folder holds no image files "
                         f"({', '.join(IMAGE_EXTENSIONS)})")
      paths += found
    elif os.path.isfile(spec):
      paths.append(spec)
    else:
      matches = sorted(p for p in glob.glob(spec, recursive=True) if os.path.isfile(p))
      if not matches:
        raise InferError(f"--images={spec}: no such file or folder, and no file matches it as a "
                         "glob")
      priors_matched = [p for p in matches if p.lower().endswith(".npy")]
      if priors_matched:
        notes.append(f"{spec}: left out {len(priors_matched)} .npy prior file(s)")
      paths += [p for p in matches if not p.lower().endswith(".npy")]
  seen: set[str] = set()
  unique = [p for p in paths if not (p in seen or seen.add(p))]
  if not unique:
    raise InferError("--images names no image")
  return unique, notes


def crop_face(image: Image.Image, box: Any, scale: float) -> Image.Image:
  """A square crop centred on the face box, side = scale x its longer side; parts outside the
  image are filled with the CLIP mean colour (as LLaVA pads)."""
  side = max(1, int(round(scale * max(box.width, box.height))))
  left = int(round(box.left + box.width / 2 - side / 2))
  top = int(round(box.top + box.height / 2 - side / 2))
  width, height = image.size
  canvas = Image.new("RGB", (side, side), images_lib.PAD_COLOR)
  inside = (max(left, 0), max(top, 0), min(left + side, width), min(top + side, height))
  if inside[0] < inside[2] and inside[1] < inside[3]:
    canvas.paste(image.crop(inside), (inside[0] - left, inside[1] - top))
  return canvas


def load_image(path: str) -> Image.Image:
  """Decodes an image file to RGB, as `images.decode_image` does for bytes.

  Raises:
    predict.SampleFailure: UNREADABLE, naming the file and PIL's reason.
  """
  try:
    with Image.open(path) as opened:
      opened.load()
      return opened.convert("RGB")
  except Exception as e:  # pylint: disable=broad-except  (PIL raises many unrelated types)
    raise predict.SampleFailure(predict.UNREADABLE,
                                f"{path}: cannot read it as an image ({e})") from None


def stored_prior_path(image_path: str) -> str:
  """Where a stored prior of an image lives: `<image without extension>.npy`."""
  return os.path.splitext(image_path)[0] + ".npy"


def resolve_prior(name: str, config: Any) -> str:
  """The prior mode of this run: "none", "npy", "dlib", "face_alignment" or "npy_or_dlib"
  (auto on a 136-d model: a stored prior when there is one, dlib otherwise).

  Raises:
    predict.PriorMismatchError: the provider cannot feed this model's prior token.
  """
  if name == "auto":
    if not config.has_prior:
      return "none"
    return "npy_or_dlib" if config.prior_dim == predict.COMPUTED_PRIOR_DIM else "npy"
  predict.check_provider(config, name)
  return name


class ImagePreparer:
  """Image path -> `predict.Prepared` (decoding, detection and crop, prior, prompt)."""

  def __init__(self, config: Any, prompt_ids: np.ndarray, prior_mode: str, *, detect: bool,
               crop_scale: float, image_mode: str, aligned: bool, upsample: int,
               fan_weights: str | None):
    # pylint: disable-next=import-outside-toplevel
    from emola_jax.data import priors

    self._priors = priors
    self.config = config
    self.prompt_ids = prompt_ids
    self.prior_mode = prior_mode
    self.detect = detect
    self.crop_scale = crop_scale
    self.image_mode = image_mode
    options = dict(aligned=aligned, upsample=upsample, fan_weights=fan_weights)
    computed = {"npy_or_dlib": "dlib"}.get(prior_mode, prior_mode)
    self.computed = (predict.make_prior_provider(computed, config, **options)
                     if computed in ("dlib", "face_alignment") else None)
    self.npy = (predict.make_prior_provider("npy", config)
                if prior_mode in ("npy", "npy_or_dlib") else None)
    # Finds the face to crop when the prior did not detect it (stored or aligned priors). dlib's
    # models are loaded once per process and shared with the prior provider.
    self.detector = priors.DlibPrior(detect=True, upsample=upsample) if detect else None

  def _stored_prior(self, path: str) -> np.ndarray | None:
    npy_path = stored_prior_path(path)
    if not os.path.exists(npy_path):
      return None
    try:
      return np.load(npy_path, allow_pickle=False)
    except (OSError, ValueError) as e:
      raise predict.SampleFailure(predict.NO_PRIOR, f"{npy_path}: cannot read the stored prior "
                                  f"({e})") from None

  def __call__(self, path: str) -> predict.Prepared:
    priors = self._priors
    image = load_image(path)
    info: dict[str, Any] = {"prior": None, "face_box": None}
    box, prior = None, None
    try:
      stored = self._stored_prior(path) if self.npy is not None else None
      if self.prior_mode == "npy" or (self.prior_mode == "npy_or_dlib" and stored is not None):
        if stored is None:
          raise priors.MissingPriorError(
              f"{path}: no stored prior {stored_prior_path(path)}; "
              f"{predict.prior_hint(self.config)}")
        prior, info["prior"] = self.npy(image, stored, path), "npy"
      elif self.computed is not None:
        name = "dlib" if self.prior_mode == "npy_or_dlib" else self.prior_mode
        if self.computed.detect:
          points, box = self.computed.landmarks(image, path)
          prior = self.computed.normalise(points, box, path)
        else:
          prior = self.computed(image, None, path)
        info["prior"] = name
      if self.detect and box is None:
        _, box = self.detector.landmarks(image, path)
    except priors.NoFaceError as e:
      hint = "" if self.detect else "; pass --aligned if the images are face crops already"
      raise predict.SampleFailure(predict.NO_FACE, f"{e}{hint}", info) from None
    except priors.MissingPriorError as e:
      raise predict.SampleFailure(predict.NO_PRIOR, str(e), info) from None
    if box is not None:
      info["face_box"] = [int(round(v)) for v in (box.left, box.top, box.width, box.height)]
    if self.detect:
      image = crop_face(image, box, self.crop_scale)
    return predict.Prepared(self.prompt_ids, predict.pixel_values(image, self.config,
                                                                  self.image_mode),
                            np.asarray(prior, np.float32) if self.config.has_prior else None,
                            info)


def record_of(outcome: predict.Outcome) -> dict[str, Any]:
  """One output record (see the module docstring)."""
  text = outcome.text
  emotion, aus = None, None
  if text is not None:
    label = emotion_parse.parse_emotion(text, "strict").label
    emotion = None if label is None else emotion_parse.EMOTION_CLASSES[label]
    aus = sorted(au_parse.parse_au_prediction(text, "strict").aus)
  return {"path": outcome.item, "status": outcome.status, "reason": outcome.reason,
          "text": text, "emotion": emotion, "aus": aus, "seconds": round(outcome.seconds, 6),
          "n_tokens": outcome.n_tokens, "finished": outcome.finished,
          "prior": outcome.info.get("prior"), "face_box": outcome.info.get("face_box")}


class RecordWriter:
  """Writes records as JSONL or CSV, flushed after each record (a crash keeps what was done)."""

  def __init__(self, path: str, fmt: str):
    self.fmt = fmt
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    self.stream = open(path, "w", encoding="utf-8", newline="" if fmt == "csv" else None)
    self.csv = csv.DictWriter(self.stream, COLUMNS) if fmt == "csv" else None
    if self.csv:
      self.csv.writeheader()

  def write(self, record: dict[str, Any]) -> None:
    if self.csv is None:
      self.stream.write(json.dumps(record, ensure_ascii=False) + "\n")
    else:
      row = dict(record)
      row["aus"] = "" if record["aus"] is None else ", ".join(map(str, record["aus"]))
      row["face_box"] = "" if record["face_box"] is None else " ".join(map(str,
                                                                          record["face_box"]))
      row = {k: "" if v is None else v for k, v in row.items()}
      self.csv.writerow(row)
    self.stream.flush()

  def close(self) -> None:
    self.stream.close()


def infer(fv: flags.FlagValues) -> dict[str, Any]:
  """Runs emola-infer with parsed flags; returns a summary dict."""
  output = fv.output
  fmt = OUTPUT_FORMATS.get(os.path.splitext(output)[1].lower())
  if fmt is None:
    raise InferError(f"--output={output}: the file must end in .jsonl or .csv")
  if os.path.exists(output) and not fv.overwrite:
    raise InferError(f"--output={output} exists; pass --overwrite to replace it")
  if fv.detect and fv.aligned:
    raise InferError("--detect and --aligned exclude each other: --aligned says the images are "
                     "face crops already")
  if fv.crop_scale <= 0:
    raise InferError(f"--crop_scale={fv.crop_scale} must be > 0")
  paths, notes = list_images(fv.images)
  for note in notes:
    print(f"{PROG}: {note}", file=sys.stderr)
  question = fv.prompt if fv.prompt is not None else instructions.EVAL_PROMPTS[fv.task]
  if not question.strip():
    raise InferError("--prompt is empty")

  loaded = predict.load_checkpoint(fv.checkpoint, tokenizer=fv.tokenizer, dtype=fv.dtype)
  config = loaded.config
  prior_mode = resolve_prior(fv.prior, config)
  if prior_mode == "face_alignment" and not fv.fan_weights:
    raise InferError("--prior=face_alignment needs --fan_weights=FILE (the 2D FAN weights)")
  preparer = ImagePreparer(config, predict.PromptBuilder(loaded.tokenizer, config)(question),
                           prior_mode, detect=fv.detect, crop_scale=fv.crop_scale,
                           image_mode=fv.image_mode, aligned=fv.aligned, upsample=fv.upsample,
                           fan_weights=fv.fan_weights)
  predictor = predict.Predictor(loaded, batch_size=fv.batch_size,
                                max_new_tokens=fv.max_new_tokens, temperature=fv.temperature,
                                top_p=fv.top_p, seed=fv.seed)
  print(f"{PROG}: {len(paths)} image(s), checkpoint {fv.checkpoint} ({loaded.kind}), prior "
        f"{prior_mode}, question {question!r}", file=sys.stderr)
  writer = RecordWriter(output, fmt)
  failures: list[predict.Outcome] = []
  try:
    for outcome in predictor.run(paths, preparer, desc=PROG, num_workers=fv.num_workers,
                                 progress=fv.progress):
      writer.write(record_of(outcome))
      if outcome.status != predict.OK:
        failures.append(outcome)
  finally:
    writer.close()
  for outcome in failures[:MAX_FAILURES_SHOWN]:
    print(f"{PROG}: {outcome.status}: {outcome.reason}", file=sys.stderr)
  if len(failures) > MAX_FAILURES_SHOWN:
    print(f"{PROG}: ... {len(failures) - MAX_FAILURES_SHOWN} more failed image(s), see {output}",
          file=sys.stderr)
  failed = collections.Counter(o.status for o in failures)
  stats = predictor.stats.as_dict()
  return {"n": len(paths), "answered": stats["n_answered"], "failed": dict(failed),
          "stats": stats, "output": output}


def summary_line(summary: dict[str, Any]) -> str:
  stats = summary["stats"]
  failed = summary["failed"]
  failures = (" (" + ", ".join(f"{k} {v}" for k, v in sorted(failed.items())) + ")"
              if failed else "")
  rate = stats["tokens_per_second"]
  return (f"{PROG}: {summary['n']} image(s): {summary['answered']} answered, "
          f"{sum(failed.values())} failed{failures}; {stats['seconds_per_input']:.3f} s/image"
          + (f", {rate:.1f} tokens/s" if rate else "") + f"; wrote {summary['output']}")


def _infer_and_print(fv: flags.FlagValues) -> int:
  print(summary_line(infer(fv)))
  return 0


COMMAND = runner.Command(
    PROG, __doc__, define_flags, _infer_and_print, required=("checkpoint", "images", "output"),
    errors=(InferError, predict.CheckpointLoadError, predict.PriorMismatchError,
            FileNotFoundError, ValueError), quiet_logs=True)
main, cli, run = COMMAND.main, COMMAND.cli, COMMAND.run


if __name__ == "__main__":
  run()
