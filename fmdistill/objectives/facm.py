"""FACM: Flow-Anchored Consistency Models (Peng et al. 2025; seed ``001_*`` "Flow Anchor
Consistency Model").

Linear path; the consistency model is the displacement flow map to ``s = 0``,
``f_theta(x_t, t, 0) = x_t - t F_theta(x_t, t, 0)``, and ``df/dt = 0`` along the ODE gives the
MeanFlow-at-``s = 0`` target (seed ``001_*``)

    F_tgt = v - t dF^-/dt,   dF^-/dt = jax.jvp(F(., ., 0), (x_t, t), (v, 1)).

FACM's CM loss relaxes and clips it: with ``g = F^- - F_tgt`` (``= -df^-/dt``),

    target = F^- - alpha(t) clip(g, -1, 1),  alpha(t) = 1 - (1 - t)^p_relax,
    L_CM = E[ beta(t) d_2(F_theta, sg(target)) ],  beta(t) = sin(pi t / 2),
    d_2(a, b) = ||a - b||^2 / sg((||a - b||^2 + c)^p_norm)           (norm-L2, p = 0.5)

and the flow-matching anchor trains the *same* network on the expanded time interval
``t' = 1 + t in [1, 2]`` (FACM's ``t' = 2 - t`` in its data-at-1 convention):

    L_FM = E[ d_1(F_theta(x_t, t', t'), v) ],  d_1 = ||.||^2 + cosine distance (over channels).

``L = L_CM + L_FM``. ``v`` is the teacher's (optionally guided) velocity (FACM distils a
pretrained flow model) or the conditional velocity. Times: ``t = (2/pi) arctan(e^{P_mean +
P_std n})`` with ``(P_mean, P_std) = (-0.8, 1.6)`` as in FACM's ImageNet run. ``anchor =
'diagonal'`` instead puts the anchor on ``F(x_t, t, t)`` (the network's own s = t slot).
Deviation: ``||.||^2`` is the per-example mean over dimensions, as in FACM's ``mean_flat``.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from fmdistill import objectives
from fmdistill.objectives import _common, _tangent
from fmdistill.paths import bcast


def defaults():
  cfg = _common.base_config(time_sampler="scm", time_mean=-0.8, time_std=1.6)
  cfg.velocity = "teacher"      # or 'conditional'
  cfg.anchor = "shifted"        # FM anchor at t' = 1 + t ('shifted') or at s = t ('diagonal')
  cfg.relax_p = 0.5
  cfg.norm_p = 0.5
  cfg.norm_c = 1e-3
  cfg.time_fd = 0.0
  cfg.t_min = 1e-3
  return cfg


def _cm(net, params, ema_params, x_t, t, v, cond, *, fused, time_fd):
  """``(F_theta, F^-, F_tgt)`` of the consistency term (``s = 0``)."""
  zero = jnp.zeros_like(t)
  fn = lambda p, x, t_: net(p, x, t_, zero, cond)
  F, F_m, dF = _tangent.eulerian(fn, params, ema_params, x_t, t, v, fused=fused, time_fd=time_fd)
  F_tgt = v.astype(jnp.float32) - bcast(t, dF) * dF.astype(jnp.float32)
  return F, F_m, jax.lax.stop_gradient(F_tgt)


def cm_target(net, params, x_t, t, v, cond=None, *, time_fd: float = 0.0):
  """Unrelaxed CM target ``F_tgt = v - t dF/dt (B, ...)`` (``= F + df/dt`` for ``s = 0``)."""
  return _cm(net, params, None, x_t, t, v, cond, fused=True, time_fd=time_fd)[2]


def anchor_times(t, cfg):
  """The network's time inputs ``(t', s')`` of the flow-matching anchor."""
  if cfg.anchor == "shifted":
    return 1.0 + t, 1.0 + t
  if cfg.anchor == "diagonal":
    return t, t
  raise ValueError(f"anchor must be 'shifted' or 'diagonal', got {cfg.anchor!r}")


def cosine_distance(a, b):
  """Per-example mean over positions of ``1 - cos(a, b)`` along the last (channel) axis."""
  a, b = a.astype(jnp.float32), b.astype(jnp.float32)
  dot = jnp.sum(a * b, -1)
  # rsqrt of the clamped squared norms: finite gradients at a = 0 (a zero-initialised output)
  cos = dot * jax.lax.rsqrt(jnp.maximum(jnp.sum(a * a, -1) * jnp.sum(b * b, -1), 1e-16))
  return jnp.mean((1.0 - cos).reshape(a.shape[0], -1), -1)


def facm_loss(params, batch, key, *, net, teacher=None, ema_params=None, step=0, cfg=None):
  """FACM (module docstring). ``batch['x'] (B, ...)``. Metrics: loss, cm, fm."""
  del step
  cfg = cfg or defaults()
  _common.require(cfg, param="displacement", path="linear", method="FACM")
  path = _common.path_of(cfg)
  x0 = batch["x"]
  kt, kn, kd = jax.random.split(key, 3)
  t = jnp.clip(_common.sample_t(kt, x0.shape[0], cfg, path), cfg.t_min, path.T)
  x_t, _, v_cond = _common.noisy(kn, x0, t, path)
  cond = _common.drop_labels(kd, batch.get("cond"), cfg)
  v = _common.target_velocity(cfg, teacher, x_t, t, v_cond, cond)
  # flow-matching anchor on the expanded time interval
  ta, sa = anchor_times(t, cfg)
  F_fm = net(params, x_t, ta, sa, cond).astype(jnp.float32)
  fm = _common.mean_sq(F_fm - v) + cosine_distance(F_fm, v)
  # consistency term, relaxed and clipped target, norm-L2 distance
  F, F_m, F_tgt = _cm(net, params, ema_params, x_t, t, v, cond, fused=not cfg.target_ema,
                      time_fd=cfg.time_fd)
  F_m = F_m.astype(jnp.float32)
  alpha = 1.0 - (1.0 - t) ** cfg.relax_p
  target = jax.lax.stop_gradient(F_m - bcast(alpha, F_m) * jnp.clip(F_m - F_tgt, -1.0, 1.0))
  e = _common.mean_sq(F.astype(jnp.float32) - target)
  cm = e / jax.lax.stop_gradient((e + cfg.norm_c) ** cfg.norm_p)
  beta = jnp.sin(0.5 * math.pi * t / path.T)
  loss = jnp.mean(beta * cm) + jnp.mean(fm)
  return loss, {"loss": loss, "cm": jnp.mean(cm), "fm": jnp.mean(fm)}


objectives.register(objectives.Objective(
    name="facm", loss=facm_loss, defaults=defaults, needs_teacher=True, tangent=True,
    consistency=True,
    doc="Flow-anchored consistency model: s = 0 jvp target + FM anchor on t' in [1, 2]"))
