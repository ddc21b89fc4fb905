"""Where training metrics go: `metrics.jsonl`, TensorBoard event files and a progress bar.

Only process 0 writes (`enabled=False` elsewhere). Appending to `metrics.jsonl` keeps the lines
of an interrupted run; a resumed run continues after them.
"""

from __future__ import annotations

import json
import os
from typing import Any

import tqdm


class MetricsLog:

  def __init__(self, workdir: str, *, enabled: bool, tensorboard: bool, progress: bool,
               total: int, initial: int):
    self.enabled = enabled
    self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a") if enabled else None
    self._tb = None
    if enabled and tensorboard:
      from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
    self._bar = (tqdm.tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)
                 if enabled and progress else None)

  def advance(self) -> None:
    if self._bar is not None:
      self._bar.update(1)

  def write(self, metrics: dict[str, Any]) -> None:
    if not self.enabled:
      return
    self._jsonl.write(json.dumps(metrics) + "\n")
    self._jsonl.flush()
    step = int(metrics["step"])
    if self._tb is not None:
      for key, value in metrics.items():
        if key != "step" and isinstance(value, (int, float)):
          self._tb.add_scalar(key, value, step)
      self._tb.flush()
    if self._bar is not None and "loss" in metrics:
      self._bar.set_postfix(loss=f"{metrics['loss']:.4f}",
                            tok_s=f"{metrics.get('tokens_per_second', 0):.0f}")

  def message(self, text: str) -> None:
    if not self.enabled:
      return
    if self._bar is not None:
      self._bar.write(text)
    else:
      print(text, flush=True)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
    if self._tb is not None:
      self._tb.close()
    if self._jsonl is not None:
      self._jsonl.close()
