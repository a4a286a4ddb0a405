"""2-D toy distributions, drawn with NumPy from an explicit seed (no downloads).

Each sampler maps ``(rng, n) -> (n, 2) float32``. ``gmm`` has known parameters
(``gmm_params``) so tests and metrics can use its closed-form velocity (``fmdistill.oracle``).
"""
from __future__ import annotations

import numpy as np


def checkerboard(rng: np.random.Generator, n: int) -> np.ndarray:
  """Eight unit squares of a 4x4 checkerboard on [-2, 2]^2."""
  x1 = rng.uniform(-2, 2, n)
  x2 = rng.uniform(0, 1, n) + rng.integers(0, 2, n) * 2.0 - 2.0
  x2 = x2 + (np.floor(x1) % 2)
  return np.stack([x1, x2], 1).astype(np.float32)


def moons(rng: np.random.Generator, n: int, noise: float = 0.08) -> np.ndarray:
  """Two interleaved half circles, centred and scaled to roughly unit spread."""
  k = rng.integers(0, 2, n)
  a = rng.uniform(0, np.pi, n)
  x = np.where(k == 0, np.cos(a), 1 - np.cos(a))
  y = np.where(k == 0, np.sin(a), 0.5 - np.sin(a))
  pts = np.stack([x - 0.5, y - 0.25], 1) * 1.5 + noise * rng.standard_normal((n, 2))
  return pts.astype(np.float32)


def eight_gaussians(rng: np.random.Generator, n: int, radius: float = 2.0,
                    std: float = 0.1) -> np.ndarray:
  ang = rng.integers(0, 8, n) * (np.pi / 4)
  c = radius * np.stack([np.cos(ang), np.sin(ang)], 1)
  return (c + std * rng.standard_normal((n, 2))).astype(np.float32)


def spirals(rng: np.random.Generator, n: int, noise: float = 0.05) -> np.ndarray:
  """Two interleaved Archimedean spirals in roughly [-2, 2]^2."""
  r = np.sqrt(rng.uniform(0, 1, n)) * 3 * np.pi
  sign = np.where(rng.integers(0, 2, n) == 0, 1.0, -1.0)
  pts = sign[:, None] * np.stack([r * np.cos(r), r * np.sin(r)], 1) / (1.5 * np.pi)
  return (pts + noise * rng.standard_normal((n, 2))).astype(np.float32)


def gmm_params() -> dict:
  """Weights ``(3,)``, means ``(3, 2)``, isotropic scales ``(3,)`` of the ``gmm`` toy."""
  return dict(weights=np.array([0.5, 0.3, 0.2], np.float32),
              means=np.array([[-1.5, -0.5], [1.5, 0.5], [0.0, 1.8]], np.float32),
              scales=np.array([0.3, 0.4, 0.25], np.float32))


def gmm(rng: np.random.Generator, n: int) -> np.ndarray:
  p = gmm_params()
  k = rng.choice(3, n, p=p["weights"])
  return (p["means"][k] + p["scales"][k, None] * rng.standard_normal((n, 2))).astype(np.float32)


TOYS = {"checkerboard": checkerboard, "moons": moons, "eight_gaussians": eight_gaussians,
        "spirals": spirals, "gmm": gmm}
