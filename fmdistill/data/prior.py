"""Batches for data-free methods (``objectives.Objective.batch == 'prior'``): samples of the
prior only, no dataset read.

A batch is ``{'z': (B, ...) float32 standard normal, 'cond': (B,) int32 uniform labels}``
(``cond`` only with classes), a pure function of ``(seed, step)`` and host-local like every
other source (``fmdistill.data``), so resumed and multi-process runs see the same batches. The
loss scales ``z`` by its path's ``sigma(T)``.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from fmdistill import data


@dataclasses.dataclass
class PriorSource:
  """Prior samples shaped like ``shape`` (a teacher's data), labels in ``[0, num_classes)``."""
  shape: tuple
  num_classes: int
  seed: int

  def batch(self, step: int, batch_size: int, process_index: int = 0,
            process_count: int = 1) -> dict:
    rng = np.random.default_rng([self.seed, 2 ** 30 + 7, step])
    out = {"z": rng.standard_normal((batch_size,) + tuple(self.shape), dtype=np.float32)}
    if self.num_classes:
      out["cond"] = rng.integers(0, self.num_classes, batch_size).astype(np.int32)
    return {k: data._block(v, process_index, process_count) for k, v in out.items()}
