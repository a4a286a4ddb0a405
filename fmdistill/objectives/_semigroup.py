"""Shared pieces of the self-consistency (semigroup) family: Shortcut, SplitMeanFlow and the
general tri-consistency loss (seed ``004_*`` "Three-point consistency loss").

Every loss here has two parts on a statically split batch (the first ``n_sc`` examples carry
the self-consistency term, the rest the boundary term, as Shortcut models build their batches):

* **self-consistency** ``|| f_theta(x_t, t, s) - sg(f^-(f^-(x_t, t, r), r, s)) ||^2 / (t - s)^2``
  for ``s < r < t`` (``f^-`` the target parameters ``theta^-``: ``stopgrad(theta)`` or an EMA,
  ``cfg.target_ema``); the error is in average-velocity units, so for the displacement form
  ``f = x + (s - t) F`` it is ``||F_theta - F_tgt||^2``;
* **boundary** flow matching at ``s = t``: ``|| v_theta(x_t, t) - v ||^2`` with ``v`` the
  conditional velocity (training from scratch) or the teacher's (``cfg.velocity``).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from fmdistill import paths
from fmdistill.errors import invalid
from fmdistill.objectives import _common

Array = jax.Array
sg = jax.lax.stop_gradient


def check(config, method: str, *, displacement: bool = False) -> None:
  """Checks shared by the family (the registry's ``check`` hook, run by ``config.validate``):
  the parameterisation, ``sc_ratio`` in [0, 1], and ``velocity`` with a teacher to give it."""
  o = config.objective
  if displacement and o.param != "displacement":
    raise invalid("objective.param", o.param, f"'displacement' ({method} learns the average "
                  "velocity F of f = x + (s - t) F)")
  if not 0.0 <= o.sc_ratio <= 1.0:
    raise invalid("objective.sc_ratio", o.sc_ratio, "a fraction in [0, 1]")
  if o.velocity not in ("conditional", "teacher"):
    raise invalid("objective.velocity", o.velocity, "'conditional' or 'teacher'")
  if o.velocity == "teacher" and not config.teacher.workdir:
    raise invalid("objective.velocity", o.velocity, "'conditional', or 'teacher' with "
                  "config.teacher.workdir set to a finished flow-matching run")


def sc_count(batch_size: int, ratio: float) -> int:
  """How many of ``batch_size`` examples carry the self-consistency term (at least one of each
  kind when ``0 < ratio < 1``)."""
  if not 0.0 <= ratio <= 1.0:
    raise ValueError(f"the self-consistency fraction must be in [0, 1], got {ratio}")
  n = int(round(batch_size * ratio))
  if 0.0 < ratio < 1.0 and batch_size >= 2:
    n = min(max(n, 1), batch_size - 1)
  return n


def target_params(params, ema_params):
  """``theta^-``: the EMA passed by the train loop (``cfg.target_ema``), else ``stopgrad(theta)``."""
  return sg(params if ema_params is None else ema_params)


def distinct_pairs(key: Array, n: int, cfg, path: paths.Path, gap: float = 1e-3
                   ) -> tuple[Array, Array]:
  """``(t, s)``, ``(n,)``: two sorted draws of ``cfg.time_sampler`` with ``t - s >= gap T`` (the
  boundary ``s = t`` has its own examples)."""
  t, s = paths.sample_pairs(key, n, path, cfg.time_sampler, equal_ratio=0.0,
                            mean=cfg.time_mean, std=cfg.time_std)
  t = jnp.maximum(t, gap * path.T)
  return t, jnp.minimum(s, t - gap * path.T)


def two_jump_velocity(net, params, x: Array, t: Array, r: Array, s: Array, cond=None
                      ) -> Array:
  """The two-jump target of the displacement form ``f = x + (s - t) F`` in ``F``-space, under
  ``stop_gradient``: ``((t - r) F(x, t, r) + (r - s) F(x_r, r, s)) / (t - s)`` with ``x_r = x -
  (t - r) F(x, t, r)`` (the same as ``composite`` up to rounding, without its cancellation
  ``(f - x) / (s - t)`` for short jumps)."""
  u2 = net(params, x, t, r, cond)
  x_r = x - paths.bcast(t - r, x) * u2
  u1 = net(params, x_r, r, s, cond)
  lam = paths.bcast((t - r) / (t - s), x)
  return sg(lam * u2 + (1.0 - lam) * u1)


def composite(param, net, params, x: Array, t: Array, r: Array, s: Array, cond=None) -> Array:
  """``f(f(x, t, r), r, s)`` under ``stop_gradient``: the two-jump target."""
  x_r = param.apply(net, params, x, t, r, cond)
  return sg(param.apply(net, params, x_r, r, s, cond))


def velocity_error(pred: Array, target: Array, t: Array, s: Array) -> Array:
  """``(B,)``: ``||pred - target||^2 / (t - s)^2`` (per-example mean over features); ``t > s``."""
  return _common.mean_sq(pred - target) / jnp.square(t - s)


def boundary(param, net, params, x0: Array, key: Array, cfg, teacher, cond=None
             ) -> tuple[Array, Array]:
  """Flow matching at ``s = t`` on ``x0``: ``((B,) errors, t)``; ``v`` conditional or the
  teacher's (``cfg.velocity``), times from ``cfg.time_sampler``."""
  path = _common.path_of(cfg)
  kt, kn = jax.random.split(key)
  t = _common.sample_t(kt, x0.shape[0], cfg, path)
  x_t, _, v_cond = _common.noisy(kn, x0, t, path)
  v = _common.target_velocity(cfg, teacher, x_t, t, v_cond, cond)
  return _common.mean_sq(param.velocity(net, params, x_t, t, cond) - v), t


def combine(sc: Array, fm: Array) -> tuple[Array, dict]:
  """The batch mean over both parts, and each part's mean as a metric."""
  loss = jnp.mean(jnp.concatenate([sc, fm]))
  metrics = {"loss": loss}
  if sc.shape[0]:
    metrics["self_consistency"] = jnp.mean(sc)
  if fm.shape[0]:
    metrics["boundary"] = jnp.mean(fm)
  return loss, metrics


def noised(key: Array, x0: Array, t: Array, path: paths.Path) -> Array:
  eps = jax.random.normal(key, x0.shape, x0.dtype)
  return path.sample(x0, eps, t)
