"""Samplers: ODE solvers for a velocity, and flow-map samplers.

Sampling runs from ``t = T`` (noise) down to ``t = 0`` (data) along a time grid
``T = t_0 > t_1 > ... > t_n = 0``. Seeds: ``001_*`` (one-step and multistep flow-map sampling,
CTM's gamma-sampling), ``000_*`` (consistency multistep with noise re-injection).
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from fmdistill.paths import Path, bcast

Array = jax.Array
Velocity = Callable[[Array, Array], Array]          # v(x, t), t of shape (B,)
FlowMapFn = Callable[[Array, Array, Array], Array]  # f(x, t, s)

SOLVERS = ("euler", "midpoint", "heun", "rk4")
NFE_PER_STEP = {"euler": 1, "midpoint": 2, "heun": 2, "rk4": 4}


def time_grid(steps: int, T: float = 1.0, kind: str = "uniform", rho: float = 7.0) -> Array:
  """``steps + 1`` decreasing times from ``T`` to 0.

  ``uniform`` is linear in t; ``power`` spaces as ``T (1 - i/n)^rho``-like EDM grids
  (denser near the data, ``rho`` > 1).
  """
  if steps < 1:
    raise ValueError(f"a time grid needs at least one step, got {steps}")
  u = jnp.linspace(0.0, 1.0, steps + 1)
  if kind == "uniform":
    return T * (1.0 - u)
  if kind == "power":
    return T * (1.0 - u) ** rho
  raise ValueError(f"unknown grid kind {kind!r}; known: ['power', 'uniform']")


def _step(v: Velocity, x: Array, t: Array, s: Array, method: str) -> Array:
  """One step of size ``h = s - t`` (negative when integrating towards the data)."""
  h = bcast(s - t, x)
  if method == "euler":
    return x + h * v(x, t)
  if method == "midpoint":
    k1 = v(x, t)
    return x + h * v(x + 0.5 * h * k1, 0.5 * (t + s))
  if method == "heun":
    k1 = v(x, t)
    k2 = v(x + h * k1, s)
    return x + 0.5 * h * (k1 + k2)
  if method == "rk4":
    m = 0.5 * (t + s)
    k1 = v(x, t)
    k2 = v(x + 0.5 * h * k1, m)
    k3 = v(x + 0.5 * h * k2, m)
    k4 = v(x + h * k3, s)
    return x + h / 6.0 * (k1 + 2 * k2 + 2 * k3 + k4)
  raise ValueError(f"unknown solver {method!r}; known: {list(SOLVERS)}")


def ode_step(v: Velocity, x: Array, t: Array, s: Array, method: str = "euler") -> Array:
  """One solver step from ``t`` to ``s`` per example (``x (B, ...)``, ``t, s (B,)``; each
  example may have its own times), e.g. a teacher step between adjacent grid times."""
  if method not in SOLVERS:
    raise ValueError(f"unknown solver {method!r}; known: {list(SOLVERS)}")
  return _step(v, x, t, s, method)


def solve_ode(v: Velocity, x: Array, grid: Array, method: str = "euler") -> Array:
  """Integrate ``dx/dt = v(x, t)`` from ``grid[0]`` to ``grid[-1]``; ``x (B, ...)``."""
  if method not in SOLVERS:
    raise ValueError(f"unknown solver {method!r}; known: {list(SOLVERS)}")
  b = x.shape[0]

  def body(x, ts):
    t, s = ts
    return _step(v, x, jnp.full((b,), t), jnp.full((b,), s), method), None

  x, _ = jax.lax.scan(body, x, (grid[:-1], grid[1:]))
  return x


def solver_steps_for_nfe(nfe: int, method: str) -> int:
  """Number of solver steps that spend ``nfe`` network evaluations (must divide evenly)."""
  per = NFE_PER_STEP[method]
  if nfe % per:
    raise ValueError(f"{method} uses {per} evaluations per step; {nfe} NFE is not a multiple")
  return nfe // per


def flow_map_step(f: FlowMapFn, x: Array, t: Array, s: Array, *, path: Path | None = None,
                  gamma: float = 0.0, key: Array | None = None, last: Array | bool = False
                  ) -> Array:
  """One step of multistep flow-map sampling from ``t`` to ``s`` (``(B,)`` arrays, ``s < t``).

  ``gamma = 0``: the jump ``f(x, t, s)``. ``gamma > 0`` (CTM's gamma-sampling; ``gamma = 1`` is
  consistency-model multistep: denoise to 0, re-noise with fresh noise): jump to the earlier
  time ``u`` with ``rho(u) = sqrt(1 - gamma^2) rho(s)``, ``rho = sigma / alpha``, then diffuse
  forward to ``s`` with fresh noise along ``path``. ``last``: land on ``s`` exactly (no noise).
  """
  if gamma == 0.0:
    return f(x, t, s)
  if path is None or key is None:
    raise ValueError("gamma-sampling needs a path and a PRNG key")
  rho_s = path.sigma(s) / path.alpha(s)
  rho_u = jnp.sqrt(1.0 - gamma ** 2) * rho_s
  u = jnp.where(rho_u <= 0, 0.0,
                path.time_from_log_snr(-2.0 * jnp.log(jnp.maximum(rho_u, 1e-30))))
  u = jnp.where(last, s, u)
  xu = f(x, t, u)
  a = path.alpha(s) / path.alpha(u)
  var = jnp.maximum(path.sigma(s) ** 2 - (a * path.sigma(u)) ** 2, 0.0)
  xs = bcast(a, x) * xu + bcast(jnp.sqrt(var), x) * jax.random.normal(key, x.shape, x.dtype)
  return jnp.where(last, xu, xs.astype(x.dtype))


def sample_flow_map(f: FlowMapFn, x: Array, grid: Array, *, path: Path | None = None,
                    gamma: float = 0.0, key: Array | None = None) -> Array:
  """Multistep flow-map sampling along ``grid``: ``x <- flow_map_step(f, x, t_i, t_{i+1})``.

  With ``gamma > 0`` (CTM's gamma-sampling; ``gamma = 1`` is consistency-model multistep with
  full noise re-injection) each step jumps to an earlier time and re-noises with fresh noise
  (``flow_map_step``). The last step always lands on ``grid[-1]``.
  """
  b = x.shape[0]
  n = grid.shape[0] - 1
  if gamma == 0.0:
    def det(x, ts):
      t, s = ts
      return f(x, jnp.full((b,), t), jnp.full((b,), s)), None
    return jax.lax.scan(det, x, (grid[:-1], grid[1:]))[0]
  if path is None or key is None:
    raise ValueError("gamma-sampling needs a path and a PRNG key")

  def stoch(x, inp):
    t, s, k, last = inp
    return flow_map_step(f, x, jnp.full((b,), t), jnp.full((b,), s), path=path, gamma=gamma,
                         key=k, last=last), None

  keys = jax.random.split(key, n)
  last = jnp.arange(n) == n - 1
  return jax.lax.scan(stoch, x, (grid[:-1], grid[1:], keys, last))[0]
