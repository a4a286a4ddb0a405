"""Direct distillation on cached teacher trajectories (Luhman & Luhman 2021; seed ``000_*``
"ReFlow" step 2 and seed ``004_*`` "global forward loss" with the teacher ODE as the solver).

The cache holds teacher ODE states ``x_{t_0}, ..., x_{t_K}`` on the grid ``T = t_0 > ... > t_K
= 0`` started from noise. For a pair ``i < j`` drawn from the grid, the student's flow map
should reproduce the teacher's segment:

    L(theta) = E_{traj, i<j} w(t_i, t_j) || f_theta(x_{t_i}, t_i, t_j) - x_{t_j} ||^2,

with ``w = 1/(t_i - t_j)^2`` (``weighting='span'``, error in average-velocity units) or 1. With
``pairs='endpoints'`` only ``(0, K)`` is used (the classic 1-step student).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from fmdistill import objectives, sampling
from fmdistill.objectives import _common


def defaults():
  cfg = _common.base_config()
  cfg.pair_steps = 4          # K: grid points stored per teacher trajectory (K + 1 states)
  cfg.pairs = "all"           # 'all' pairs i < j of the grid, or 'endpoints'
  cfg.weighting = "span"      # 'span' (1 / (t_i - t_j)^2) or 'none'
  return cfg


def pair_indices(key, n: int, k: int, mode: str):
  """``(i, j)`` of shape ``(n,)`` with ``0 <= i < j <= k``, uniform over pairs for 'all'."""
  if mode == "endpoints":
    return jnp.zeros((n,), jnp.int32), jnp.full((n,), k, jnp.int32)
  if mode != "all":
    raise ValueError(f"pairs must be 'all' or 'endpoints', got {mode!r}")
  ii, jj = jnp.triu_indices(k + 1, 1)
  pick = jax.random.randint(key, (n,), 0, ii.shape[0])
  return ii[pick], jj[pick]


def direct_distill_loss(params, batch, key, *, net, teacher=None, ema_params=None, step=0,
                        cfg=None):
  """Regression of ``f_theta`` on teacher segments. ``batch['traj']``: ``(B, K + 1, ...)``."""
  del teacher, ema_params, step
  cfg = cfg or defaults()
  path, param = _common.path_of(cfg), _common.param_of(cfg)
  traj = batch["traj"]
  b, k = traj.shape[0], traj.shape[1] - 1
  if k != cfg.pair_steps:
    raise ValueError(f"trajectories have {k} steps but pair_steps={cfg.pair_steps}")
  grid = sampling.time_grid(k, path.T)
  i, j = pair_indices(key, b, k, cfg.pairs)
  rows = jnp.arange(b)
  xi, xj = traj[rows, i], traj[rows, j]
  ti, tj = grid[i], grid[j]
  pred = param.apply(net, params, xi, ti, tj, batch.get("cond"))
  err = _common.mean_sq(pred - jax.lax.stop_gradient(xj))
  w = 1.0 / (ti - tj) ** 2 if cfg.weighting == "span" else jnp.ones_like(ti)
  loss = jnp.mean(w * err)
  return loss, {"loss": loss}


objectives.register(objectives.Objective(
    name="direct_distill", loss=direct_distill_loss, defaults=defaults, needs_teacher=True,
    batch="teacher_pairs", doc="regression on cached teacher ODE segments"))
