"""A small classifier trained on the project's own image data; its penultimate features give
the Fréchet distance (an FID analogue that needs no downloaded Inception weights).

The weights are cached in ``<workdir>/classifier.npz`` and reused by later evaluations.
"""
from __future__ import annotations

import os
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx


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


def _flat(params) -> dict:
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  return {jax.tree_util.keystr(k): np.asarray(v) for k, v in leaves}


def train_classifier(source, steps: int = 600, batch: int = 128, seed: int = 0,
                     cache: str | None = None) -> tuple[Callable[[np.ndarray], np.ndarray], float]:
  """Fit on a labelled source; returns ``(features: (n, H, W, C) -> (n, 64), accuracy)``.

  Accuracy is measured on a batch of the (training) data: it says the features separate the
  classes, not that they generalise.
  """
  shape, k = tuple(source.shape), source.num_classes
  model = ConvNet(shape[-1], k, rngs=nnx.Rngs(seed))
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

  b = source.batch(10_000, 512)  # a batch far from the training steps' order
  pred = np.asarray(logits(params, jnp.asarray(b["x"]))).argmax(-1)
  return features, float((pred == b["cond"]).mean())
