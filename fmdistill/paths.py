"""Probability paths ``x_t = alpha(t) x_0 + sigma(t) eps`` and time samplers.

Conventions (DESIGN.md): ``t = 0`` is data, ``t = T`` is noise; the velocity is
``v = dx_t/dt = alpha'(t) x_0 + sigma'(t) eps``. Seeds: ``001_*`` (table of Gaussian paths and
their conditional velocities), ``003_*`` (TrigFlow, SNR matching to rectified flow).

Paths:
  * ``linear`` (rectified flow): ``alpha = 1 - t``, ``sigma = t``, ``T = 1``, ``v = eps - x_0``.
  * ``trigflow`` (sCM): ``alpha = cos t``, ``sigma = sigma_d sin t``, ``T = pi/2``, so
    ``v = -sin(t) x_0 + cos(t) sigma_d eps`` (the data has scale ``sigma_d``).
  * ``vp`` (cosine): ``alpha = cos(pi t / 2)``, ``sigma = sin(pi t / 2)``, ``T = 1``.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp

Array = jax.Array
VelocityFn = Callable[[Array, Array], Array]  # v(x, t) with x (B, ...), t (B,)


def bcast(t: Array, x: Array) -> Array:
  """Reshape per-example ``t`` of shape ``(B,)`` to broadcast against ``x`` ``(B, ...)``."""
  t = jnp.asarray(t)
  return t.reshape(t.shape + (1,) * (x.ndim - t.ndim))


@dataclasses.dataclass(frozen=True)
class Path:
  """A Gaussian probability path; every function maps a time array to an array of its shape."""
  name: str
  T: float
  alpha: Callable[[Array], Array]
  sigma: Callable[[Array], Array]
  dalpha: Callable[[Array], Array]
  dsigma: Callable[[Array], Array]
  sigma_d: float = 1.0

  def sample(self, x0: Array, eps: Array, t: Array) -> Array:
    """``x_t = alpha(t) x0 + sigma(t) eps``; x0, eps ``(B, ...)``, t ``(B,)``."""
    t = t.astype(jnp.float32)
    return (bcast(self.alpha(t), x0) * x0 + bcast(self.sigma(t), x0) * eps).astype(x0.dtype)

  def velocity(self, x0: Array, eps: Array, t: Array) -> Array:
    """Conditional velocity ``dx_t/dt = alpha'(t) x0 + sigma'(t) eps``."""
    t = t.astype(jnp.float32)
    return (bcast(self.dalpha(t), x0) * x0 + bcast(self.dsigma(t), x0) * eps).astype(x0.dtype)

  def log_snr(self, t: Array) -> Array:
    """``log(alpha^2 / sigma^2)``; decreasing in t. ``alpha`` and ``sigma`` are floored at the
    smallest normal float32: at ``t = T`` on TrigFlow ``cos(float32(pi/2))`` rounds to
    ``-4e-8``, whose log would be NaN (the SNR is then ``~e^-174``, i.e. pure noise)."""
    tiny = jnp.finfo(jnp.float32).tiny
    return 2.0 * (jnp.log(jnp.maximum(self.alpha(t), tiny))
                  - jnp.log(jnp.maximum(self.sigma(t), tiny)))

  def time_from_log_snr(self, lam: Array) -> Array:
    """Inverse of ``log_snr`` (closed form for each path)."""
    return _INVERSE_LOG_SNR[self.name](self, lam)

  def denoise(self, x: Array, v: Array, t: Array) -> tuple[Array, Array]:
    """Recover ``(x0_hat, eps_hat)`` from a point ``x`` and velocity ``v`` at time ``t``.

    Solves ``x = a x0 + s eps``, ``v = a' x0 + s' eps`` (a 2x2 system per time).
    """
    t = t.astype(jnp.float32)
    a, s, da, ds = (bcast(f(t), x) for f in (self.alpha, self.sigma, self.dalpha, self.dsigma))
    det = a * ds - s * da
    x0 = (ds * x - s * v) / det
    eps = (a * v - da * x) / det
    return x0, eps


def linear() -> Path:
  one = lambda t: jnp.ones_like(t)
  return Path("linear", 1.0, alpha=lambda t: 1.0 - t, sigma=lambda t: t,
              dalpha=lambda t: -one(t), dsigma=one)


def trigflow(sigma_d: float = 1.0) -> Path:
  return Path("trigflow", math.pi / 2, alpha=jnp.cos, sigma=lambda t: sigma_d * jnp.sin(t),
              dalpha=lambda t: -jnp.sin(t), dsigma=lambda t: sigma_d * jnp.cos(t),
              sigma_d=sigma_d)


def vp() -> Path:
  h = math.pi / 2
  return Path("vp", 1.0, alpha=lambda t: jnp.cos(h * t), sigma=lambda t: jnp.sin(h * t),
              dalpha=lambda t: -h * jnp.sin(h * t), dsigma=lambda t: h * jnp.cos(h * t))


_INVERSE_LOG_SNR = {
    # alpha/sigma = (1-t)/t = r  =>  t = 1 / (1 + r)
    "linear": lambda p, lam: 1.0 / (1.0 + jnp.exp(lam / 2)),
    # cos/(sigma_d sin) = r  =>  t = arctan(1 / (sigma_d r))
    "trigflow": lambda p, lam: jnp.arctan(jnp.exp(-lam / 2) / p.sigma_d),
    "vp": lambda p, lam: jnp.arctan(jnp.exp(-lam / 2)) / (math.pi / 2),
}

PATHS = {"linear": linear, "trigflow": trigflow, "vp": vp}


def get_path(name: str, sigma_d: float = 1.0) -> Path:
  """Path by config name; ``sigma_d`` only matters for TrigFlow."""
  if name not in PATHS:
    raise ValueError(f"unknown path {name!r}; known paths: {sorted(PATHS)}")
  return trigflow(sigma_d) if name == "trigflow" else PATHS[name]()


def convert_time(t: Array, src: Path, dst: Path) -> Array:
  """The time on ``dst`` with the same SNR as ``t`` on ``src``."""
  return dst.time_from_log_snr(src.log_snr(t))


def point_scale(t: Array, src: Path, dst: Path) -> Array:
  """The factor ``k`` with ``x_dst = k x_src`` at ``t`` on ``src`` and the matched time on
  ``dst``: ``alpha_dst / alpha_src = sigma_dst / sigma_src``, computed as the ratio of
  ``sqrt(alpha^2 + sigma^2)`` so it is finite at both ends of the path."""
  u = convert_time(t, src, dst)
  norm = lambda p, s: jnp.sqrt(p.alpha(s) ** 2 + p.sigma(s) ** 2)
  return norm(dst, u) / norm(src, t)


def convert_velocity(v_src: VelocityFn, src: Path, dst: Path) -> VelocityFn:
  """Turn a velocity on ``src`` into the velocity of the same marginals on ``dst``.

  At matched SNR, ``x_dst = (alpha_dst / alpha_src) x_src``; the denoiser and noise prediction
  are path independent, so ``v_dst = alpha_dst' x0_hat + sigma_dst' eps_hat``. Valid for
  ``0 < t < T`` (the SNR is degenerate at the ends).
  """
  def v_dst(x: Array, t: Array) -> Array:
    t_src = convert_time(t, dst, src)
    x_src = x * bcast(point_scale(t, dst, src), x)
    x0, eps = src.denoise(x_src, v_src(x_src, t_src), t_src)
    return bcast(dst.dalpha(t), x) * x0 + bcast(dst.dsigma(t), x) * eps
  return v_dst


# ----------------------------------------------------------------------------- time samplers

TIME_SAMPLERS = ("uniform", "logit_normal", "scm")


def uniform_time(key: Array, n: int, T: float = 1.0, eps: float = 1e-3) -> Array:
  """``t ~ U[eps, T]``, shape ``(n,)``."""
  return jax.random.uniform(key, (n,), minval=eps, maxval=T)


def logit_normal_time(key: Array, n: int, mean: float = 0.0, std: float = 1.0,
                      T: float = 1.0) -> Array:
  """``t = T * sigmoid(mean + std n)`` (SD3 / MeanFlow), shape ``(n,)``."""
  return T * jax.nn.sigmoid(mean + std * jax.random.normal(key, (n,)))


def scm_time(key: Array, n: int, p_mean: float = -1.0, p_std: float = 1.4,
             sigma_d: float = 1.0) -> Array:
  """sCM's proposal ``t = arctan(exp(P_mean + P_std n) / sigma_d)`` on TrigFlow, ``(n,)``."""
  return jnp.arctan(jnp.exp(p_mean + p_std * jax.random.normal(key, (n,))) / sigma_d)


def sample_time(key: Array, n: int, path: Path, kind: str = "uniform", *, mean: float = 0.0,
                std: float = 1.0) -> Array:
  """Times ``(n,)`` in ``[0, path.T]`` from the sampler ``kind`` (the one API every loss uses).

  * ``uniform``: ``U[1e-3, T]``.
  * ``logit_normal``: ``T sigmoid(mean + std n)`` (SD3, MeanFlow).
  * ``scm``: sCM's ``arctan(exp(mean + std n) / sigma_d)`` on TrigFlow (``mean = P_mean``,
    ``std = P_std``); on other paths the same draw with ``sigma_d = 1`` rescaled from
    ``[0, pi/2]`` to ``[0, T]`` (FACM's choice), so it never leaves ``[0, T]``.
  """
  if kind == "uniform":
    t = uniform_time(key, n, T=path.T)
  elif kind == "logit_normal":
    t = logit_normal_time(key, n, mean, std, T=path.T)
  elif kind == "scm":
    if path.name == "trigflow":
      t = scm_time(key, n, mean, std, path.sigma_d)
    else:
      t = scm_time(key, n, mean, std, 1.0) * (path.T / (math.pi / 2))
  else:
    raise ValueError(f"unknown time sampler {kind!r}; known: {sorted(TIME_SAMPLERS)}")
  return jnp.clip(t, 0.0, path.T)


def sample_pairs(key: Array, n: int, path: Path, kind: str = "uniform", *,
                 equal_ratio: float = 0.25, mean: float = 0.0, std: float = 1.0
                 ) -> tuple[Array, Array]:
  """Pairs ``(t, s)`` with ``0 <= s <= t <= T``: two draws of ``sample_time`` sorted, and
  ``s = t`` for a fraction ``equal_ratio`` of the batch (MeanFlow's ``r = t`` samples)."""
  k1, k2, k3 = jax.random.split(key, 3)
  a = sample_time(k1, n, path, kind, mean=mean, std=std)
  b = sample_time(k2, n, path, kind, mean=mean, std=std)
  t, s = jnp.maximum(a, b), jnp.minimum(a, b)
  equal = jax.random.uniform(k3, (n,)) < equal_ratio
  return t, jnp.where(equal, t, s)
