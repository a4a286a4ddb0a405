"""Closed-form velocities and flow maps for Gaussian data: the testing oracle (DESIGN.md).

For data ``N(mu, diag(s^2))`` on a path ``x_t = alpha x_0 + sigma eps`` the marginal is
``N(m(t), diag(std(t)^2))`` with ``m = alpha mu`` and ``std^2 = alpha^2 s^2 + sigma^2``; the
probability-flow ODE is affine and its flow map is

    f(x_t, t, s) = m(s) + (std(s) / std(t)) (x_t - m(t)).

(On the linear path with isotropic ``s`` this is DESIGN.md's ``m(t) = (1 - t) mu``,
``sigma(t)^2 = (1 - t)^2 s^2 + t^2``.) For a Gaussian mixture the marginal velocity is the
posterior-weighted sum of the component velocities. All functions take ``x`` of shape
``(B, d)`` and per-example times of shape ``(B,)``.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from fmdistill.paths import Path, bcast

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class Gaussian:
  """``N(mu, diag(scale^2))``; ``mu`` and ``scale`` of shape ``(d,)`` (scale may be scalar)."""
  mu: Array
  scale: Array

  def _moments(self, path: Path, t: Array, x: Array):
    a, sg = bcast(path.alpha(t), x), bcast(path.sigma(t), x)
    da, dsg = bcast(path.dalpha(t), x), bcast(path.dsigma(t), x)
    m = a * self.mu
    var = (a * self.scale) ** 2 + sg ** 2
    std = jnp.sqrt(var)
    dstd = (a * da * self.scale ** 2 + sg * dsg) / std
    return m, da * self.mu, std, dstd

  def velocity(self, path: Path, x: Array, t: Array) -> Array:
    """Marginal velocity ``v(x, t) = m'(t) + (std'(t) / std(t)) (x - m(t))``."""
    m, dm, std, dstd = self._moments(path, t, x)
    return dm + dstd / std * (x - m)

  def flow_map(self, path: Path, x: Array, t: Array, s: Array) -> Array:
    """Exact ``f(x_t, t, s) = x_s``."""
    m_t, _, std_t, _ = self._moments(path, t, x)
    m_s, _, std_s, _ = self._moments(path, s, x)
    return m_s + std_s / std_t * (x - m_t)

  def sample(self, key: Array, n: int) -> Array:
    d = self.mu.shape[-1]
    return self.mu + self.scale * jax.random.normal(key, (n, d))


@dataclasses.dataclass(frozen=True)
class GaussianMixture:
  """Isotropic mixture: ``weights (K,)``, ``means (K, d)``, ``scales (K,)``."""
  weights: Array
  means: Array
  scales: Array

  def velocity(self, path: Path, x: Array, t: Array) -> Array:
    """Marginal velocity: ``sum_k p(k | x_t) v_k(x_t, t)``."""
    a, sg = bcast(path.alpha(t), x)[..., None], bcast(path.sigma(t), x)[..., None]
    da, dsg = bcast(path.dalpha(t), x)[..., None], bcast(path.dsigma(t), x)[..., None]
    # shapes: x (B, d) -> (B, 1, d); components (K, d) -> (1, K, d)
    xk = x[:, None, :]
    mu, sc = self.means[None], self.scales[None, :, None]
    m = a * mu
    var = (a * sc) ** 2 + sg ** 2
    std = jnp.sqrt(var)
    dstd = (a * da * sc ** 2 + sg * dsg) / std
    vk = da * mu + dstd / std * (xk - m)
    logp = (jnp.log(self.weights)[None]
            - 0.5 * jnp.sum((xk - m) ** 2 / var + jnp.log(var), axis=-1))
    w = jax.nn.softmax(logp, axis=-1)
    return jnp.einsum("bk,bkd->bd", w, vk)

  def sample(self, key: Array, n: int) -> Array:
    kc, kn = jax.random.split(key)
    comp = jax.random.choice(kc, self.weights.shape[0], (n,), p=self.weights)
    noise = jax.random.normal(kn, (n, self.means.shape[-1]))
    return self.means[comp] + self.scales[comp][:, None] * noise
