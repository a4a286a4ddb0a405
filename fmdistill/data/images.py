"""Small image datasets that need no download, as arrays in ``[-1, 1]``, ``(N, H, W, C)``.

* ``digits``: scikit-learn's bundled 8x8 handwritten digits (1797 images, 10 classes).
* ``shapes``: procedurally drawn 16x16 shapes (disc, square, triangle, ring; 4 classes) with
  random position, size and intensity, from an explicit seed.
"""
from __future__ import annotations

import numpy as np


def digits() -> tuple[np.ndarray, np.ndarray]:
  """``(images (1797, 8, 8, 1) float32 in [-1, 1], labels (1797,) int32)``."""
  from sklearn.datasets import load_digits  # bundled with scikit-learn, no download
  d = load_digits()
  x = d.images.astype(np.float32) / 16.0 * 2.0 - 1.0
  return x[..., None], d.target.astype(np.int32)


SHAPES = ("disc", "square", "triangle", "ring")


def draw_shape(kind: int, cx: float, cy: float, r: float, size: int = 16) -> np.ndarray:
  """A soft-edged mask ``(size, size)`` in [0, 1] of shape ``SHAPES[kind]``."""
  yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
  dx, dy = xx - cx, yy - cy
  if kind == 0:
    d = np.sqrt(dx ** 2 + dy ** 2) - r
  elif kind == 1:
    d = np.maximum(np.abs(dx), np.abs(dy)) - r * 0.85
  elif kind == 2:  # upward triangle as the max of three half-planes
    n = np.array([[0.0, 1.0], [0.866, -0.5], [-0.866, -0.5]], np.float32)
    d = np.max(np.stack([-(dx * a + dy * b) for a, b in n]), 0) - r * 0.5
  else:
    d = np.abs(np.sqrt(dx ** 2 + dy ** 2) - r * 0.8) - r * 0.25
  return np.clip(0.5 - d, 0.0, 1.0)


def shapes(n: int = 4096, seed: int = 0, size: int = 16) -> tuple[np.ndarray, np.ndarray]:
  """``(images (n, size, size, 1) float32 in [-1, 1], labels (n,) int32)``."""
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, len(SHAPES), n).astype(np.int32)
  r = rng.uniform(size * 0.18, size * 0.32, n)
  cx = rng.uniform(r + 1, size - r - 1)
  cy = rng.uniform(r + 1, size - r - 1)
  level = rng.uniform(0.6, 1.0, n)
  imgs = np.stack([draw_shape(k, a, b, c, size) * l
                   for k, a, b, c, l in zip(labels, cx, cy, r, level)])
  return (imgs * 2.0 - 1.0).astype(np.float32)[..., None], labels
