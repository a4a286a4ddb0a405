"""A small classifier trained on the project's own image data; its penultimate features give
the Fréchet distance (an FID analogue that needs no downloaded Inception weights) and its
predictions the per-class coverage of generated samples (``metrics.class_coverage``).

Images under 32 pixels (digits, shapes) use ``ConvNet``; 32x32 and larger (scenes) use
``ConvNet32``, which pools between three conv layers so its units see whole objects. The weights
are cached in ``<workdir>/classifier.npz`` and reused by later evaluations.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen, nnx


class ConvNet(nnx.Module):
  """Two 3x3 conv layers, global mean pool, a 64-wide feature layer, logits."""

  def __init__(self, channels: int, num_classes: int, *, rngs: nnx.Rngs):
    self.c1 = nnx.Conv(channels, 32, (3, 3), rngs=rngs)
    self.c2 = nnx.Conv(32, 64, (3, 3), rngs=rngs)
    self.fc = nnx.Linear(64, 64, rngs=rngs)
    self.head = nnx.Linear(64, num_classes, rngs=rngs)

  def features(self, x):
    h = nnx.gelu(self.c1(x))
    h = nnx.gelu(self.c2(h))
    return nnx.gelu(self.fc(h.mean(axis=(1, 2))))

  def __call__(self, x):
    return self.head(self.features(x))


class ConvNet32(nnx.Module):
  """Three 3x3 conv layers (32, 64, 128) with 2x2 max pools between, global mean pool, a
  64-wide feature layer, logits."""

  def __init__(self, channels: int, num_classes: int, *, rngs: nnx.Rngs):
    self.c1 = nnx.Conv(channels, 32, (3, 3), rngs=rngs)
    self.c2 = nnx.Conv(32, 64, (3, 3), rngs=rngs)
    self.c3 = nnx.Conv(64, 128, (3, 3), rngs=rngs)
    self.fc = nnx.Linear(128, 64, rngs=rngs)
    self.head = nnx.Linear(64, num_classes, rngs=rngs)

  def features(self, x):
    h = linen.max_pool(nnx.gelu(self.c1(x)), (2, 2), (2, 2))
    h = linen.max_pool(nnx.gelu(self.c2(h)), (2, 2), (2, 2))
    h = nnx.gelu(self.c3(h))
    return nnx.gelu(self.fc(h.mean(axis=(1, 2))))

  def __call__(self, x):
    return self.head(self.features(x))


@dataclasses.dataclass(frozen=True)
class Classifier:
  """``features``: images ``(n, H, W, C)`` -> ``(n, 64)``; ``predict``: images -> labels
  ``(n,)`` in ``[0, num_classes)``; ``accuracy`` on a batch of the (training) data: it says the
  features separate the classes, not that they generalise."""
  features: Callable[[np.ndarray], np.ndarray]
  predict: Callable[[np.ndarray], np.ndarray]
  accuracy: float
  num_classes: int


def _flat(params) -> dict:
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  return {jax.tree_util.keystr(k): np.asarray(v) for k, v in leaves}


def train_classifier(source, steps: int = 600, batch: int = 128, seed: int = 0,
                     cache: str | None = None) -> Classifier:
  """Fit on a labelled source (or load the weights cached at ``cache``)."""
  shape, k = tuple(source.shape), source.num_classes
  model = (ConvNet32 if shape[0] >= 32 else ConvNet)(shape[-1], k, rngs=nnx.Rngs(seed))
  graphdef, params = nnx.split(model)
  params = nnx.to_pure_dict(params)
  if cache and os.path.exists(cache):
    with np.load(cache) as z:
      stored = dict(z)
    params = jax.tree_util.tree_map_with_path(
        lambda p, v: jnp.asarray(stored[jax.tree_util.keystr(p)]), params)
  else:
    opt = optax.adam(2e-3)
    opt_state = opt.init(params)

    @jax.jit
    def step(params, opt_state, x, y):
      def loss(p):
        logits = nnx.merge(graphdef, p)(x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
      g = jax.grad(loss)(params)
      upd, opt_state = opt.update(g, opt_state, params)
      return optax.apply_updates(params, upd), opt_state

    for i in range(steps):
      b = source.batch(i, batch)
      params, opt_state = step(params, opt_state, jnp.asarray(b["x"]), jnp.asarray(b["cond"]))
    if cache:
      np.savez(cache + ".tmp.npz", **_flat(params))
      os.replace(cache + ".tmp.npz", cache)

  feat = jax.jit(lambda p, x: nnx.merge(graphdef, p).features(x))
  logits = jax.jit(lambda p, x: nnx.merge(graphdef, p)(x))

  def features(x: np.ndarray) -> np.ndarray:
    return np.concatenate([np.asarray(feat(params, jnp.asarray(x[i:i + 512])))
                           for i in range(0, len(x), 512)])

  def predict(x: np.ndarray) -> np.ndarray:
    return np.concatenate([np.asarray(logits(params, jnp.asarray(x[i:i + 512]))).argmax(-1)
                           for i in range(0, len(x), 512)])

  b = source.batch(10_000, 512)  # a batch far from the training steps' order
  return Classifier(features, predict, float((predict(b["x"]) == b["cond"]).mean()), k)
