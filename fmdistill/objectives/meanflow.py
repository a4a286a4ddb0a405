"""MeanFlow (Geng et al. 2025, "Mean Flows for One-step Generative Modeling"; seed ``001_*``
"MeanFlow").

Linear path, displacement flow map ``f(x_t, t, s) = x_t + (s - t) u_theta(x_t, t, s)`` with
``u`` the average velocity over ``[s, t]`` (the paper's ``r`` is our ``s``). Differentiating
``(t - s) u = int_s^t v`` in ``t`` gives the MeanFlow identity and the regression target

    u_tgt = v - (t - s) (v d_x u^- + d_t u^-),     L = E[ w || u_theta - sg(u_tgt) ||^2 ],

where ``(u, du/dt) = jax.jvp(u_theta, (x_t, t, s), (v, 1, 0))`` is ONE call of the student: the
loss is differentiated through its primal output only, the tangent is under
``stop_gradient`` (so no second-order terms). ``v`` is the conditional velocity
``eps - x_0`` (``meanflow``, training from scratch) or a frozen teacher's
(``meanflow_distill``). ``w = sg(1 / (||Delta||^2 + c)^p)`` is the adaptive L2 weight (the
paper's "adaptive loss weighting"; ``p = 1``, ``c`` and the reduction below). A fraction ``equal_ratio`` of pairs has
``s = t`` (the paper's best is 25% with ``r != t``, i.e. ``equal_ratio = 0.75``); ``(t, s)`` are
logit-normal(-0.4, 1).

Classifier-free guidance is folded into the target velocity (the paper's guidance section,
with the ``kappa`` mixing of its appendix): ``v~ = omega v + kappa u^-(x_t, t, t | c)
+ (1 - omega - kappa) u^-(x_t, t, t | null)`` for labelled examples (``v`` for dropped labels),
applied for ``t`` in the guidance window ``[guidance_t_min, guidance_t_max]`` (the official
code's ``(t_start, t_end)``; ``omega = 1, kappa = 0`` outside it, so the target there is the
unguided ``v``).

The official JAX code (Gsunshine/meanflow, ``meanflow.py`` and ``configs/default.py``) and the
defaults here differ as follows; ``experiments/imagenet.py`` and ``experiments/cifar10.py`` set
the official values:

* ``||Delta||^2``: the official code *sums* over dimensions with ``c = norm_eps = 0.01``
  (``adaptive_reduce='sum'``, ``adaptive_c=0.01``); the default here is the per-example *mean*
  with ``c = 1e-3`` (``c`` then means the same at every data size). With ``p = 1`` the sum-reduced
  loss with ``c`` equals the mean-reduced loss with ``c / D`` (``_tangent.adaptive_loss``): at
  32x32x4 latents the default's ``c`` is ``1e-3 / (0.01 / 4096) ~ 400x`` larger per dimension.
* guidance: the official default trains with ``omega = 1, kappa = 0.5`` over the window
  ``[0, 1]``; the default here is ``omega = 1, kappa = 0`` (no guidance).
* label dropout: the official code drops the labels of the *first* ``~label_dropout * B`` rows,
  which are ``r = t`` rows (its batch puts the ``r = t`` fraction first); here each example's
  label is dropped independently of ``s = t``. This is kept on purpose (a dropped label then
  also trains the unconditional average velocity, which guided multi-step sampling uses).

``tangent_warmup`` (default 0 = off) scales the ``(t - s) du/dt`` term as sCM's warmup does.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from fmdistill import objectives
from fmdistill.objectives import _common, _tangent
from fmdistill.paths import bcast


def defaults():
  cfg = _common.base_config(time_sampler="logit_normal", time_mean=-0.4, time_std=1.0,
                            label_dropout=0.1)
  cfg.velocity = "conditional"  # or 'teacher'
  cfg.equal_ratio = 0.75        # fraction of pairs with s = t
  cfg.adaptive_p = 1.0
  cfg.adaptive_c = 1e-3
  cfg.adaptive_reduce = "mean"  # 'mean' or 'sum' (the official code) over dimensions
  cfg.guidance = 1.0            # omega (1 = no CFG)
  cfg.guidance_kappa = 0.0
  cfg.guidance_t_min = 0.0      # the guidance window (official t_start, t_end)
  cfg.guidance_t_max = 1.0
  cfg.tangent_warmup = 0
  cfg.time_fd = 0.0
  return cfg


def distill_defaults():
  cfg = defaults()
  cfg.velocity = "teacher"
  cfg.label_dropout = 0.0
  return _common.guidance_fields(cfg)  # guidance_input: the scale as a student input


def _outputs(net, params, ema_params, x_t, t, s, v, cond, *, r, fused, time_fd):
  """``(u_theta, u_tgt)``; ``u_tgt = v - r (t - s) du^-/dt`` under ``stop_gradient``."""
  fn = lambda p, x, t_: net(p, x, t_, s, cond)
  u, _, du = _tangent.eulerian(fn, params, ema_params, x_t, t, v, fused=fused, time_fd=time_fd)
  u_tgt = v.astype(jnp.float32) - r * bcast(t - s, du) * du.astype(jnp.float32)
  return u, jax.lax.stop_gradient(u_tgt)


def target(net, params, x_t, t, s, v, cond=None, *, r: float = 1.0, time_fd: float = 0.0):
  """MeanFlow's target ``u_tgt = v - (t - s)(v d_x u + d_t u)`` of shape ``x_t.shape``."""
  return _outputs(net, params, None, x_t, t, s, v, cond, r=r, fused=True, time_fd=time_fd)[1]


def guidance_scales(t, cfg) -> tuple:
  """Per-example ``(omega, kappa)``, each ``(B,)``: the config's inside the guidance window
  ``[guidance_t_min, guidance_t_max]``, ``(1, 0)`` (unguided) outside it."""
  inside = (t >= cfg.get("guidance_t_min", 0.0)) & (t <= cfg.get("guidance_t_max", 1.0))
  return (jnp.where(inside, cfg.guidance, 1.0).astype(jnp.float32),
          jnp.where(inside, cfg.guidance_kappa, 0.0).astype(jnp.float32))


def guided_velocity(net, params, x_t, t, v, cond, cfg):
  """CFG folded into the target velocity (module docstring); ``v`` where labels are null and
  outside the guidance window."""
  if cond is None or (cfg.guidance == 1.0 and cfg.guidance_kappa == 0.0):
    return v
  params = jax.lax.stop_gradient(params)
  null = jnp.full_like(cond, cfg.num_classes)
  u_c = net(params, x_t, t, t, cond)
  u_n = net(params, x_t, t, t, null)
  w, k = (bcast(a, v) for a in guidance_scales(t, cfg))
  vg = w * v + k * u_c + (1.0 - w - k) * u_n
  return jax.lax.stop_gradient(jnp.where(bcast(cond == cfg.num_classes, v), v, vg))


def meanflow_loss(params, batch, key, *, net, teacher=None, ema_params=None, step=0, cfg=None):
  """MeanFlow (module docstring). ``batch['x'] (B, ...)``. Metrics: loss, raw MSE."""
  cfg = cfg or defaults()
  _common.require(cfg, param="displacement", method="MeanFlow")
  t, s, x_t, v_cond, cond = _common.noised_pairs(batch, key, cfg)
  v = _common.target_velocity(cfg, teacher, x_t, t, v_cond, cond)
  if cfg.velocity == "conditional":
    v = guided_velocity(net, params, x_t, t, v, cond, cfg)
  r = _tangent.warmup(step, cfg.tangent_warmup)
  u, u_tgt = _outputs(net, params, ema_params, x_t, t, s, v, cond, r=r,
                      fused=not cfg.target_ema, time_fd=cfg.time_fd)
  diff = u.astype(jnp.float32) - u_tgt
  loss, _ = _tangent.adaptive_loss(diff, cfg.adaptive_c, cfg.adaptive_p,
                                   cfg.get("adaptive_reduce", "mean"))
  return loss, {"loss": loss, "mse": jnp.mean(_common.mean_sq(diff))}


objectives.register(objectives.Objective(
    name="meanflow", loss=meanflow_loss, defaults=defaults, tangent=True,
    check=lambda c: _tangent.check_adaptive(c.objective),
    doc="MeanFlow from scratch: average-velocity target from one jax.jvp of the student"))
objectives.register(objectives.Objective(
    name="meanflow_distill", loss=meanflow_loss, defaults=distill_defaults, needs_teacher=True,
    tangent=True, check=lambda c: _tangent.check_adaptive(c.objective),
    doc="MeanFlow with the frozen teacher's velocity in the target (Eulerian distillation)"))
