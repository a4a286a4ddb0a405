"""Align Your Flow (Sabour, Fidler & Kreis 2025, "Align Your Flow: Scaling Continuous-Time Flow
Map Distillation"; seed ``001_*`` "Align Your Flow", seed ``004_*`` forward/backward losses).

Flow map ``f_theta(x_t, t, s) = x_t + (s - t) F_theta(x_t, t, s)`` (``c_skip = 1``,
``c_out = s - t``) on the linear path. Two continuous-time objectives, both defined by their
gradients (seed ``001_*``):

* **AYF-EMD** (Eulerian, backward type):
  ``grad E[ w sign(t - s) f_theta^T df^-/dt ]`` with ``df^-/dt = v - F^- + (s - t) dF^-/dt``
  the tangent of ``f^-`` along the teacher ODE (``jax.jvp`` in ``(x_t, t)``). Since
  ``grad f_theta = (s - t) grad F_theta`` this is, up to a positive weight, the gradient of

      L_EMD = E || F_theta - F^- - g ||^2,  g = df^-/dt / (||df^-/dt|| + c).

* **AYF-LMD** (Lagrangian, forward type):
  ``grad E[ w sign(s - t) f_theta^T (d_s f^- - v(f^-, s)) ]`` with ``d_s f^- = F^- + (s - t)
  d_s F^-`` (``jax.jvp`` in ``s``) and the teacher's velocity at the map's output, i.e.

      L_LMD = E || F_theta - F^- + g ||^2,  g = n(d_s f^- - v(f^-, s)).

Both use sCM's stabilisers as AYF does: tangent normalisation ``n(g) = g / (||g|| + c)`` and the
tangent warmup ``r`` on the network-derivative term (``(s - t) dF^-/dt``), ramped 0 -> 1
(public re-implementations of AYF's "regularized tangent warmup" stop at ``r = 0.99``; the paper's
own value was not checked here, and no cap is offered).
Only the gradients are meaningful. EMD may follow the conditional velocity (training from
scratch); LMD needs a teacher. Deviations: the same ``'rms'`` norm as ``scm``; the optional
learned weighting ``w_phi(t, s)`` (``adaptive_weight``) is off by default; (t, s) pairs come
from ``time_sampler`` with ``s = t`` for a fraction ``equal_ratio`` (flow-matching limit).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from fmdistill import objectives
from fmdistill.objectives import _common, _tangent


def emd_defaults():
  cfg = _common.base_config(time_sampler="uniform")
  cfg.velocity = "teacher"      # or 'conditional' (training from scratch)
  cfg.equal_ratio = 0.1
  cfg.tangent_warmup = 1000
  cfg.tangent_norm = "rms"
  cfg.tangent_c = 0.1
  cfg.adaptive_weight = False
  cfg.weight_freqs = 16
  cfg.time_fd = 0.0
  return cfg


def lmd_defaults():
  return emd_defaults()


def init_weighting(key, ctx):
  """Params of the optional learned weighting ``w_phi(t, s)`` (the ``weighting`` part)."""
  return _tangent.init_weighting(key, 2, ctx.config.objective.weight_freqs)


WEIGHTING = objectives.Part(init=init_weighting, enabled=lambda cfg: cfg.adaptive_weight)


def emd_tangent(net, params, x_t, t, s, v, cond=None, *, r: float = 1.0,
                time_fd: float = 0.0):
  """Raw AYF-EMD tangent ``df/dt = v - F + r (s - t) dF/dt (B, ...)`` along ``dx_t/dt = v``."""
  return _emd(net, params, None, x_t, t, s, v, cond, r=r, fused=True, time_fd=time_fd)[2]


def lmd_residual(net, params, teacher, x_t, t, s, cond=None, *, r: float = 1.0):
  """Raw AYF-LMD residual ``d_s f - v(f, s) (B, ...)`` with ``v`` the teacher velocity."""
  return _lmd(net, params, None, teacher, x_t, t, s, cond, r=r, fused=True)[2]


def _emd(net, params, ema_params, x_t, t, s, v, cond, *, r, fused, time_fd):
  fn = lambda p, x, t_: net(p, x, t_, s, cond)
  F, F_m, dF = _tangent.eulerian(fn, params, ema_params, x_t, t, v, fused=fused,
                                 time_fd=time_fd)
  return F, F_m, _tangent.eulerian_direction(F_m, dF, v, t, s, r)


def _lmd(net, params, ema_params, teacher, x_t, t, s, cond, *, r, fused):
  fn = lambda p, s_: net(p, x_t, t, s_, cond)
  F, F_m, dFs = _tangent.lagrangian(fn, params, ema_params, s, fused=fused)
  f_m = _tangent.displacement(x_t, F_m, t, s)
  v_end = jax.lax.stop_gradient(teacher(f_m, s, s, cond))
  return F, F_m, _tangent.lagrangian_residual(F_m, dFs, v_end, t, s, r)


def _finish(F, target, g, weighting, t, s, cfg):
  err = _common.mean_sq(F.astype(jnp.float32) - target)
  per = err
  if cfg.adaptive_weight:
    if weighting is None:
      raise ValueError("adaptive_weight=True needs weighting= (the 'weighting' part; "
                       "ayf.init_weighting)")
    per = _tangent.learned_weighting(err, _tangent.log_weight(weighting, [t, s]))
  loss = jnp.mean(per)
  return loss, {"loss": loss, "residual": jnp.mean(err),
                "tangent_rms": jnp.mean(jnp.sqrt(_common.mean_sq(g)))}


def ayf_emd_loss(params, batch, key, *, net, teacher=None, ema_params=None, step=0, cfg=None,
                 weighting=None):
  """AYF-EMD (module docstring). ``batch['x'] (B, ...)``."""
  cfg = cfg or emd_defaults()
  _common.require(cfg, param="displacement", method="AYF")
  t, s, x_t, v_cond, cond = _common.noised_pairs(batch, key, cfg)
  v = _common.target_velocity(cfg, teacher, x_t, t, v_cond, cond)
  r = _tangent.warmup(step, cfg.tangent_warmup)
  F, F_m, g = _emd(net, params, ema_params, x_t, t, s, v, cond, r=r,
                   fused=not cfg.target_ema, time_fd=cfg.time_fd)
  target = F_m.astype(jnp.float32) + _tangent.normalize(g, cfg.tangent_c, cfg.tangent_norm)
  return _finish(F, jax.lax.stop_gradient(target), g, weighting, t, s, cfg)


def ayf_lmd_loss(params, batch, key, *, net, teacher=None, ema_params=None, step=0, cfg=None,
                 weighting=None):
  """AYF-LMD (module docstring). ``batch['x'] (B, ...)``; needs ``teacher``."""
  cfg = cfg or lmd_defaults()
  _common.require(cfg, param="displacement", method="AYF")
  if teacher is None:
    raise ValueError("ayf_lmd distils a teacher velocity: pass teacher (set teacher.workdir)")
  t, s, x_t, _, cond = _common.noised_pairs(batch, key, cfg)
  r = _tangent.warmup(step, cfg.tangent_warmup)
  F, F_m, g = _lmd(net, params, ema_params, teacher, x_t, t, s, cond, r=r,
                   fused=not cfg.target_ema)
  target = F_m.astype(jnp.float32) - _tangent.normalize(g, cfg.tangent_c, cfg.tangent_norm)
  return _finish(F, jax.lax.stop_gradient(target), g, weighting, t, s, cfg)


objectives.register(objectives.Objective(
    name="ayf_emd", loss=ayf_emd_loss, defaults=emd_defaults, needs_teacher=True,
    parts={"weighting": WEIGHTING}, tangent=True,
    doc="Align Your Flow, Eulerian map distillation (jvp in x_t, t)"))
objectives.register(objectives.Objective(
    name="ayf_lmd", loss=ayf_lmd_loss, defaults=lmd_defaults, needs_teacher=True,
    parts={"weighting": WEIGHTING}, tangent=True,
    doc="Align Your Flow, Lagrangian map distillation (jvp in s)"))
