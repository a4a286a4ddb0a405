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
paper's "adaptive loss weighting", p = 1, c = 1e-3). A fraction ``equal_ratio`` of pairs has
``s = t`` (the paper's best is 25% with ``r != t``, i.e. ``equal_ratio = 0.75``); ``(t, s)`` are
logit-normal(-0.4, 1).

Classifier-free guidance is folded into the target velocity (the paper's guidance section,
with the ``kappa`` mixing of its appendix): ``v~ = omega v + kappa u^-(x_t, t, t | c)
+ (1 - omega - kappa) u^-(x_t, t, t | null)`` for labelled examples (``v`` for dropped labels).

Deviation: ``||Delta||^2`` is the per-example *mean* over dimensions (``c`` is then size
independent); ``tangent_warmup`` (default 0 = off) scales the ``(t - s) du/dt`` term as sCM's
warmup does.
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
  cfg.guidance = 1.0            # omega (1 = no CFG)
  cfg.guidance_kappa = 0.0
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


def guided_velocity(net, params, x_t, t, v, cond, cfg):
  """CFG folded into the target velocity (module docstring); ``v`` where labels are null."""
  if cond is None or (cfg.guidance == 1.0 and cfg.guidance_kappa == 0.0):
    return v
  params = jax.lax.stop_gradient(params)
  null = jnp.full_like(cond, cfg.num_classes)
  u_c = net(params, x_t, t, t, cond)
  u_n = net(params, x_t, t, t, null)
  w, k = cfg.guidance, cfg.guidance_kappa
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
  err = _common.mean_sq(u.astype(jnp.float32) - u_tgt)
  loss = jnp.mean(_tangent.adaptive_weight(err, cfg.adaptive_c, cfg.adaptive_p) * err)
  return loss, {"loss": loss, "mse": jnp.mean(err)}


objectives.register(objectives.Objective(
    name="meanflow", loss=meanflow_loss, defaults=defaults, tangent=True,
    doc="MeanFlow from scratch: average-velocity target from one jax.jvp of the student"))
objectives.register(objectives.Objective(
    name="meanflow_distill", loss=meanflow_loss, defaults=distill_defaults, needs_teacher=True,
    tangent=True,
    doc="MeanFlow with the frozen teacher's velocity in the target (Eulerian distillation)"))
