"""``scenes``: procedurally rendered 32x32 RGB scenes, class-conditional, from an explicit seed.

Each image is a textured object on a shaded background, sometimes with a smaller grey
distractor object behind it. Factors of variation, all drawn from ``numpy.random`` with the
seed:

* **shape** of the object: disc, square, triangle, ring, cross (``SHAPES``);
* **colour**: a hue from a warm (red-orange-yellow) or a cool (cyan-blue-violet) family
  (``FAMILIES``), with random saturation and brightness;
* **texture**: flat, stripes (random angle and period), checker, dots (``TEXTURES``);
* **position and size**: centre anywhere the object fits, radius 6-11 pixels;
* **background**: a linear gradient between two dark low-saturation colours, at a random angle;
  plus a grey distractor (any shape, radius 3-5) with probability 1/2, and pixel noise.

The class is ``shape * 2 + family`` (10 classes); labels are exactly balanced (``i % 10``
shuffled). Pixels are quantised to 8 bits (as real images are) and mapped to ``[-1, 1]`` by
``u / 127.5 - 1``, the map the TFDS path applies to ``uint8`` images, so the in-memory set and
the TFDS build (``fmdistill.data.tfds_builder``) hold the same arrays.
"""
from __future__ import annotations

import functools

import numpy as np

SIZE = 32
SHAPES = ("disc", "square", "triangle", "ring", "cross")
FAMILIES = ("warm", "cool")
TEXTURES = ("flat", "stripes", "checker", "dots")
NUM_CLASSES = len(SHAPES) * len(FAMILIES)
_HUES = ((-0.06, 0.14), (0.45, 0.75))  # warm, cool (fractions of the colour wheel)


def class_name(label: int) -> str:
  return f"{FAMILIES[label % 2]} {SHAPES[label // 2]}"


def sdf(kind: np.ndarray, dx: np.ndarray, dy: np.ndarray, r: np.ndarray) -> np.ndarray:
  """Signed distance (pixels, negative inside) of shape ``SHAPES[kind]`` of radius ``r``;
  ``kind``, ``r`` of shape ``(n, 1, 1)``, ``dx``, ``dy`` the offsets ``(n, H, W)``."""
  rho = np.sqrt(dx ** 2 + dy ** 2)
  ax, ay = np.abs(dx), np.abs(dy)
  tri = np.max(np.stack([-dy, 0.866 * dx + 0.5 * dy, -0.866 * dx + 0.5 * dy]), 0) - r * 0.5
  cross = np.minimum(np.maximum(ax - r * 0.3, ay - r), np.maximum(ax - r, ay - r * 0.3))
  options = np.stack([rho - r, np.maximum(ax, ay) - r * 0.8, tri,
                      np.abs(rho - r * 0.75) - r * 0.25, cross])
  return np.take_along_axis(options, kind[None].astype(np.int64), 0)[0]


def hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
  """Vectorised HSV (each in [0, 1], ``h`` wraps) to RGB ``(..., 3)`` in [0, 1]."""
  k = (np.stack([5.0, 3.0, 1.0], -1) + (h % 1.0)[..., None] * 6.0) % 6.0
  return v[..., None] - v[..., None] * s[..., None] * np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0)


def texture(kind: np.ndarray, xx: np.ndarray, yy: np.ndarray, angle: np.ndarray,
            period: np.ndarray) -> np.ndarray:
  """A pattern ``(n, H, W)`` in [0, 1] (1 = full colour); ``kind`` etc. of shape ``(n, 1, 1)``."""
  u = xx * np.cos(angle) + yy * np.sin(angle)
  w = -xx * np.sin(angle) + yy * np.cos(angle)
  stripes = (np.sin(2 * np.pi * u / period) > 0).astype(np.float32)
  checker = ((np.floor(u / period * 2) + np.floor(w / period * 2)) % 2).astype(np.float32)
  fu, fw = u / period * 2 % 1.0 - 0.5, w / period * 2 % 1.0 - 0.5
  dots = (fu ** 2 + fw ** 2 < 0.09).astype(np.float32)
  options = np.stack([np.ones_like(u), stripes, checker, dots])
  return np.take_along_axis(options, kind[None].astype(np.int64), 0)[0]


def _factors(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
  """Every random choice of ``n`` scenes, each an array of shape ``(n, 1, 1)``."""
  labels = rng.permutation(np.arange(n) % NUM_CLASSES)
  fam = labels % 2
  lo, hi = np.asarray(_HUES)[fam].T
  r = rng.uniform(6.0, 11.0, n)
  f = dict(label=labels, shape=labels // 2, hue=rng.uniform(lo, hi), sat=rng.uniform(0.55, 1.0, n),
           val=rng.uniform(0.7, 1.0, n), tex=rng.integers(0, len(TEXTURES), n),
           tex_angle=rng.uniform(0, np.pi, n), tex_period=rng.uniform(3.0, 6.0, n), r=r,
           cx=rng.uniform(r + 1, SIZE - r - 1), cy=rng.uniform(r + 1, SIZE - r - 1),
           bg_angle=rng.uniform(0, 2 * np.pi, n), bg_h0=rng.uniform(0, 1, n),
           bg_h1=rng.uniform(0, 1, n), bg_v0=rng.uniform(0.05, 0.3, n),
           bg_v1=rng.uniform(0.05, 0.3, n), d_on=rng.uniform(0, 1, n) < 0.5,
           d_shape=rng.integers(0, len(SHAPES), n), d_r=rng.uniform(3.0, 5.0, n),
           d_cx=rng.uniform(5, SIZE - 5, n), d_cy=rng.uniform(5, SIZE - 5, n),
           d_grey=rng.uniform(0.35, 0.65, n))
  as32 = lambda v: v.astype(np.float32) if v.dtype == np.float64 else v
  return {k: as32(v).reshape(n, 1, 1) for k, v in f.items()}


def render(f: dict[str, np.ndarray], noise: np.ndarray) -> np.ndarray:
  """Scenes ``(n, 32, 32, 3)`` uint8 from the factors of ``_factors`` and pixel noise
  ``(n, 32, 32, 3)``."""
  yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)[:, None] + 0.5  # each (1, H, W)
  g = ((xx - SIZE / 2) * np.cos(f["bg_angle"]) + (yy - SIZE / 2) * np.sin(f["bg_angle"])) / SIZE
  g = np.clip(g + 0.5, 0, 1)[..., None]
  c0 = hsv_to_rgb(f["bg_h0"], np.full_like(f["bg_h0"], 0.3), f["bg_v0"])  # (n, 1, 1, 3)
  c1 = hsv_to_rgb(f["bg_h1"], np.full_like(f["bg_h1"], 0.3), f["bg_v1"])
  img = c0 * (1 - g) + c1 * g
  dmask = np.clip(0.5 - sdf(f["d_shape"], xx - f["d_cx"], yy - f["d_cy"], f["d_r"]), 0, 1)
  dmask = (dmask * f["d_on"])[..., None]
  img = img * (1 - dmask) + f["d_grey"][..., None] * dmask
  mask = np.clip(0.5 - sdf(f["shape"], xx - f["cx"], yy - f["cy"], f["r"]), 0, 1)[..., None]
  pattern = texture(f["tex"], xx - f["cx"], yy - f["cy"], f["tex_angle"], f["tex_period"])
  colour = hsv_to_rgb(f["hue"], f["sat"], f["val"])
  obj = colour * (0.55 + 0.45 * pattern[..., None])
  img = img * (1 - mask) + obj * mask + noise
  return np.clip(np.round(img * 255.0), 0, 255).astype(np.uint8)


def scenes_uint8(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """``(images (n, 32, 32, 3) uint8, labels (n,) int32)``, a pure function of ``(n, seed)``."""
  rng = np.random.default_rng([seed, 32])
  f = _factors(rng, n)
  noise = rng.normal(0.0, 0.02, (n, SIZE, SIZE, 3)).astype(np.float32)
  chunks = [render({k: v[i:i + 512] for k, v in f.items()}, noise[i:i + 512])
            for i in range(0, n, 512)]
  return np.concatenate(chunks), f["label"].reshape(n).astype(np.int32)


@functools.lru_cache(maxsize=4)
def scenes(n: int = 8192, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """``(images (n, 32, 32, 3) float32 in [-1, 1], labels (n,) int32)``; cached per process
  (the arrays are read-only)."""
  u, y = scenes_uint8(n, seed)
  x = (u / 127.5 - 1.0).astype(np.float32)
  x.flags.writeable, y.flags.writeable = False, False
  return x, y
