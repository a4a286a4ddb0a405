"""Shortcut models (Frans, Hafner, Levine & Abbeel 2024, "One step diffusion via shortcut
models"; seed ``001_*`` "Shortcut Models"; seed ``004_*``: the midpoint tri-consistency).

The network ``s_theta(x_t, t, d)`` is the displacement ``F`` of ``f = x + (s - t) F`` with the
step size ``d = t - s`` (the library's ``(t, s)`` inputs; its time embedding takes ``t`` and
``t - s``). The loss is flow matching at ``d = 0`` plus self-consistency: one jump of size
``2d`` equals two jumps of size ``d``,

    L = E || F_theta(x_t, t, t) - v ||^2
      + E || F_theta(x_t, t, t - 2d) - sg(F^-(x_t, t, t - d) + F^-(x', t - d, t - 2d)) / 2 ||^2,
    x' = x_t - d F^-(x_t, t, t - d),

on the paper's dyadic grid: with ``M = cfg.shortcut_steps`` (the paper's 128 smallest steps),
the big jump is ``2d = T 2^k / M`` for a level ``k ~ U{1..log2 M}`` and ``t`` is a multiple of
``2d`` (``t in {2d, 4d, ..., T}``); the flow-matching times are the grid ``{T/M, ..., T}``
(``fm_times='grid'``; 'continuous' draws ``cfg.time_sampler``). At the finest level ``d = T/M``
the two half jumps are Euler steps of the flow-matching velocity ``F^-(x, t, t)``
(``finest='flow'``: the paper's code trains its smallest step by flow matching and bootstraps the
next level from it); ``finest='map'`` uses the network at ``d = T/M`` instead (then the exact
flow map is an exact fixed point). A fraction ``sc_ratio`` of each batch carries the
self-consistency term (the paper's ``k = 1/4``; its code's ``bootstrap_every = 8`` is 1/8), and
the targets go through the EMA weights (``target_ema``, the code's ``bootstrap_ema``; ``''`` =
``stopgrad(theta)``). Not reproduced: the code's clipping of targets to [-4, 4] (an image-range
guard) and classifier-free guidance inside the bootstrap targets.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from fmdistill import errors, objectives
from fmdistill.objectives import _common, _semigroup
from fmdistill.paths import bcast


def defaults():
  cfg = _common.base_config(target_ema="ema_0.999")
  cfg.shortcut_steps = 128      # M: the smallest step is T / M (a power of two)
  cfg.sc_ratio = 0.25           # fraction of the batch on the self-consistency term
  cfg.finest = "flow"           # half jumps at the finest level: 'flow' (Euler) or 'map'
  cfg.fm_times = "grid"         # flow-matching times: 'grid' ({T/M, ..., T}) or 'continuous'
  cfg.velocity = "conditional"  # flow-matching target: 'conditional' or 'teacher'
  return cfg


def levels(steps: int) -> int:
  """``log2 M``: the number of big-jump sizes ``T 2^k / M``, ``k = 1..log2 M``."""
  k = int(round(math.log2(steps))) if steps >= 2 else -1
  if k < 1 or 2 ** k != steps:
    raise ValueError(f"shortcut_steps must be a power of two >= 2, got {steps}")
  return k


def sample_jumps(key, n: int, steps: int, T: float):
  """``(t, d)``, ``(n,)``: a half-jump ``d = T 2^(k-1) / M`` (level ``k`` uniform) and a start
  ``t`` on the grid of multiples of ``2d`` in ``(0, T]``."""
  kk, kt = jax.random.split(key)
  k = jax.random.randint(kk, (n,), 1, levels(steps) + 1)
  big = T * jnp.exp2(k.astype(jnp.float32)) / steps
  count = jnp.round(T / big).astype(jnp.int32)     # jumps of size 2d in [0, T]
  j = jax.random.randint(kt, (n,), 1, count + 1)
  return big * j.astype(jnp.float32), 0.5 * big


def half_jumps(net, params, x, t, d, finest, cond=None):
  """Two jumps of size ``d`` from ``(x, t)`` through ``params`` (``theta^-``); at ``finest``
  (a ``(B,)`` mask) each is an Euler step of ``F(x, t, t)``. Returns the average velocity."""
  s1 = jnp.where(finest, t, t - d)
  u1 = net(params, x, t, s1, cond)
  x_mid = x - bcast(d, x) * u1
  t2 = t - d
  u2 = net(params, x_mid, t2, jnp.where(finest, t2, t2 - d), cond)
  return jax.lax.stop_gradient(0.5 * (u1 + u2))


def shortcut_loss(params, batch, key, *, net, teacher=None, ema_params=None, step=0, cfg=None):
  """Flow matching at ``d = 0`` plus dyadic self-consistency. ``batch['x']``: ``(B, ...)``."""
  del step
  cfg = cfg or defaults()
  _common.require(cfg, param="displacement", method="shortcut")
  if cfg.finest not in ("flow", "map") or cfg.fm_times not in ("grid", "continuous"):
    raise ValueError(f"shortcut: finest must be 'flow' or 'map' (got {cfg.finest!r}) and "
                     f"fm_times 'grid' or 'continuous' (got {cfg.fm_times!r})")
  path, param = _common.path_of(cfg), _common.param_of(cfg)
  x0, m = batch["x"], cfg.shortcut_steps
  kd, kj, kn, kt, kf = jax.random.split(key, 5)
  cond = _common.drop_labels(kd, batch.get("cond"), cfg)
  n = _semigroup.sc_count(x0.shape[0], cfg.sc_ratio)
  c_sc = None if cond is None else cond[:n]
  c_fm = None if cond is None else cond[n:]
  t, d = sample_jumps(kj, n, m, path.T)
  x_t = _semigroup.noised(kn, x0[:n], t, path)
  finest = (d < 1.5 * path.T / m) & (cfg.finest == "flow")  # d = T / M
  target = half_jumps(net, _semigroup.target_params(params, ema_params), x_t, t, d, finest,
                      c_sc)
  sc = _common.mean_sq(net(params, x_t, t, t - 2 * d, c_sc) - target)
  # flow matching at d = 0 on the rest of the batch
  x_fm = x0[n:]
  if cfg.fm_times == "grid":
    tf = path.T * jax.random.randint(kt, (x_fm.shape[0],), 1, m + 1).astype(jnp.float32) / m
  else:
    tf = _common.sample_t(kt, x_fm.shape[0], cfg, path)
  x_tf, _, v_cond = _common.noisy(kf, x_fm, tf, path)
  v = _common.target_velocity(cfg, teacher, x_tf, tf, v_cond, c_fm)
  fm = _common.mean_sq(param.velocity(net, params, x_tf, tf, c_fm) - v)
  return _semigroup.combine(sc, fm)


def check(config) -> None:
  """Config checks (run by ``config.validate``)."""
  _semigroup.check(config, "shortcut", displacement=True)
  o = config.objective
  try:
    levels(o.shortcut_steps)
  except ValueError:
    raise errors.invalid("objective.shortcut_steps", o.shortcut_steps,
                         "a power of two >= 2 (the paper's 128)") from None
  if o.finest not in ("flow", "map"):
    raise errors.invalid("objective.finest", o.finest, "'flow' or 'map'")
  if o.fm_times not in ("grid", "continuous"):
    raise errors.invalid("objective.fm_times", o.fm_times, "'grid' or 'continuous'")


objectives.register(objectives.Objective(
    name="shortcut", loss=shortcut_loss, defaults=defaults, check=check,
    doc="shortcut models: flow matching at d = 0 + dyadic self-consistency (2d = d + d)"))
