"""Sample-based distances between distributions, for quality reports.

All functions take two sample arrays ``(n, ...)`` (flattened to ``(n, d)``) and return a float.
Every figure should be read beside its noise floor: the same distance between two independent
data samples of the same size (``noise_floor``).
"""
from __future__ import annotations

from typing import Callable

import numpy as np
from scipy import linalg


def _flat(x) -> np.ndarray:
  x = np.asarray(x, np.float64)
  return x.reshape(x.shape[0], -1)


def sliced_w2(a, b, num_projections: int = 256, seed: int = 0) -> float:
  """Sliced Wasserstein-2: ``sqrt(mean over random unit directions of W2^2 of projections)``.

  Uses equal sample sizes (the larger sample is subsampled) so 1-D W2 is a sorted matching.
  """
  a, b = _flat(a), _flat(b)
  n = min(len(a), len(b))
  rng = np.random.default_rng(seed)
  a, b = a[rng.permutation(len(a))[:n]], b[rng.permutation(len(b))[:n]]
  dirs = rng.standard_normal((a.shape[1], num_projections))
  dirs /= np.linalg.norm(dirs, axis=0, keepdims=True)
  pa, pb = np.sort(a @ dirs, axis=0), np.sort(b @ dirs, axis=0)
  return float(np.sqrt(np.mean((pa - pb) ** 2)))


def _pdist(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  d2 = (a ** 2).sum(1)[:, None] + (b ** 2).sum(1)[None] - 2 * a @ b.T
  return np.sqrt(np.maximum(d2, 0.0))


def energy_self(b) -> float:
  """``E|Y - Y'|`` of ``b``: the term of ``energy_distance`` that depends on ``b`` alone."""
  b = _flat(b)
  return float(_pdist(b, b).mean())


def energy_distance(a, b, self_b: float | None = None, self_a: float | None = None) -> float:
  """``2 E|X - Y| - E|X - X'| - E|Y - Y'|`` (V-statistic), >= 0. ``self_b``/``self_a``:
  ``energy_self(b)``/``energy_self(a)`` when already computed (a reference every model is
  scored against; a sample set scored against several references)."""
  a, b = _flat(a), _flat(b)
  self_b = float(_pdist(b, b).mean()) if self_b is None else self_b
  self_a = float(_pdist(a, a).mean()) if self_a is None else self_a
  return float(2 * _pdist(a, b).mean() - self_a - self_b)


_BANDWIDTHS = (0.1, 0.3, 1.0, 3.0)


def _kernel_mean(x: np.ndarray, y: np.ndarray, bandwidths) -> float:
  d2 = _pdist(x, y) ** 2
  return float(sum(np.exp(-d2 / (2 * h * h)) for h in bandwidths).mean())


def mmd_self(b, bandwidths=_BANDWIDTHS) -> float:
  """``E k(Y, Y')`` of ``b``: the term of ``mmd_rbf`` that depends on ``b`` alone."""
  b = _flat(b)
  return _kernel_mean(b, b, bandwidths)


def mmd_rbf(a, b, bandwidths=_BANDWIDTHS, self_b: float | None = None,
            self_a: float | None = None) -> float:
  """Biased MMD^2 with a sum of Gaussian kernels ``exp(-|x - y|^2 / (2 h^2))``.
  ``self_b``/``self_a``: ``mmd_self(b, bandwidths)``/``mmd_self(a, bandwidths)`` when already
  computed."""
  a, b = _flat(a), _flat(b)
  self_b = _kernel_mean(b, b, bandwidths) if self_b is None else self_b
  self_a = _kernel_mean(a, a, bandwidths) if self_a is None else self_a
  return float(self_a + self_b - 2 * _kernel_mean(a, b, bandwidths))


def gaussian_stats(f) -> tuple[np.ndarray, np.ndarray]:
  """``(mean (k,), covariance (k, k))`` of features ``(n, k)``, float64 (unbiased, as FID)."""
  f = _flat(f)
  return f.mean(0), np.atleast_2d(np.cov(f, rowvar=False))


def frechet_from_stats(mu_a, cov_a, mu_b, cov_b, eps: float = 1e-6) -> float:
  """``|mu_a - mu_b|^2 + tr(C_a + C_b - 2 (C_a C_b)^(1/2))``, the Fréchet distance of two
  Gaussians. When the product is singular enough that its square root is not finite, ``eps I``
  is added to both covariances (as the reference FID code does)."""
  mu_a, mu_b = np.asarray(mu_a, np.float64), np.asarray(mu_b, np.float64)
  ca, cb = np.asarray(cov_a, np.float64), np.asarray(cov_b, np.float64)
  covmean = linalg.sqrtm(ca @ cb)
  if not np.all(np.isfinite(covmean)):
    off = eps * np.eye(len(ca))
    covmean = linalg.sqrtm((ca + off) @ (cb + off))
  covmean = np.real(covmean)
  return float(((mu_a - mu_b) ** 2).sum() + np.trace(ca + cb - 2 * covmean))


def frechet_distance(fa, fb) -> float:
  """Fréchet distance between Gaussians fitted to feature arrays ``(n, k)`` (as in FID)."""
  return frechet_from_stats(*gaussian_stats(fa), *gaussian_stats(fb))


def class_coverage(labels, num_classes: int) -> dict[str, float]:
  """How evenly predicted ``labels`` ``(n,)`` cover ``num_classes`` classes, against uniform:
  ``coverage_max_dev = max_c |frac_c - 1/C|`` (0 when uniform; ``1 - 1/C`` when one class
  takes everything) and ``coverage_low``, the number of classes with ``frac_c < 0.5 / C``."""
  frac = np.bincount(np.asarray(labels).reshape(-1), minlength=num_classes)[:num_classes]
  frac = frac / max(len(np.asarray(labels).reshape(-1)), 1)
  return {"coverage_max_dev": float(np.abs(frac - 1.0 / num_classes).max()),
          "coverage_low": float((frac < 0.5 / num_classes).sum())}


METRICS: dict[str, Callable] = {"sliced_w2": sliced_w2, "energy": energy_distance,
                                "mmd": mmd_rbf}


def noise_floor(metric: Callable, sample_data: Callable[[int, int], np.ndarray], n: int) -> float:
  """``metric`` between two independent data samples of size ``n`` (seeds 1 and 2)."""
  return metric(sample_data(n, 1), sample_data(n, 2))
