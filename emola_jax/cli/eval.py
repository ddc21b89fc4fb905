"""emola-eval: FABA-Bench (or a classic benchmark) for a checkpoint: generate, score, report.

  # FABA-Bench emotion test set, reference protocol
  emola-eval --checkpoint=run/final --data=prepared --splits=emotion_test --task=emotion \\
      --output=eval/emotion
  # BP4D, one model per fold (trained on the other folds), per-AU F1 averaged over the folds
  emola-eval --folds=fold0=runs/f0/final,fold1=runs/f1/final,fold2=runs/f2/final \\
      --data=bp4d_prepared --task=au --aus=bp4d --output=eval/bp4d

Every example of the prepared `--splits` (shards written by emola-prepare) is asked the fixed
FABA-Bench question of `--task` (`--record_prompt` asks the record's own human turn instead),
answered in batches, and scored with `emola_jax.evaluation.scoring` (the emola-score rules,
`--protocol`). Several splits are each scored on their own and then averaged (the
cross-validation protocol of BP4D/DISFA/GFT: F1 averaged over folds); `--folds=SPLIT=CKPT,...`
evaluates each fold split with its own checkpoint.

Written into `--output`:
  predictions.jsonl  one line per answered example: {id, split, prediction, label, reference,
                     n_tokens, finished} (the emola-score input format plus id)
  failures.jsonl     examples that could not be answered (unreadable image, no face, no
                     prior), with the reason; they are not scored and are counted in the report
  report.json        the score dict (the average with several splits, and `per_split`),
                     settings, counts, timing
  report.md          the same as readable tables
  confusion*.png / au_f1*.png  the emotion confusion matrix / the per-AU F1 bars
"""

from __future__ import annotations

import collections
import glob
import json
import os
import sys
import time
from typing import Any

from absl import flags

from emola_jax.cli import runner
from emola_jax.data import images as images_lib
from emola_jax.data import instructions
from emola_jax.evaluation import au_parse
from emola_jax.evaluation import emotion_parse
from emola_jax.evaluation import predict
from emola_jax.evaluation import report as report_lib
from emola_jax.evaluation import scoring

PROG = "emola-eval"
OUTPUT_FILES = ("predictions.jsonl", "failures.jsonl", "report.json", "report.md")


class EvalError(ValueError):
  """A flag, data or record problem that stops the evaluation; the message names it."""


def define_flags(fv: flags.FlagValues) -> flags.FlagValues:
  """Defines emola-eval's flags in `fv` and returns it."""
  predict.define_shared_flags(fv, batch_size=16, max_new_tokens=2048)
  flags.DEFINE_string("data", None, "Folder of prepared shards (emola-prepare --output).",
                      flag_values=fv)
  flags.DEFINE_list("splits", None, "Split(s) to evaluate, e.g. emotion_test, or fold0,fold1,"
                    "fold2 (each scored, then averaged).", flag_values=fv)
  flags.DEFINE_list("folds", None, "SPLIT=CHECKPOINT pairs: each fold split is evaluated with its "
                    "own checkpoint (replaces --checkpoint and --splits); scores are averaged.",
                    flag_values=fv)
  flags.DEFINE_enum("task", None, ["emotion", "au"], "Which task to ask and score.",
                    flag_values=fv)
  flags.DEFINE_string("output", None, "Output folder for predictions, report and plots.",
                      flag_values=fv)
  flags.DEFINE_enum("protocol", "reference", list(scoring.PROTOCOLS),
                    "reference: the published FABA-Bench scorer's rules; strict: its parsing "
                    "defects fixed (see docs/scoring.md).", flag_values=fv)
  flags.DEFINE_string("aus", "faba", "AU task: the scored AUs, a comma list like 1,2,4 or a "
                      "preset: " + ", ".join(au_parse.AU_PRESETS), flag_values=fv)
  flags.DEFINE_integer("limit", None, "Evaluate only the first N examples of each split.",
                       flag_values=fv)
  flags.DEFINE_bool("record_prompt", False, "Ask each record's own first human turn instead of "
                    "the fixed FABA-Bench question.", flag_values=fv)
  return fv


def plan(fv: flags.FlagValues) -> list[tuple[str, str]]:
  """(split, checkpoint) pairs in evaluation order."""
  if fv.folds:
    if fv.splits or fv.checkpoint:
      raise EvalError("--folds names each split's checkpoint: leave out --splits and "
                      "--checkpoint")
    pairs = []
    for item in fv.folds:
      split, sep, checkpoint = item.partition("=")
      if not sep or not split or not checkpoint:
        raise EvalError(f"--folds: {item!r} is not SPLIT=CHECKPOINT")
      pairs.append((split, checkpoint))
  else:
    if not fv.checkpoint or not fv.splits:
      raise EvalError("pass --checkpoint and --splits (or --folds=SPLIT=CHECKPOINT,...)")
    pairs = [(split, fv.checkpoint) for split in fv.splits]
  names = [split for split, _ in pairs]
  repeated = sorted({s for s in names if names.count(s) > 1})
  if repeated:
    raise EvalError(f"split(s) {repeated} named twice")
  return pairs


def resolve_prior(name: str, config: Any, stored_dim: int, split: str) -> str:
  """The provider for one split: "npy", "dlib", "face_alignment" or "none".

  Raises:
    predict.PriorMismatchError: the split's stored priors or the chosen provider do not fit the
      model's prior token.
  """
  if name == "auto":
    if not config.has_prior:
      return "none"
    if stored_dim == config.prior_dim:
      return "npy"
    stored = f"{stored_dim}-d priors" if stored_dim else "no priors"
    raise predict.PriorMismatchError(
        f"split {split!r} stores {stored}; {predict.prior_hint(config)}")
  if name == "npy":
    if config.has_prior and stored_dim != config.prior_dim:
      stored = f"{stored_dim}-d priors" if stored_dim else "no priors"
      raise predict.PriorMismatchError(
          f"--prior=npy: split {split!r} stores {stored}; {predict.prior_hint(config)}")
  predict.check_provider(config, name)
  return name


class ExamplePreparer:
  """Example index of one split -> `predict.Prepared` (prompt, pixels, prior, label)."""

  def __init__(self, source: Any, split: str, task: str, config: Any,
               prompts: predict.PromptBuilder, provider: Any, *, record_prompt: bool,
               image_mode: str):
    # pylint: disable-next=import-outside-toplevel
    from emola_jax.data import priors

    self._priors = priors
    self.source = source
    self.split = split
    self.task = task
    self.config = config
    self.prompts = prompts
    self.provider = provider
    self.record_prompt = record_prompt
    self.image_mode = image_mode

  def question(self, example: dict[str, Any]) -> str:
    if not self.record_prompt:
      return instructions.EVAL_PROMPTS[self.task]
    turns = example["conversations"]
    if not turns or turns[0].get("from") != "human":
      raise EvalError(f"split {self.split!r}, record {example['id']!r}: --record_prompt needs a "
                      "first human turn")
    return turns[0]["value"]

  def __call__(self, index: int) -> predict.Prepared:
    priors = self._priors
    example = self.source[index]
    record_id = example["id"]
    where = f"split {self.split!r}, record {record_id!r}"
    if example["task"] != self.task:
      raise EvalError(f"{where} is a {example['task']!r} example but --task={self.task}; "
                      "evaluate each task's splits separately")
    if self.task == "emotion":
      try:
        emotion_parse.parse_emotion_label(example["label"])
      except ValueError as e:
        raise EvalError(f"{where}: {e}; emola-eval needs labelled test splits") from None
    info = {"id": record_id, "label": example["label"], "reference": example["gpt4"]}
    try:
      image = images_lib.decode_image(example["image_bytes"], record_id)
    except images_lib.ImageDecodeError as e:
      raise predict.SampleFailure(predict.UNREADABLE, str(e), info) from None
    try:
      prior = self.provider(image, example["prior"], record_id)
    except priors.NoFaceError as e:
      raise predict.SampleFailure(predict.NO_FACE, f"{e}; pass --aligned for face crops",
                                  info) from None
    except priors.MissingPriorError as e:
      raise predict.SampleFailure(predict.NO_PRIOR, str(e), info) from None
    return predict.Prepared(self.prompts(self.question(example)),
                            predict.pixel_values(image, self.config, self.image_mode),
                            prior if self.config.has_prior else None, info)


def check_output(output: str, overwrite: bool) -> None:
  existing = [n for n in OUTPUT_FILES if os.path.exists(os.path.join(output, n))]
  if existing and not overwrite:
    raise EvalError(f"--output={output} already holds {', '.join(existing)}; pass --overwrite "
                    "or choose another folder")
  os.makedirs(output, exist_ok=True)


def evaluate(fv: flags.FlagValues) -> dict[str, Any]:
  """Runs the evaluation with parsed flags; returns the report (also written to --output)."""
  # pylint: disable-next=import-outside-toplevel
  from emola_jax.data import shards

  started = time.perf_counter()
  pairs = plan(fv)
  task, protocol = fv.task, fv.protocol
  if task == "emotion" and fv["aus"].present:
    raise EvalError("--aus applies to --task=au only")
  try:
    aus = au_parse.parse_au_list(fv.aus) if task == "au" else None
  except ValueError as e:
    raise EvalError(f"--aus: {e}") from None
  if fv.limit is not None and fv.limit < 1:
    raise EvalError(f"--limit={fv.limit} must be >= 1")
  if fv.prior == "face_alignment" and not fv.fan_weights:
    raise EvalError("--prior=face_alignment needs --fan_weights=FILE (the 2D FAN weights)")
  sources = {}
  for split, _ in pairs:
    try:
      sources[split] = shards.open_split(fv.data, [split])
    except shards.ShardError as e:
      raise EvalError(str(e)) from None
    if len(sources[split]) == 0:
      raise EvalError(f"split {split!r} of {fv.data} is empty")
  check_output(fv.output, fv.overwrite)
  predictions_path = os.path.join(fv.output, "predictions.jsonl")
  failures_path = os.path.join(fv.output, "failures.jsonl")

  predictor, loaded = None, None
  records: dict[str, list[scoring.Record]] = collections.defaultdict(list)
  failed: collections.Counter = collections.Counter()
  split_settings: dict[str, dict[str, Any]] = {}
  line = 0
  # Written under temporary names and renamed once every split is done, so a run that stops
  # half-way leaves no predictions that look complete (and does not block the next run).
  partial = {path: f"{path}.partial" for path in (predictions_path, failures_path)}
  with open(partial[predictions_path], "w", encoding="utf-8") as predictions, \
       open(partial[failures_path], "w", encoding="utf-8") as failures:
    for split, checkpoint in pairs:
      if loaded is None or loaded.path != checkpoint:
        loaded = None  # drop the previous model before loading the next
        loaded = predict.load_checkpoint(checkpoint, tokenizer=fv.tokenizer, dtype=fv.dtype)
        if predictor is None:
          predictor = predict.Predictor(loaded, batch_size=fv.batch_size,
                                        max_new_tokens=fv.max_new_tokens,
                                        temperature=fv.temperature, top_p=fv.top_p,
                                        seed=fv.seed)
        else:
          predictor.use(loaded)
      source = sources[split]
      prior = resolve_prior(fv.prior, loaded.config, source.prior_dim, split)
      provider = predict.make_prior_provider(prior, loaded.config, aligned=fv.aligned,
                                             upsample=fv.upsample, fan_weights=fv.fan_weights)
      count = len(source) if fv.limit is None else min(fv.limit, len(source))
      split_settings[split] = {"checkpoint": checkpoint, "prior": prior, "n_examples": count}
      print(f"{PROG}: split {split}: {count} example(s), checkpoint {checkpoint}, prior {prior}",
            file=sys.stderr)
      preparer = ExamplePreparer(source, split, task, loaded.config,
                                 predict.PromptBuilder(loaded.tokenizer, loaded.config), provider,
                                 record_prompt=fv.record_prompt, image_mode=fv.image_mode)
      for outcome in predictor.run(range(count), preparer, desc=f"{PROG} {split}",
                                   num_workers=fv.num_workers, progress=fv.progress,
                                   unit="example"):
        info = outcome.info
        if outcome.status != predict.OK:
          failed[outcome.status] += 1
          failures.write(json.dumps({"id": info.get("id"), "split": split,
                                     "status": outcome.status, "reason": outcome.reason}) + "\n")
          continue
        item = {"id": info["id"], "split": split, "prediction": outcome.text,
                "label": info["label"], "reference": info["reference"],
                "n_tokens": outcome.n_tokens, "finished": outcome.finished}
        predictions.write(json.dumps(item, ensure_ascii=False) + "\n")
        line += 1
        # Named like emola-score names the lines of this file, so both give equal results.
        records[split].append(scoring.make_record(item, f"{predictions_path}:{line}"))

  for path, temporary in partial.items():
    os.replace(temporary, path)
  per_split = {}
  for split, _ in pairs:
    if not records[split]:
      raise EvalError(f"split {split!r}: no example could be answered (see {failures_path})")
    try:
      per_split[split] = (scoring.score_emotion(records[split], protocol) if task == "emotion"
                          else scoring.score_au(records[split], protocol, aus))
    except scoring.RecordError as e:
      raise EvalError(str(e)) from None
  stats = predictor.stats.as_dict()
  several = len(per_split) > 1
  question = ("the record's own first human turn" if fv.record_prompt
              else instructions.EVAL_PROMPTS[task])
  checkpoints = sorted({c for _, c in pairs})
  report = {
      "task": task,
      "protocol": protocol,
      "score": report_lib.average_scores(per_split) if several else per_split[pairs[0][0]],
      "per_split": per_split if several else None,
      "splits": [s for s, _ in pairs],
      "checkpoint": checkpoints[0] if len(checkpoints) == 1 else checkpoints,
      "data": fv.data,
      "predictions": predictions_path,
      "settings": {
          "prompt": question, "aus": list(aus) if aus else None, "image_mode": fv.image_mode,
          "batch_size": fv.batch_size, "max_new_tokens": fv.max_new_tokens,
          "temperature": fv.temperature, "top_p": fv.top_p, "seed": fv.seed, "limit": fv.limit,
          "dtype": fv.dtype or str(loaded.config.dtype), "aligned": fv.aligned,
          "per_split": split_settings,
      },
      "counts": {
          "n_examples": sum(s["n_examples"] for s in split_settings.values()),
          "n_scored": sum(len(r) for r in records.values()),
          "n_failed": sum(failed.values()),
          "failed_by_status": dict(failed),
          "failures_file": failures_path,
      },
      "timing": {**stats, "seconds_wall": time.perf_counter() - started},
  }
  # Plots of an earlier run into this folder (--overwrite) must not pass for this run's.
  for stale in glob.glob(os.path.join(glob.escape(fv.output), "*.png")):
    if os.path.basename(stale).startswith(("confusion", "au_f1")):
      os.remove(stale)
  return report_lib.write_report(fv.output, report)


def _fmt(value: float | None) -> str:
  return "n/a" if value is None else f"{value:.2f}"


def summary_line(report: dict[str, Any]) -> str:
  score, counts = report["score"], report["counts"]
  where = (f"mean of {len(report['splits'])} splits" if report.get("per_split")
           else report["splits"][0])
  return (f"{PROG}: {report['task']} [{report['protocol']}] {where}: S_re {_fmt(score['S_re'])} "
          f"S_ge {_fmt(score['S_ge'])} S_rege {_fmt(score['S_rege'])} | {counts['n_scored']} "
          f"scored, {counts['n_failed']} failed | {report['timing']['seconds_wall']:.1f} s | "
          f"report: {os.path.join(os.path.dirname(report['predictions']), 'report.md')}")


def _evaluate_and_print(fv: flags.FlagValues) -> int:
  print(summary_line(evaluate(fv)))
  return 0


COMMAND = runner.Command(
    PROG, __doc__, define_flags, _evaluate_and_print, required=("data", "task", "output"),
    errors=(EvalError, predict.CheckpointLoadError, predict.PriorMismatchError, FileNotFoundError,
            ValueError), quiet_logs=True)
main, cli, run = COMMAND.main, COMMAND.cli, COMMAND.run


if __name__ == "__main__":
  run()
