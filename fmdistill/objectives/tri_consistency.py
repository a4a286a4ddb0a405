"""Tri-consistency / semigroup self-distillation (seed ``004_*`` "Three-point consistency loss"
and its summary table; seed ``001_*`` "Shortcut Models", "SplitMeanFlow").

The flow map of an ODE is a semigroup, ``f(f(x, t0, t1), t1, t2) = f(x, t0, t2)`` for all
``t0, t1, t2``, and the seed's loss is

    L_tri = E || f(f(x_{t0}, t0, t1), t1, t2) - f(x_{t0}, t0, t2) ||^2.

Here it is self-distillation: with ``t = t0 > r = t1 > s = t2`` the student jump ``f_theta(x_t,
t, s)`` is regressed onto the two-jump target through ``theta^-`` (stop-gradient or EMA), the
error in average-velocity units (``/ (t - s)^2``), plus the boundary flow-matching term at
``s = t`` that anchors the map to the ODE (``fmdistill.objectives._semigroup``). ``(t, s)`` are
two sorted draws of ``cfg.time_sampler``; the intermediate time follows ``cfg.split``:

* ``'uniform'``: ``r = t - lambda (t - s)``, ``lambda ~ U(0, 1)`` (SplitMeanFlow's sampling);
* ``'midpoint'``: ``r = (t + s) / 2`` (Shortcut models' self-consistency, seed 004);
* ``'forward'``: ``r = s + near (t - s)``: the second jump is short, ``L_tri ~ L_fwd`` (seed 004:
  "when t1 ~ t2"; the target is the map's own jump followed by a short step, the Lagrangian
  condition ``d_s f = v(f, s)``);
* ``'backward'``: ``r = t - near (t - s)``: the first jump is short, ``L_tri ~ L_bwd`` ("when
  t0 ~ t1"; the target is the map from a point a little further along the ODE, the Eulerian
  condition ``d/dt f(x_t, t, s) = 0`` of consistency models).

``sc_ratio`` of the batch carries the self-consistency term, the rest the boundary term.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from fmdistill import errors, objectives
from fmdistill.objectives import _common, _semigroup

SPLITS = ("uniform", "midpoint", "forward", "backward")


def defaults():
  cfg = _common.base_config()
  cfg.split = "uniform"      # where the intermediate time sits: SPLITS
  cfg.near = 0.05            # 'forward' / 'backward': the short jump is near * (t - s)
  cfg.sc_ratio = 0.5         # fraction of the batch on the self-consistency term
  cfg.velocity = "conditional"  # boundary target: 'conditional' (from scratch) or 'teacher'
  return cfg


def intermediate(key, t, s, split: str, near: float):
  """``r = t - lambda (t - s)`` (``(B,)`` arrays): ``lambda`` is the first jump's share."""
  if split == "uniform":
    lam = jax.random.uniform(key, t.shape)
  elif split == "midpoint":
    lam = jnp.full_like(t, 0.5)
  elif split == "forward":
    lam = jnp.full_like(t, 1.0 - near)
  elif split == "backward":
    lam = jnp.full_like(t, near)
  else:
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
  return t - lam * (t - s)


def tri_consistency_loss(params, batch, key, *, net, teacher=None, ema_params=None, step=0,
                         cfg=None):
  """Semigroup self-distillation plus the boundary term. ``batch['x']``: data ``(B, ...)``."""
  del step
  cfg = cfg or defaults()
  if not 0.0 < cfg.near < 1.0:
    raise ValueError(f"near must be in (0, 1), got {cfg.near}")
  return semigroup_loss(params, batch, key, net=net, teacher=teacher, ema_params=ema_params,
                        cfg=cfg, split=cfg.split, near=cfg.near)


def semigroup_loss(params, batch, key, *, net, teacher, ema_params, cfg, split: str,
                   near: float):
  """The loss for an intermediate-time rule ``split`` (also SplitMeanFlow's, with 'uniform')."""
  path, param = _common.path_of(cfg), _common.param_of(cfg)
  x0 = batch["x"]
  kd, kp, kr, kn, kb = jax.random.split(key, 5)
  cond = _common.drop_labels(kd, batch.get("cond"), cfg)
  n = _semigroup.sc_count(x0.shape[0], cfg.sc_ratio)
  c_sc = None if cond is None else cond[:n]
  c_fm = None if cond is None else cond[n:]
  # self-consistency on the first n examples (s < t strictly: distinct draws, floored gap)
  t, s = _semigroup.distinct_pairs(kp, n, cfg, path)
  r = intermediate(kr, t, s, split, near)
  x_t = _semigroup.noised(kn, x0[:n], t, path)
  theta_m = _semigroup.target_params(params, ema_params)
  if cfg.param == "displacement":  # in F-space: no cancellation for short jumps
    target = _semigroup.two_jump_velocity(net, theta_m, x_t, t, r, s, c_sc)
    sc = _common.mean_sq(net(params, x_t, t, s, c_sc) - target)
  else:
    target = _semigroup.composite(param, net, theta_m, x_t, t, r, s, c_sc)
    pred = param.apply(net, params, x_t, t, s, c_sc)
    sc = _semigroup.velocity_error(pred, target, t, s)
  fm, _ = _semigroup.boundary(param, net, params, x0[n:], kb, cfg, teacher, c_fm)
  return _semigroup.combine(sc, fm)


def check(config) -> None:
  """Config checks (run by ``config.validate``)."""
  _semigroup.check(config, "tri_consistency")
  o = config.objective
  if o.split not in SPLITS:
    raise errors.invalid("objective.split", o.split, list(SPLITS))
  if not 0.0 < o.near < 1.0:
    raise errors.invalid("objective.near", o.near, "a fraction in (0, 1)")


objectives.register(objectives.Objective(
    name="tri_consistency", loss=tri_consistency_loss, defaults=defaults, check=check,
    doc="semigroup self-distillation f(f(x,t,r),r,s) = f(x,t,s) + boundary flow matching"))
