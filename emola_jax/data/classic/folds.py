"""Subject-exclusive cross-validation folds, deterministic and balanced by frame count.

BP4D, DISFA (and GFT without its official split) are evaluated with subject-exclusive 3-fold
cross-validation: no subject has frames in two folds. Subjects differ a lot in frame count, so a
plain round-robin gives uneven folds; here subjects are placed largest first into the fold that
has the fewest frames so far (greedy longest-processing-time partition). The seed only breaks
ties between subjects of equal size, so the assignment is a pure function of
(frame counts, number of folds, seed).
"""

from __future__ import annotations

from typing import Mapping

import numpy as np


def assign_folds(frame_counts: Mapping[str, int], num_folds: int, seed: int) -> dict[str, int]:
  """Maps every subject to one fold in [0, num_folds).

  Args:
    frame_counts: subject -> number of frames (non-negative).
    num_folds: number of folds (>= 2).
    seed: breaks ties between subjects with the same frame count.

  Raises:
    ValueError: fewer subjects than folds, or a bad count.
  """
  if num_folds < 2:
    raise ValueError(f"num_folds must be >= 2, got {num_folds}")
  if len(frame_counts) < num_folds:
    raise ValueError(f"{len(frame_counts)} subjects cannot fill {num_folds} subject-exclusive "
                     "folds; lower --num_folds")
  for subject, count in frame_counts.items():
    if count < 0:
      raise ValueError(f"subject {subject!r} has a negative frame count {count}")
  subjects = sorted(frame_counts)
  tie_break = np.random.default_rng(seed).permutation(len(subjects))
  # Largest subject first; equal sizes in seeded random order.
  order = sorted(range(len(subjects)), key=lambda i: (-frame_counts[subjects[i]], tie_break[i]))
  totals = [0] * num_folds
  members = [0] * num_folds
  folds: dict[str, int] = {}
  for i in order:
    # Fewest frames, then fewest subjects (so zero-frame subjects still spread), then lowest index.
    k = min(range(num_folds), key=lambda f: (totals[f], members[f], f))
    folds[subjects[i]] = k
    totals[k] += frame_counts[subjects[i]]
    members[k] += 1
  return folds


def split_of(fold_of_subject: int, fold: int | None) -> str:
  """Split name of a subject: "fold<k>" when writing all folds, else "test"/"train" for `fold`."""
  if fold is None:
    return f"fold{fold_of_subject}"
  return "test" if fold_of_subject == fold else "train"
