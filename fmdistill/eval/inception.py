"""InceptionV3 as the FID network uses it: 2048-d pool3 features in Flax NNX.

The architecture is the one of the TF "2015-12-05" Inception graph that FID is defined on, in
the form pytorch-fid's ``FIDInceptionV3`` gives it (Szegedy et al., "Rethinking the Inception
Architecture", 2016): a stem of five conv-BN-ReLU units and two 3x3/2 max pools, three
``Mixed_5`` (A) blocks, ``Mixed_6a`` (B, grid reduction), four ``Mixed_6`` (C, factorised 7x7)
blocks, ``Mixed_7a`` (D, grid reduction), two ``Mixed_7`` (E, expanded filter bank) blocks and a
global mean pool. FID differs from torchvision's classifier in three places, kept here: the
average pools inside the A, C and first E block do not count padding, the second E block's pool
branch is a max pool, and batch norm uses ``eps = 1e-3``. The classifier head is not built.

Weights are never downloaded: ``load_params(path)`` reads a local file (``fmdistill.eval.fid``
documents the layout and the conversion of pytorch-fid's ``pt_inception-2015-12-05`` weights).
``preprocess`` takes images in ``[-1, 1]`` of any size, grey or RGB, and gives the network's
input: RGB, 299x299 by bilinear resizing (half-pixel centres, no antialiasing, as PyTorch's
``F.interpolate(..., mode='bilinear', align_corners=False)``), values in ``[-1, 1]``.
"""
from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen, nnx

Array = jax.Array
SIZE = 299
FEATURES = 2048


def _pad(padding: int | tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int]]:
  ph, pw = (padding, padding) if isinstance(padding, int) else padding
  return ((ph, ph), (pw, pw))


class ConvBN(nnx.Module):
  """Conv (no bias) -> batch norm (inference statistics, eps 1e-3) -> ReLU."""

  def __init__(self, cin: int, cout: int, kernel: int | tuple[int, int], *, stride: int = 1,
               padding: int | tuple[int, int] = 0, rngs: nnx.Rngs):
    k = (kernel, kernel) if isinstance(kernel, int) else kernel
    self.conv = nnx.Conv(cin, cout, k, strides=stride, padding=_pad(padding), use_bias=False,
                         rngs=rngs)
    self.bn = nnx.BatchNorm(cout, epsilon=1e-3, use_running_average=True, rngs=rngs)

  def __call__(self, x: Array) -> Array:
    return jax.nn.relu(self.bn(self.conv(x)))


def _avg3(x: Array) -> Array:
  """3x3 / 1 average pool, padding 1, padding not counted."""
  return linen.avg_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1)), count_include_pad=False)


def _max3(x: Array, stride: int = 2, pad: int = 0) -> Array:
  return linen.max_pool(x, (3, 3), (stride, stride), ((pad, pad), (pad, pad)))


class BlockA(nnx.Module):
  """1x1 | 1x1 -> 5x5 | 1x1 -> 3x3 -> 3x3 | avg pool -> 1x1 (``pool`` channels)."""

  def __init__(self, cin: int, pool: int, *, rngs: nnx.Rngs):
    self.branch1x1 = ConvBN(cin, 64, 1, rngs=rngs)
    self.branch5x5_1 = ConvBN(cin, 48, 1, rngs=rngs)
    self.branch5x5_2 = ConvBN(48, 64, 5, padding=2, rngs=rngs)
    self.branch3x3dbl_1 = ConvBN(cin, 64, 1, rngs=rngs)
    self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1, rngs=rngs)
    self.branch3x3dbl_3 = ConvBN(96, 96, 3, padding=1, rngs=rngs)
    self.branch_pool = ConvBN(cin, pool, 1, rngs=rngs)

  def __call__(self, x: Array) -> Array:
    return jnp.concatenate([
        self.branch1x1(x), self.branch5x5_2(self.branch5x5_1(x)),
        self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
        self.branch_pool(_avg3(x))], axis=-1)


class BlockB(nnx.Module):
  """Grid reduction 35 -> 17: 3x3/2 | 1x1 -> 3x3 -> 3x3/2 | max pool."""

  def __init__(self, cin: int, *, rngs: nnx.Rngs):
    self.branch3x3 = ConvBN(cin, 384, 3, stride=2, rngs=rngs)
    self.branch3x3dbl_1 = ConvBN(cin, 64, 1, rngs=rngs)
    self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1, rngs=rngs)
    self.branch3x3dbl_3 = ConvBN(96, 96, 3, stride=2, rngs=rngs)

  def __call__(self, x: Array) -> Array:
    return jnp.concatenate([
        self.branch3x3(x),
        self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))), _max3(x)], axis=-1)


class BlockC(nnx.Module):
  """Factorised 7x7: 1x1 | 1x1 -> 1x7 -> 7x1 | 1x1 -> (7x1 -> 1x7) x 2 | avg pool -> 1x1."""

  def __init__(self, cin: int, c7: int, *, rngs: nnx.Rngs):
    r, c = (7, 1), (1, 7)
    self.branch1x1 = ConvBN(cin, 192, 1, rngs=rngs)
    self.branch7x7_1 = ConvBN(cin, c7, 1, rngs=rngs)
    self.branch7x7_2 = ConvBN(c7, c7, c, padding=(0, 3), rngs=rngs)
    self.branch7x7_3 = ConvBN(c7, 192, r, padding=(3, 0), rngs=rngs)
    self.branch7x7dbl_1 = ConvBN(cin, c7, 1, rngs=rngs)
    self.branch7x7dbl_2 = ConvBN(c7, c7, r, padding=(3, 0), rngs=rngs)
    self.branch7x7dbl_3 = ConvBN(c7, c7, c, padding=(0, 3), rngs=rngs)
    self.branch7x7dbl_4 = ConvBN(c7, c7, r, padding=(3, 0), rngs=rngs)
    self.branch7x7dbl_5 = ConvBN(c7, 192, c, padding=(0, 3), rngs=rngs)
    self.branch_pool = ConvBN(cin, 192, 1, rngs=rngs)

  def __call__(self, x: Array) -> Array:
    b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
    d = x
    for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3,
                  self.branch7x7dbl_4, self.branch7x7dbl_5):
      d = layer(d)
    return jnp.concatenate([self.branch1x1(x), b7, d, self.branch_pool(_avg3(x))], axis=-1)


class BlockD(nnx.Module):
  """Grid reduction 17 -> 8: 1x1 -> 3x3/2 | 1x1 -> 1x7 -> 7x1 -> 3x3/2 | max pool."""

  def __init__(self, cin: int, *, rngs: nnx.Rngs):
    self.branch3x3_1 = ConvBN(cin, 192, 1, rngs=rngs)
    self.branch3x3_2 = ConvBN(192, 320, 3, stride=2, rngs=rngs)
    self.branch7x7x3_1 = ConvBN(cin, 192, 1, rngs=rngs)
    self.branch7x7x3_2 = ConvBN(192, 192, (1, 7), padding=(0, 3), rngs=rngs)
    self.branch7x7x3_3 = ConvBN(192, 192, (7, 1), padding=(3, 0), rngs=rngs)
    self.branch7x7x3_4 = ConvBN(192, 192, 3, stride=2, rngs=rngs)

  def __call__(self, x: Array) -> Array:
    b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
    return jnp.concatenate([self.branch3x3_2(self.branch3x3_1(x)), b7, _max3(x)], axis=-1)


class BlockE(nnx.Module):
  """Expanded filter bank: 1x1 | 1x1 -> (1x3, 3x1) | 1x1 -> 3x3 -> (1x3, 3x1) | pool -> 1x1;
  the pool is a padding-excluding average (``Mixed_7b``) or a max pool (``Mixed_7c``)."""

  def __init__(self, cin: int, max_pool: bool, *, rngs: nnx.Rngs):
    self.max_pool = max_pool
    self.branch1x1 = ConvBN(cin, 320, 1, rngs=rngs)
    self.branch3x3_1 = ConvBN(cin, 384, 1, rngs=rngs)
    self.branch3x3_2a = ConvBN(384, 384, (1, 3), padding=(0, 1), rngs=rngs)
    self.branch3x3_2b = ConvBN(384, 384, (3, 1), padding=(1, 0), rngs=rngs)
    self.branch3x3dbl_1 = ConvBN(cin, 448, 1, rngs=rngs)
    self.branch3x3dbl_2 = ConvBN(448, 384, 3, padding=1, rngs=rngs)
    self.branch3x3dbl_3a = ConvBN(384, 384, (1, 3), padding=(0, 1), rngs=rngs)
    self.branch3x3dbl_3b = ConvBN(384, 384, (3, 1), padding=(1, 0), rngs=rngs)
    self.branch_pool = ConvBN(cin, 192, 1, rngs=rngs)

  def __call__(self, x: Array) -> Array:
    a = self.branch3x3_1(x)
    d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
    pooled = _max3(x, 1, 1) if self.max_pool else _avg3(x)
    return jnp.concatenate([
        self.branch1x1(x), self.branch3x3_2a(a), self.branch3x3_2b(a),
        self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d), self.branch_pool(pooled)], axis=-1)


class InceptionV3(nnx.Module):
  """``(B, 299, 299, 3)`` in ``[-1, 1]`` -> pool3 features ``(B, 2048)``."""

  def __init__(self, *, rngs: nnx.Rngs):
    self.Conv2d_1a_3x3 = ConvBN(3, 32, 3, stride=2, rngs=rngs)
    self.Conv2d_2a_3x3 = ConvBN(32, 32, 3, rngs=rngs)
    self.Conv2d_2b_3x3 = ConvBN(32, 64, 3, padding=1, rngs=rngs)
    self.Conv2d_3b_1x1 = ConvBN(64, 80, 1, rngs=rngs)
    self.Conv2d_4a_3x3 = ConvBN(80, 192, 3, rngs=rngs)
    self.Mixed_5b = BlockA(192, 32, rngs=rngs)
    self.Mixed_5c = BlockA(256, 64, rngs=rngs)
    self.Mixed_5d = BlockA(288, 64, rngs=rngs)
    self.Mixed_6a = BlockB(288, rngs=rngs)
    self.Mixed_6b = BlockC(768, 128, rngs=rngs)
    self.Mixed_6c = BlockC(768, 160, rngs=rngs)
    self.Mixed_6d = BlockC(768, 160, rngs=rngs)
    self.Mixed_6e = BlockC(768, 192, rngs=rngs)
    self.Mixed_7a = BlockD(768, rngs=rngs)
    self.Mixed_7b = BlockE(1280, False, rngs=rngs)
    self.Mixed_7c = BlockE(2048, True, rngs=rngs)

  def __call__(self, x: Array) -> Array:
    x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
    x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(_max3(x)))
    x = _max3(x)
    for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b,
                  self.Mixed_6c, self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b,
                  self.Mixed_7c):
      x = block(x)
    return x.mean(axis=(1, 2))


def init(seed: int = 0) -> tuple[Any, dict]:
  """``(graphdef, params)`` with random weights: He-normal kernels (``std = sqrt(2 / fan_in)``),
  identity batch norm (scale 1, bias 0, mean 0, var 1), so activations keep a unit scale.
  Drawn with numpy (NNX's own initialisers take ~25 s on a 2-core CPU for 22 M weights)."""
  graphdef, shaped = abstract()
  rng = np.random.default_rng(seed)

  def leaf(path, v):
    name = str(path[-1].key)
    if name == "kernel":
      std = np.float32(np.sqrt(2.0 / np.prod(v.shape[:-1])))
      return jnp.asarray(rng.standard_normal(v.shape, np.float32) * std)
    return jnp.full(v.shape, 1.0 if name in ("scale", "var") else 0.0, jnp.float32)
  return graphdef, jax.tree_util.tree_map_with_path(leaf, shaped)


@functools.lru_cache(maxsize=1)
def abstract() -> tuple[Any, dict]:
  """``(graphdef, params)`` with ``jax.ShapeDtypeStruct`` leaves: the structure weights are
  loaded into, without initialising 22 M random numbers (cached: tracing the module takes
  seconds; do not modify the returned dict)."""
  graphdef, state = nnx.split(nnx.eval_shape(lambda: InceptionV3(rngs=nnx.Rngs(0))))
  return graphdef, nnx.to_pure_dict(state)


def preprocess(x: Array, size: int = SIZE) -> Array:
  """Images ``(B, H, W, C)`` in ``[-1, 1]``, ``C`` 1 or 3 -> ``(B, size, size, 3)`` float32:
  clipped to ``[-1, 1]``, grey repeated to RGB, resized bilinearly (no antialiasing)."""
  x = jnp.clip(jnp.asarray(x, jnp.float32), -1.0, 1.0)
  if x.shape[-1] == 1:
    x = jnp.repeat(x, 3, axis=-1)
  if x.shape[1:3] != (size, size):
    x = jax.image.resize(x, (x.shape[0], size, size, 3), "bilinear", antialias=False)
  return jnp.clip(x, -1.0, 1.0)  # interpolation weights sum to 1 only up to rounding


def features_fn(graphdef: Any):
  """A jitted ``(params, images in [-1, 1] (B, H, W, C)) -> (B, 2048)``."""
  @jax.jit
  def run(params, x):
    return nnx.merge(graphdef, params)(preprocess(x))
  return run


def shapes(params: dict) -> dict[str, tuple[int, ...]]:
  """``{'/'-joined path: shape}`` of every leaf."""
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  return {"/".join(str(k.key) for k in path): tuple(v.shape) for path, v in leaves}


def layer_names(params: dict) -> Sequence[str]:
  """The ``ConvBN`` units as ``'Mixed_5b.branch1x1'`` paths (the PyTorch module names)."""
  return sorted({p.rsplit("/", 2)[0].replace("/", ".") for p in shapes(params)})
