"""Data sources. A batch is ``{'x': (B, ...) float32, 'cond': (B,) int32}`` (``cond`` only for
labelled data), a pure function of ``(seed, step)`` so a resumed run sees exactly the batches an
uninterrupted run would, and host-local: process ``i`` of ``n`` gets the ``i``-th contiguous
block of rows of the global batch (assembled with ``jax.make_array_from_process_local_data``),
so a multi-process run sees the same global batch as a single process.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, ClassVar

import ml_collections
import numpy as np

from fmdistill.data import images, scenes, toy
from fmdistill.errors import ConfigError

DATASETS = ("toy", "digits", "shapes", "scenes", "tfds")


@dataclasses.dataclass
class ToySource:
  """Infinite stream from a 2-D toy sampler."""
  sampler: Callable[[np.random.Generator, int], np.ndarray]
  seed: int
  shape: tuple = (2,)
  num_classes: int = 0
  distinct_references: ClassVar[int] = 2 ** 31  # every reference seed is a new draw

  def batch(self, step: int, batch_size: int, process_index: int = 0,
            process_count: int = 1) -> dict:
    x = self.sampler(np.random.default_rng([self.seed, step]), batch_size)
    return {"x": _block(x, process_index, process_count)}

  def reference(self, n: int, seed: int) -> np.ndarray:
    """Fresh samples (independent of training batches) for metrics."""
    return self.sampler(np.random.default_rng([self.seed, 2 ** 31 - 1, seed]), n)


@dataclasses.dataclass
class ArraySource:
  """A finite indexable dataset (arrays or a ``tfds.data_source``) read in epoch permutations."""
  get: Callable[[np.ndarray], dict]
  size: int
  seed: int
  shape: tuple
  num_classes: int
  distinct_references: ClassVar[int] = 2  # its two disjoint halves (``reference``)

  def indices(self, step: int, batch_size: int) -> np.ndarray:
    start = step * batch_size
    out = []
    while len(out) < batch_size:
      epoch, offset = divmod(start, self.size)
      perm = np.random.default_rng([self.seed, epoch]).permutation(self.size)
      take = perm[offset: offset + batch_size - len(out)]
      out.extend(take.tolist())
      start += len(take)
    return np.asarray(out)

  def batch(self, step: int, batch_size: int, process_index: int = 0,
            process_count: int = 1) -> dict:
    return self.get(_block(self.indices(step, batch_size), process_index, process_count))

  def reference(self, n: int, seed: int) -> np.ndarray:
    """Up to ``min(n, size // 2)`` examples: odd seeds read one fixed half of the data, even
    seeds the other, so the data-vs-data noise floor (seeds 1 vs 2) uses disjoint samples."""
    n = min(n, self.size // 2)
    half = self.size // 2
    perm = np.random.default_rng([self.seed, 2 ** 31 - 1]).permutation(self.size)
    start = (seed % 2) * half
    return self.get(perm[start:start + n])["x"]


def _block(rows: np.ndarray, i: int, n: int) -> np.ndarray:
  """The ``i``-th of ``n`` contiguous blocks of ``rows``."""
  per = len(rows) // n
  return rows[i * per:(i + 1) * per]


def _array_getter(x: np.ndarray, y: np.ndarray | None):
  def get(idx):
    out = {"x": x[idx]}
    if y is not None:
      out["cond"] = y[idx]
    return out
  return get


def _tfds_source(cfg: ml_collections.ConfigDict, seed: int) -> ArraySource:
  from fmdistill.data import tfds_source
  src = tfds_source.rows(cfg)
  first = src[0]
  if cfg.image_key not in first:
    raise ConfigError(f"config.data.image_key={cfg.image_key!r} is not a feature of "
                      f"{cfg.tfds_name!r}; accepted: {sorted(first)}")
  x0 = np.asarray(first[cfg.image_key])
  if x0.ndim != 3:
    raise ConfigError(f"config.data.image_key={cfg.image_key!r} has shape {x0.shape}; "
                      "accepted: images (H, W, C)")
  labelled = bool(cfg.label_key) and cfg.label_key in first and cfg.conditional
  if labelled and cfg.num_classes < 1:
    raise ConfigError("config.data.num_classes must be set (> 0) for a conditional TFDS dataset")
  get = lambda idx: tfds_source.to_arrays(src, idx, cfg, labelled)
  return ArraySource(get, len(src), seed, tuple(x0.shape), cfg.num_classes if labelled else 0)


def _bundled(name: str, n: int) -> tuple[np.ndarray, np.ndarray]:
  """The arrays of a dataset generated or shipped with the library (always seed 0: the data
  set is fixed, the run's seed only orders the batches)."""
  if name == "digits":
    return images.digits()
  return images.shapes(n, seed=0) if name == "shapes" else scenes.scenes(n, seed=0)


def make_source(cfg: ml_collections.ConfigDict, seed: int) -> Any:
  """The data source named by ``cfg.name`` (one of ``DATASETS``)."""
  if cfg.name == "toy":
    if cfg.toy not in toy.TOYS:
      raise ConfigError(f"config.data.toy must be one of {sorted(toy.TOYS)}, got {cfg.toy!r}")
    return ToySource(toy.TOYS[cfg.toy], seed)
  if cfg.name in ("digits", "shapes", "scenes"):
    x, y = _bundled(cfg.name, cfg.num_examples)
    y = y if cfg.conditional else None
    return ArraySource(_array_getter(x, y), len(x), seed, tuple(x.shape[1:]),
                       int(y.max()) + 1 if y is not None else 0)
  if cfg.name == "tfds":
    return _tfds_source(cfg, seed)
  raise ConfigError(f"config.data.name must be one of {list(DATASETS)}, got {cfg.name!r}")
