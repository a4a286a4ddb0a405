"""sCM: continuous-time consistency models on TrigFlow (Lu & Song 2024, "Simplifying,
Stabilizing and Scaling Continuous-Time Consistency Models"; seed ``001_*`` "Continuous CM",
seeds ``000_*`` / ``003_*`` "rCM" for the sCM term and its stabilisers).

TrigFlow: ``x_t = cos(t) x_0 + sin(t) sigma_d eps``, ``t in (0, pi/2)``; the consistency function
is the flow map to ``s = 0`` in the ``trigflow`` parameterisation,

    f_theta(x_t, t) = cos(t) x_t - sin(t) sigma_d F_theta(x_t / sigma_d, t),

and the continuous-time CM gradient ``grad E[w f_theta^T df^-/dt]`` (seed ``001_*``) is obtained
from the surrogate (sCM paper, Sec. 4, adaptive-weighting objective)

    L(theta, phi) = E[ e^{w_phi(t)} / D || F_theta - F^- - g ||^2 - w_phi(t) ],
    g = -cos^2(t) (sigma_d F^- - dx_t/dt) - r cos(t) sin(t) (x_t + sigma_d dF^-/dt),

where ``g = cos(t) df^-/dt`` (at ``r = 1``), ``F^- = F_{theta^-}(x_t / sigma_d, t)``,
``dF^-/dt`` is the tangent of ``F^-`` along the PF-ODE from ``jax.jvp`` (tangents scaled by
``cos(t) sin(t)`` as in the paper), ``r`` the tangent warmup (0 -> 1 over
``tangent_warmup`` steps), and ``g`` is normalised to ``g / (||g|| + c)``. Only the gradient of
``L`` is meaningful: its value is not a distance. ``dx_t/dt`` is the conditional velocity
``-sin(t) x_0 + cos(t) sigma_d eps`` for consistency training (``scm_ct``) or the frozen
teacher's (optionally guided) velocity for consistency distillation (``scm_cd``).
``time_fd = 1e-4`` switches on rCM's semi-continuous time derivative.

Deviations: ``tangent_norm='rms'`` (default) divides ``||g||`` by ``sqrt(D)``, so ``c = 0.1`` is
size independent (``'l2'`` is the paper's form); ``w_phi`` is one linear layer over fixed
Fourier features of ``t`` (the paper uses the network's own time embedding); ``sigma_d``
defaults to 1 (the paper's image setting is 0.5, for which its ``P_mean = -1.0``,
``P_std = 1.4`` were tuned); ``t`` is clipped to ``[t_min, pi/2 - t_min]``, ``t_min = 1e-3``; the
tangent warmup is 1000 steps (the paper's 10k is for ImageNet-scale runs).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from fmdistill import objectives
from fmdistill.objectives import _common, _tangent


def ct_defaults():
  cfg = _common.base_config(path="trigflow", param="trigflow", sigma_d=1.0, time_sampler="scm",
                            time_mean=-1.0, time_std=1.4)
  cfg.velocity = "conditional"  # 'conditional' (CT) or 'teacher' (CD)
  cfg.tangent_warmup = 1000     # steps for r: 0 -> 1 (the paper uses 10k at ImageNet scale)
  cfg.tangent_norm = "rms"      # 'rms', 'l2' or 'none'
  cfg.tangent_c = 0.1
  cfg.adaptive_weight = True    # learned w_phi(t)
  cfg.weight_freqs = 16
  cfg.time_fd = 0.0             # > 0: rCM's semi-continuous time derivative (1e-4)
  cfg.warmup_form = "scm"       # 'scm': -cos^2 t (...); 'rcm': -cos t sqrt(1 - r^2 sin^2 t) (...)
  cfg.t_min = 1e-3              # keep t inside (0, pi/2) (teacher conversion is singular at ends)
  return _common.guidance_fields(cfg)


def cd_defaults():
  cfg = ct_defaults()
  cfg.velocity = "teacher"
  return cfg


def init_weighting(key, ctx):
  """Params of the learned weighting ``w_phi(t)`` (the ``weighting`` part)."""
  return _tangent.init_weighting(key, 1, ctx.config.objective.weight_freqs)


# sCM's w_phi: a part trained jointly with the student by the same loss (its gradient in phi)
WEIGHTING = objectives.Part(init=init_weighting, enabled=lambda cfg: cfg.adaptive_weight)


def _outputs(net, params, ema_params, x_t, t, v, cond, *, sigma_d, r, fused, time_fd,
             warmup_form="scm"):
  """``(F_theta, F^-, g)`` with the raw (un-normalised) sCM tangent ``g = cos(t) df^-/dt`` (at
  ``r = 1``; ``warmup_form`` chooses how the first term is weighted while ``r < 1``)."""
  zero = jnp.zeros_like(t)
  fn = lambda p, x, t_: net(p, x / sigma_d, t_, zero, cond)
  cs = jnp.cos(t) * jnp.sin(t)
  F, F_m, dF = _tangent.eulerian(fn, params, ema_params, x_t, t, v * _b(cs, x_t), t_dot=cs,
                                 fused=fused, time_fd=time_fd)  # dF = cos sin dF^-/dt
  f32 = jnp.float32
  if warmup_form == "scm":
    c2 = jnp.cos(t) ** 2
  elif warmup_form == "rcm":
    c2 = jnp.cos(t) * jnp.sqrt(jnp.maximum(1.0 - (r * jnp.sin(t)) ** 2, 0.0))
  else:
    raise ValueError(f"warmup_form must be 'scm' or 'rcm', got {warmup_form!r}")
  g = (-_b(c2, x_t) * (sigma_d * F_m.astype(f32) - v.astype(f32))
       - r * _b(cs, x_t) * x_t.astype(f32) - r * sigma_d * dF.astype(f32))
  return F, F_m, g


def _b(a, x):
  return a.reshape(a.shape + (1,) * (x.ndim - 1)).astype(jnp.float32)


def tangent(net, params, x_t, t, v, cond=None, *, sigma_d: float = 1.0, r: float = 1.0,
            time_fd: float = 0.0):
  """The raw sCM tangent ``g = cos(t) df_theta/dt (B, ...)`` along ``dx_t/dt = v`` (before
  normalisation): ``-cos^2 t (sigma_d F - v) - r cos t sin t (x_t + sigma_d dF/dt)``."""
  return _outputs(net, params, None, x_t, t, v, cond, sigma_d=sigma_d, r=r, fused=True,
                  time_fd=time_fd)[2]


def scm_loss(params, batch, key, *, net, teacher=None, ema_params=None, step=0, cfg=None,
             weighting=None):
  """sCM (module docstring). ``batch['x'] (B, ...)``; ``weighting`` holds ``w_phi``'s params
  when ``adaptive_weight`` (the ``weighting`` part, trained jointly by this loss). Metrics:
  loss, mean squared residual, tangent RMS, warmup ``r``."""
  cfg = cfg or ct_defaults()
  _common.require(cfg, param="trigflow", path="trigflow", method="sCM")
  path = _common.path_of(cfg)
  x0 = batch["x"]
  kt, kn, kd = jax.random.split(key, 3)
  t = jnp.clip(_common.sample_t(kt, x0.shape[0], cfg, path), cfg.t_min, path.T - cfg.t_min)
  x_t, _, v_cond = _common.noisy(kn, x0, t, path)
  cond = _common.drop_labels(kd, batch.get("cond"), cfg)
  v = _common.target_velocity(cfg, teacher, x_t, t, v_cond, cond)
  r = _tangent.warmup(step, cfg.tangent_warmup)
  F, F_m, g = _outputs(net, params, ema_params, x_t, t, v, cond, sigma_d=cfg.sigma_d, r=r,
                       fused=not cfg.target_ema, time_fd=cfg.time_fd,
                       warmup_form=cfg.get("warmup_form", "scm"))
  g_n = _tangent.normalize(g, cfg.tangent_c, cfg.tangent_norm)
  err = _common.mean_sq(F.astype(jnp.float32) - F_m.astype(jnp.float32) - g_n)
  per = err
  if cfg.adaptive_weight:
    if weighting is None:
      raise ValueError("adaptive_weight=True needs weighting= (w_phi's params, the 'weighting' "
                       "part; scm.init_weighting); the train loop passes it")
    per = _tangent.learned_weighting(err, _tangent.log_weight(weighting, [t]))
  loss = jnp.mean(per)
  return loss, {"loss": loss, "residual": jnp.mean(err),
                "tangent_rms": jnp.mean(jnp.sqrt(_common.mean_sq(g))), "warmup_r": r}


objectives.register(objectives.Objective(
    name="scm_ct", loss=scm_loss, defaults=ct_defaults, parts={"weighting": WEIGHTING},
    tangent=True, consistency=True,
    doc="sCM consistency training on TrigFlow (jvp tangent, normalisation, warmup, w_phi)"))
objectives.register(objectives.Objective(
    name="scm_cd", loss=scm_loss, defaults=cd_defaults, needs_teacher=True,
    parts={"weighting": WEIGHTING}, tangent=True, consistency=True,
    doc="sCM consistency distillation on TrigFlow from a frozen (guided) teacher velocity"))
