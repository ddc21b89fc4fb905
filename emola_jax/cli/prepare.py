"""emola-prepare: turn FABA-Instruct, a classic dataset or a synthetic set into training shards.

Pipeline (`prepare`):

1. records: read the FABA-Instruct JSON files (`faba`), convert a classic dataset's own label
   files (`rafdb`, `affectnet`, `bp4d`, `disfa`, `gft`), or generate a synthetic FABA-layout
   dataset into `<output>/raw` and read that (`synthetic`);
2. priors (`--prior=npy`): load every record's landmark `.npy` (finite numbers, flattened to 1-D);
   the split's prior length is `--prior_dim` or else the most common length over all splits;
   other lengths are `bad_landmark`. `--prior=none` stores empty priors;
3. images: read each file and decode it fully with PIL (truncated/corrupt files are caught);
   the stored bytes are the file exactly as on disk;
4. shards: write `<split>.array_record-*` + `<split>.meta.json` (see `emola_jax.data.shards`)
   and `prepare.json` (counts, settings, skips that belong to no split), then print counts per
   split and a skip table (reason -> count, first few records).

Bad records are skipped and counted (`emola_jax.data.skips`); `--strict` makes the first one an
error (non-zero exit) naming the file and record. A file that is unusable as a whole (malformed
JSON, missing label file) is always an error.
"""

from __future__ import annotations

import collections
import concurrent.futures
import io
import json
import os
import re
import sys
from typing import Any, Iterator, Sequence, TextIO

import numpy as np
from absl import app, flags
from PIL import Image

from emola_jax.cli import runner
from emola_jax.data import classic, faba_instruct, shards
from emola_jax.data.records import TASKS, DataFileError, Record
from emola_jax.data.skips import SkipReport, StrictSkipError

FORMATS = ("faba", "rafdb", "affectnet", "bp4d", "disfa", "gft", "synthetic")
PRIORS = ("npy", "none")
_CHUNK = 64  # images decoded per batch of worker tasks (bounds memory with --workers > 1)


class PrepareError(ValueError):
  """Bad arguments or inputs to `prepare` (the message says which flag or file)."""


# ----------------------------------------------------------------------------- records


def _split_name_of(json_path: str) -> str:
  stem = os.path.splitext(os.path.basename(json_path))[0].lower()
  words = set(re.split(r"[^a-z]+", stem))
  if "train" in words:
    return "train"
  if words & {"test", "eval", "evaluation", "bench"}:
    return "test"
  return re.sub(r"[^A-Za-z0-9_.-]", "_", stem)


def _faba_files(input_dir: str, splits: Sequence[str] | None,
                task: str | None) -> dict[str, str]:
  """split -> JSON path, from `--splits` ("name=path" or "path") or the root's annotation files."""
  chosen: dict[str, str] = {}
  if splits:
    for item in splits:
      name, sep, path = item.partition("=")
      if not sep:
        name, path = _split_name_of(item), item
      path = path if os.path.isabs(path) else os.path.join(input_dir, path)
      if name in chosen:
        raise PrepareError(f"--splits names split {name!r} twice; write name=path.json")
      chosen[name] = path
    return chosen
  # Every *.json of the root whose name tells its task (others, e.g. dataset_info.json, are
  # not annotation files). Train/test splits are always "<task>_<split>", the names emola-train
  # reads by default, whether one task or both are present.
  found: dict[str, list[str]] = {}
  for name in sorted(n for n in os.listdir(input_dir) if n.lower().endswith(".json")):
    try:
      file_task = faba_instruct.infer_task(name)
    except DataFileError:
      continue
    if task is None or file_task == task:
      found.setdefault(file_task, []).append(name)
  for file_task, names in found.items():
    for name in names:
      split = _split_name_of(name)
      if split in ("train", "test"):
        split = f"{file_task}_{split}"
      if split in chosen:
        raise PrepareError(f"{input_dir}: {os.path.basename(chosen[split])} and {name} would both "
                           f"be split {split!r}; pass --splits=name=file.json,...")
      chosen[split] = os.path.join(input_dir, name)
  if not chosen:
    raise PrepareError(f"{input_dir}: no FABA-Instruct *.json annotation file"
                       + (f" for task {task!r}" if task else "") + "; pass --splits=name=file.json")
  return chosen


def load_records(source_format: str, input_dir: str, *, splits: Sequence[str] | None,
                 task: str | None, strict: bool, seed: int, num_folds: int, fold: int | None,
                 num_classes: int, raf_aligned: bool, aus: Sequence[int] | None,
                 landmark_dir: str | None, use_landmarks: bool = True,
                 ) -> tuple[dict[str, list[Record]], dict[str, SkipReport], dict[str, str]]:
  """Records, skip reports (skips belonging to no split under "") and origin per split.

  The origin (annotation file or dataset folder) names where a record came from in skip
  messages of the later image and landmark checks.
  """
  if not os.path.isdir(input_dir):
    raise PrepareError(f"--input={input_dir} is not a directory")
  if source_format == "faba":
    records, reports, origins = {}, {}, {}
    for split, path in _faba_files(input_dir, splits, task).items():
      records[split], reports[split] = faba_instruct.read_split(
          path, input_dir, task, strict=strict, check_landmarks=use_landmarks)
      origins[split] = path
    return records, reports, origins
  if source_format not in classic.CONVERTERS:
    raise PrepareError(f"--format={source_format} is not one of {FORMATS}")
  if task is not None and task != classic.TASK_OF[source_format]:
    raise PrepareError(f"--format={source_format} is an {classic.TASK_OF[source_format]} dataset; "
                       f"--task={task} does not fit")
  options: dict[str, Any] = {"seed": seed, "strict": strict, "landmark_dir": landmark_dir}
  if source_format == "affectnet":
    options["num_classes"] = num_classes
  if source_format == "rafdb":
    options["aligned"] = raf_aligned
  if source_format in classic.FOLD_FORMATS:
    options.update(num_folds=num_folds, fold=fold)
    if aus:
      options["aus"] = tuple(aus)
  converted = classic.CONVERTERS[source_format](input_dir, **options)
  records = {s: converted.records.get(s, []) for s in converted.splits}
  reports = {s: converted.report(s) for s in converted.splits}
  if "" in converted.skips:
    reports[""] = converted.skips[""]
  if splits:
    unknown = sorted(set(splits) - set(records))
    if unknown:
      raise PrepareError(f"--splits names {unknown}, but {source_format} gives {sorted(records)}")
    records = {s: records[s] for s in splits}
    reports = {s: r for s, r in reports.items() if s in splits or s == ""}
  # Named as FABA splits are ("rafdb" train -> "emotion_train"), so emola-train's default
  # "<task>_train" finds them; other split names (folds) stay.
  task_of = classic.TASK_OF[source_format]
  name = {s: f"{task_of}_{s}" if s in ("train", "test") else s for s in records}
  records = {name[s]: r for s, r in records.items()}
  reports = {name.get(s, s): r for s, r in reports.items()}
  return records, reports, {s: f"{input_dir} ({source_format} {s})" for s in records}


# ----------------------------------------------------------------------------- priors


def load_prior(path: str) -> np.ndarray:
  """A landmark .npy as a finite float32 1-D array.

  Raises:
    ValueError: unreadable, pickled, non-numeric, empty or non-finite.
  """
  try:
    array = np.load(path, allow_pickle=False)
  except (OSError, ValueError, EOFError) as e:
    raise ValueError(f"cannot read as .npy ({type(e).__name__}: {e})") from e
  if not isinstance(array, np.ndarray):
    raise ValueError(f"holds a {type(array).__name__}, not one array (an .npz?)")
  if array.dtype.kind not in "fiu":
    raise ValueError(f"dtype {array.dtype} is not a real number type")
  flat = array.astype(np.float32).reshape(-1)
  if flat.size == 0:
    raise ValueError(f"is empty (shape {array.shape})")
  if not np.all(np.isfinite(flat)):
    raise ValueError(f"has {int(np.sum(~np.isfinite(flat)))} non-finite value(s) (as float32)")
  return flat


def _load_priors(records: dict[str, list[Record]], reports: dict[str, SkipReport],
                 origins: dict[str, str], input_dir: str, prior_dim: int | None,
                 out: TextIO
                 ) -> tuple[dict[str, list[Record]], dict[str, dict[str, np.ndarray]], int]:
  """Loads the .npy of every record; returns kept records, split -> id -> prior, prior length."""
  priors: dict[str, dict[str, np.ndarray]] = {}
  kept: dict[str, list[Record]] = {}
  # Records with and without priors cannot be batched together, nor a model trained on one and
  # evaluated on the other: once any record has a landmark, every record needs one.
  any_landmark = any(r.landmark is not None for recs in records.values() for r in recs)
  if not any_landmark and prior_dim:
    raise PrepareError(f"--prior_dim={prior_dim} but no record has a landmark file (classic "
                       "datasets: give --landmark_dir; or use --prior=none)")
  for split, recs in records.items():
    priors[split], kept[split] = {}, []
    for record in recs:
      ref = f"{origins[split]} id={record.id}"
      if record.landmark is None:
        if any_landmark:
          reports[split].add("missing_landmark", ref, "record has no 'landmark' but other records "
                             "do (use --prior=none to ignore all landmarks)")
          continue
        kept[split].append(record)
        continue
      path = os.path.join(input_dir, record.landmark)
      if not os.path.isfile(path):
        reports[split].add("missing_landmark", ref, f"{record.landmark} not found")
        continue
      try:
        priors[split][record.id] = load_prior(path)
      except ValueError as e:
        reports[split].add("bad_landmark", ref, f"{record.landmark} {e}")
        continue
      kept[split].append(record)
  sizes = collections.Counter(p.size for split_priors in priors.values()
                              for p in split_priors.values())
  if prior_dim is None:
    prior_dim = max(sizes, key=lambda s: (sizes[s], s)) if sizes else 0
    if len(sizes) > 1:
      print(f"note: landmark files have lengths {dict(sizes)}; using the most common, {prior_dim} "
            "(set --prior_dim to choose)", file=out)
  flat: dict[str, dict[str, np.ndarray]] = {}
  for split in records:
    good, flat[split] = [], {}
    for record in kept[split]:
      prior = priors[split].get(record.id)
      if prior is not None and prior.size != prior_dim:
        reports[split].add("bad_landmark", f"{origins[split]} id={record.id}",
                           f"{record.landmark} has {prior.size} values, expected {prior_dim}")
        continue
      if prior is not None:
        flat[split][record.id] = prior
      good.append(record)
    kept[split] = good
  return kept, flat, prior_dim


# ----------------------------------------------------------------------------- images


def read_image(path: str) -> bytes:
  """The image file's bytes, after checking that PIL decodes it completely.

  Raises:
    FileNotFoundError: no such file.
    ValueError: unreadable or not a decodable image (message says why).
  """
  with open(path, "rb") as f:
    data = f.read()
  try:
    with Image.open(io.BytesIO(data)) as image:
      image.load()
      if image.width < 1 or image.height < 1:
        raise ValueError("has no pixels")
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    raise ValueError(f"cannot be decoded ({type(e).__name__}: {e})") from e
  return data


def _example_or_skip(record: Record, input_dir: str,
                     prior: np.ndarray) -> tuple[dict[str, Any] | None, tuple[str, str] | None]:
  try:
    data = read_image(os.path.join(input_dir, record.image))
  except FileNotFoundError:
    return None, ("missing_image", f"{record.image} not found")
  except IsADirectoryError:
    return None, ("missing_image", f"{record.image} is a directory")
  except ValueError as e:
    return None, ("corrupt_image", f"{record.image} {e}")
  except OSError as e:
    return None, ("corrupt_image", f"{record.image} unreadable ({e})")
  return {
      "id": record.id,
      "source": record.source,
      "task": record.task or "",
      "image_bytes": data,
      "prior": prior,
      "conversations": [t.to_json() for t in record.conversations],
      "label": record.label or "",
      "gpt4": record.gpt4 or "",
  }, None


def _examples(origin: str, records: list[Record], priors: dict[str, np.ndarray], input_dir: str,
              report: SkipReport, workers: int) -> Iterator[dict[str, Any]]:
  empty = np.zeros(0, np.float32)
  pool = concurrent.futures.ThreadPoolExecutor(workers) if workers > 1 else None
  try:
    for start in range(0, len(records), _CHUNK):
      chunk = records[start:start + _CHUNK]
      args = [(r, input_dir, priors.get(r.id, empty)) for r in chunk]
      results = (pool.map(lambda a: _example_or_skip(*a), args) if pool
                 else (_example_or_skip(*a) for a in args))
      for record, (example, skip) in zip(chunk, results):
        if skip is not None:
          report.add(skip[0], f"{origin} id={record.id}", skip[1])
          continue
        yield example
  finally:
    if pool:
      pool.shutdown(cancel_futures=True)


# ----------------------------------------------------------------------------- pipeline


def prepare(source_format: str, input_dir: str, output_dir: str,
            splits: Sequence[str] | None = None, strict: bool = False, *,
            task: str | None = None, seed: int = 0, prior: str = "npy",
            prior_dim: int | None = None, num_folds: int = 3, fold: int | None = None,
            examples_per_shard: int = 2048, num_classes: int = 7, raf_aligned: bool = True,
            aus: Sequence[int] | None = None, landmark_dir: str | None = None, workers: int = 1,
            num_train: int = 64, num_test: int = 16, image_size: int = 128,
            out: TextIO | None = None) -> dict[str, dict[str, Any]]:
  """Runs the whole pipeline; returns the meta of every written split.

  Args:
    source_format: one of `FORMATS`.
    input_dir: the data root (for `synthetic`: ignored, the data goes to `<output_dir>/raw`).
    output_dir: where shards, metas and `prepare.json` are written.
    splits: faba: "name=file.json" or "file.json" items (default: every *.json of the root
      whose name tells its task, as "<task>_train" / "<task>_test" splits);
      classic: which of the converter's splits to write (default: all).
    strict: the first bad record raises `StrictSkipError` instead of being skipped.
    task: "emotion"/"au"; faba: overrides the file-name inference; classic: checked.
    seed: instruction/answer sampling of converters, fold tie-breaks, synthetic generation.
    prior: "npy" (the records' landmark files) or "none" (empty priors).
    prior_dim: expected prior length (default: the most common one).
    num_folds, fold: subject-exclusive folds of bp4d/disfa/gft (fold None: every fold is a
      split "fold<k>"; else splits "train"/"test").
    examples_per_shard: shard size.
    num_classes: affectnet 7 or 8 (contempt).
    raf_aligned: RAF-DB aligned crops (True) or original images.
    aus: AU subset for bp4d/disfa/gft (default: each dataset's standard set).
    landmark_dir: classic datasets: folder (relative to the root) mirroring the images with
      `.npy` priors.
    workers: threads decoding images.
    num_train, num_test, image_size: synthetic dataset size.
    out: where the summary is printed (stdout by default).

  Raises:
    PrepareError, DataFileError: bad arguments or an unusable file.
    StrictSkipError: strict mode and a bad record.
  """
  out = out or sys.stdout
  if source_format not in FORMATS:
    raise PrepareError(f"--format={source_format!r} is not one of {FORMATS}")
  if prior not in PRIORS:
    raise PrepareError(f"--prior={prior!r} is not one of {PRIORS} (other prior providers are "
                       "wired separately)")
  if task is not None and task not in TASKS:
    raise PrepareError(f"--task={task!r} is not one of {TASKS}")
  if examples_per_shard < 1:
    raise PrepareError(f"--examples_per_shard must be >= 1, got {examples_per_shard}")
  if workers < 1:
    raise PrepareError(f"--workers must be >= 1, got {workers}")
  os.makedirs(output_dir, exist_ok=True)
  if source_format == "synthetic":
    input_dir = _generate_synthetic(output_dir, num_train, num_test, seed, image_size, task,
                                    out)
    source_format_read = "faba"
  else:
    source_format_read = source_format
  records, reports, origins = load_records(
      source_format_read, input_dir, splits=splits, task=task, strict=strict, seed=seed,
      num_folds=num_folds, fold=fold, num_classes=num_classes, raf_aligned=raf_aligned, aus=aus,
      landmark_dir=landmark_dir, use_landmarks=prior == "npy")
  unassigned = reports.pop("", SkipReport(strict=strict))
  for split in records:
    reports.setdefault(split, SkipReport(strict=strict))
  _warn_cross_split_duplicates(records, out)
  if prior == "npy":
    records, priors, dim = _load_priors(records, reports, origins, input_dir, prior_dim, out)
  else:
    priors, dim = {}, 0
  settings = {"format": source_format, "input": os.path.abspath(input_dir), "prior": prior,
              "seed": seed}
  if source_format in classic.FOLD_FORMATS:
    settings.update(num_folds=num_folds, fold=fold)
  metas: dict[str, dict[str, Any]] = {}
  for split, recs in records.items():
    examples = _examples(origins[split], recs, priors.get(split, {}), input_dir, reports[split],
                         workers)
    metas[split] = shards.write_shards(
        examples, output_dir, split, examples_per_shard=examples_per_shard, source=source_format,
        prior_dim=dim, skips=reports[split], extra_meta=settings)
  summary = {**settings, "splits": {s: m["count"] for s, m in metas.items()},
             "prior_dim": dim, "skips": {s: r.counts() for s, r in reports.items()},
             "unassigned_skips": unassigned.as_dict()}
  with open(os.path.join(output_dir, "prepare.json"), "w", encoding="utf-8") as f:
    json.dump(summary, f, indent=1)
  _print_summary(metas, reports, unassigned, dim, output_dir, out)
  return metas


def _warn_cross_split_duplicates(records: dict[str, list[Record]], out: TextIO) -> None:
  where: dict[str, str] = {}
  clashes = []
  for split, recs in records.items():
    for record in recs:
      if record.id in where and where[record.id] != split:
        clashes.append(f"{record.id} ({where[record.id]}, {split})")
      where.setdefault(record.id, split)
  if clashes:
    print(f"warning: {len(clashes)} id(s) are in more than one split (possible leakage), e.g. "
          f"{clashes[:3]}", file=out)


def _generate_synthetic(output_dir: str, num_train: int, num_test: int, seed: int,
                        image_size: int, task: str | None, out: TextIO) -> str:
  from emola_jax.data.synthetic import generate  # Heavy renderer: imported only when asked for.
  raw = os.path.join(output_dir, "raw")
  os.makedirs(raw, exist_ok=True)
  # overwrite=True: <output>/raw belongs to this command; new flags must replace the old data.
  generate.generate_dataset(raw, num_train=num_train, num_test=num_test, seed=seed,
                            image_size=image_size, tasks=(task,) if task else TASKS,
                            overwrite=True)
  print(f"synthetic dataset generated in {raw}", file=out)
  return raw


def _print_summary(metas: dict[str, dict[str, Any]], reports: dict[str, SkipReport],
                   unassigned: SkipReport, prior_dim: int, output_dir: str, out: TextIO) -> None:
  print(f"wrote {output_dir} (prior_dim {prior_dim})", file=out)
  for split, meta in metas.items():
    print(f"  {split}: {meta['count']} examples in {len(meta['shards'])} shard(s); "
          f"sources {meta['sources']}", file=out)
  for split, report in reports.items():
    print(report.format_table(f"{split} skipped"), file=out)
  if unassigned.count():
    print(unassigned.format_table("skipped outside any split"), file=out)
  stale = sorted(n[:-len(".meta.json")] for n in os.listdir(output_dir)
                 if n.endswith(".meta.json") and n[:-len(".meta.json")] not in metas)
  if stale:
    print(f"note: {output_dir} also holds splits {stale} from an earlier run (not rewritten now)",
          file=out)


# ----------------------------------------------------------------------------- CLI

# The flags live in their own FlagValues (see emola_jax.cli.runner).


def define_flags(fv: flags.FlagValues) -> flags.FlagValues:
  """Defines emola-prepare's flags in `fv` and returns it."""
  flags.DEFINE_enum("format", "faba", FORMATS, "Input dataset format.", flag_values=fv)
  flags.DEFINE_string("input", None, "Data root (image/label paths are relative to it).",
                      flag_values=fv)
  flags.DEFINE_string("output", None, "Output folder for shards and metadata.", flag_values=fv)
  flags.DEFINE_enum("task", None, list(TASKS), "Task (faba: default from file names).",
                    flag_values=fv)
  flags.DEFINE_list("splits", None, "faba: name=file.json items (default: the *.json files in "
                    "--input named after a task); classic: which splits to write (default: all).",
                    flag_values=fv)
  flags.DEFINE_bool("strict", False, "Fail on the first bad record instead of skipping it.",
                    flag_values=fv)
  flags.DEFINE_integer("seed", 0, "Seed for instructions, answers, fold tie-breaks, synthetic "
                       "data.", flag_values=fv)
  flags.DEFINE_integer("num_folds", 3, "Subject-exclusive folds (bp4d, disfa, gft).",
                       flag_values=fv)
  flags.DEFINE_integer("fold", None, "Test fold: write train/test for it (default: every fold "
                       "as its own split fold0..).", flag_values=fv)
  flags.DEFINE_integer("examples_per_shard", 2048, "Examples per ArrayRecord shard.",
                       flag_values=fv)
  flags.DEFINE_enum("prior", "npy", list(PRIORS), "Landmark prior source.", flag_values=fv)
  flags.DEFINE_integer("prior_dim", None, "Expected prior length (default: most common).",
                       flag_values=fv)
  flags.DEFINE_enum("num_classes", "7", ["7", "8"], "AffectNet: 7 classes, or 8 with contempt.",
                    flag_values=fv)
  flags.DEFINE_enum("raf_images", "aligned", ["aligned", "original"], "RAF-DB image folder.",
                    flag_values=fv)
  flags.DEFINE_list("aus", None, "bp4d/disfa/gft: AU numbers to use (default: standard set).",
                    flag_values=fv)
  flags.DEFINE_string("landmark_dir", None, "Classic datasets: folder (relative to --input) "
                      "mirroring the images with .npy priors.", flag_values=fv)
  flags.DEFINE_integer("workers", 1, "Threads decoding images.", flag_values=fv)
  flags.DEFINE_integer("num_train", 64, "synthetic: training records.", flag_values=fv)
  flags.DEFINE_integer("num_test", 16, "synthetic: test records.", flag_values=fv)
  flags.DEFINE_integer("image_size", 128, "synthetic: image side in pixels.", flag_values=fv)
  return fv


def _prepare_from_flags(fv: flags.FlagValues) -> int:
  if fv.input is None and fv.format != "synthetic":
    raise app.UsageError("--input is required (the data root)")
  try:
    aus = [int(a) for a in fv.aus] if fv.aus else None
  except ValueError:
    raise app.UsageError(f"--aus must be AU numbers, got {fv.aus}") from None
  prepare(fv.format, fv.input or "", fv.output, fv.splits, fv.strict,
          task=fv.task, seed=fv.seed, prior=fv.prior, prior_dim=fv.prior_dim,
          num_folds=fv.num_folds, fold=fv.fold,
          examples_per_shard=fv.examples_per_shard, num_classes=int(fv.num_classes),
          raf_aligned=fv.raf_images == "aligned", aus=aus, landmark_dir=fv.landmark_dir,
          workers=fv.workers, num_train=fv.num_train, num_test=fv.num_test,
          image_size=fv.image_size)
  return 0


COMMAND = runner.Command(
    "emola-prepare", __doc__, define_flags, _prepare_from_flags, required=("output",),
    errors=(StrictSkipError, DataFileError, PrepareError, ValueError))
main, cli, run = COMMAND.main, COMMAND.cli, COMMAND.run


if __name__ == "__main__":
  run()
