"""emola-score: FABA-Bench scores of a JSONL file of generated answers, printed as one JSON object.

Each line of --predictions is {"prediction": ..., "label": ..., "reference": ...} (extra keys are
ignored). Example:

  emola-score --task=emotion --predictions=preds.jsonl --protocol=reference
  emola-score --task=au --predictions=preds.jsonl --protocol=strict --aus=disfa
"""

from __future__ import annotations

import json
import sys

from absl import app
from absl import flags

from emola_jax.evaluation import au_parse
from emola_jax.evaluation import scoring

_TASK = flags.DEFINE_enum("task", None, ["emotion", "au"], "Which FABA-Bench task to score.")
_PREDICTIONS = flags.DEFINE_string(
    "predictions", None, "JSONL file, one {prediction, label, reference} object a line.")
_PROTOCOL = flags.DEFINE_enum(
    "protocol", "reference", list(scoring.PROTOCOLS),
    "reference: the published FABA-Bench scorer's rules (comparable with the paper); "
    "strict: the same metrics with its parsing defects fixed (see docs/scoring.md).")
_AUS = flags.DEFINE_string(
    "aus", "faba",
    "AU task only: the evaluated AUs, a comma list like 1,2,4 or a preset: "
    + ", ".join(f"{name} ({','.join(map(str, aus))})" for name, aus in au_parse.AU_PRESETS.items()))

flags.mark_flags_as_required(["task", "predictions"])


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}; pass everything as --flags")
  if _TASK.value == "emotion" and flags.FLAGS["aus"].present:
    raise app.UsageError("--aus applies to --task=au only")
  try:
    aus = au_parse.parse_au_list(_AUS.value)
  except ValueError as error:
    raise app.UsageError(f"--aus: {error}") from None
  try:
    records = scoring.load_records(_PREDICTIONS.value)
    if _TASK.value == "emotion":
      result = scoring.score_emotion(records, _PROTOCOL.value)
    else:
      result = scoring.score_au(records, _PROTOCOL.value, aus)
  except OSError as error:
    sys.exit(f"emola-score: cannot read --predictions: {error}")
  except scoring.RecordError as error:
    sys.exit(f"emola-score: {error}")
  result["predictions"] = _PREDICTIONS.value
  print(json.dumps(result, indent=2))


def run() -> None:
  app.run(main)


if __name__ == "__main__":
  run()
