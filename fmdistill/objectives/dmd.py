"""Distribution matching distillation (DMD; Yin et al. 2024, DMD2) with a fake-score critic.

Seed ``004_*`` ("Interpolation distillation": the integrated KL loss
``int_0^1 w_t KL(rho_t^theta || rho_t^data) dt``, DMD / Diff-Instruct), seed ``000_*`` section 4
and seed ``003_*`` (the DMD term of rCM). The student is a few-step generator built from its
flow map, ``x_0^theta = f_theta(z, T, 0)`` with ``z ~ N(0, sigma(T)^2 I)`` (or a rollout of
``N ~ U{1..rollout_steps}`` jumps, gradient through the last jump only). With
``x_t = alpha(t) x_0^theta + sigma(t) eps`` and denoisers ``D`` obtained from velocities
(``Path.denoise``):

    L_G(theta) = 1/2 || x_0^theta - sg(x_0^theta - (D_fake(x_t, t) - D_real(x_t, t)) / w) ||^2,
    w = mean |x_0^theta - D_real(x_t, t)|  (per example, stop-gradient),

whose gradient in ``x_0^theta`` is ``(D_fake - D_real) / w``, proportional to the difference of
the two scores at ``x_t`` (the KL gradient). ``D_real`` comes from the frozen teacher (with its
guidance), ``D_fake`` from the critic, a copy of the teacher trained alternately by flow
matching on the student's current samples:

    L_phi = || v_phi(x_t, t) - (alpha'(t) sg(x_0^theta) + sigma'(t) eps) ||^2.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from fmdistill import objectives, paths
from fmdistill.objectives import _common


def defaults():
  cfg = _common.base_config()
  cfg.rollout_steps = 1     # student samples with N ~ U{1..rollout_steps} flow-map jumps
  cfg.t_min = 0.02          # DMD noise levels t ~ U[t_min, t_max] * T
  cfg.t_max = 0.98
  return cfg


def generate(params, key, shape, cond, *, net, cfg):
  """Student samples ``(B, ...)``: ``N`` uniform jumps from ``T`` to 0, gradient only through
  the last jump (``N`` drawn per call from ``1..rollout_steps``)."""
  path, param = _common.path_of(cfg), _common.param_of(cfg)
  kz, kn = jax.random.split(key)
  b = shape[0]
  z = path.sigma(jnp.float32(path.T)) * jax.random.normal(kz, shape)
  n = jax.random.randint(kn, (), 1, cfg.rollout_steps + 1)
  times = lambda i: jnp.full((b,), path.T * (1.0 - i / n), jnp.float32)
  frozen = jax.lax.stop_gradient(params)
  body = lambda i, x: param.apply(net, frozen, x, times(i), times(i + 1), cond)
  x = jax.lax.stop_gradient(jax.lax.fori_loop(0, n - 1, body, z))
  return param.apply(net, params, x, times(n - 1), jnp.zeros((b,), jnp.float32), cond)


def _noise(key, x0, cfg, path: paths.Path):
  kt, ke = jax.random.split(key)
  t = jax.random.uniform(kt, (x0.shape[0],), minval=cfg.t_min * path.T,
                         maxval=cfg.t_max * path.T)
  eps = jax.random.normal(ke, x0.shape, x0.dtype)
  return t, eps, path.sample(x0, eps, t)


def dmd_loss(params, batch, key, *, net, teacher, critic, ema_params=None, step=0, cfg=None):
  """Generator loss ``L_G`` (module docstring); ``critic(x, t, cond)`` is the frozen fake
  score's velocity, ``teacher(x, t, t, cond)`` the real one."""
  del ema_params, step
  path = _common.path_of(cfg)
  kg, kn = jax.random.split(key)
  cond = batch.get("cond")
  x0 = generate(params, kg, batch["x"].shape, cond, net=net, cfg=cfg)
  t, _, xt = _noise(kn, jax.lax.stop_gradient(x0), cfg, path)
  d_real, _ = path.denoise(xt, teacher(xt, t, t, cond), t)
  d_fake, _ = path.denoise(xt, critic(xt, t, cond), t)
  d_real, d_fake = jax.lax.stop_gradient(d_real), jax.lax.stop_gradient(d_fake)
  flat = lambda a: a.reshape(a.shape[0], -1)
  w = jnp.mean(jnp.abs(flat(jax.lax.stop_gradient(x0) - d_real)), axis=-1) + 1e-6
  w = w.reshape((-1,) + (1,) * (x0.ndim - 1))
  target = jax.lax.stop_gradient(x0 - (d_fake - d_real) / w)
  loss = 0.5 * jnp.mean(_common.mean_sq(x0 - target))
  gap = jnp.mean(_common.mean_sq(d_fake - d_real))
  return loss, {"loss": loss, "score_gap": gap}


def critic_loss(critic_params, student_params, batch, key, *, net, apply, teacher=None,
                parts=None, step=0, cfg=None):
  """Flow matching of the fake score on the student's current samples (``L_phi``);
  ``apply(critic_params, x, t, cond)`` is the critic's velocity (the teacher's architecture)."""
  del teacher, parts, step
  path = _common.path_of(cfg)
  kg, kn = jax.random.split(key)
  cond = batch.get("cond")
  x0 = jax.lax.stop_gradient(generate(student_params, kg, batch["x"].shape, cond, net=net,
                                      cfg=cfg))
  t, eps, xt = _noise(kn, x0, cfg, path)
  v = apply(critic_params, xt, t, cond)
  loss = jnp.mean(_common.mean_sq(v - path.velocity(x0, eps, t)))
  return loss, {"critic_loss": loss}


# the fake score: the teacher's architecture and weights, trained by its own flow-matching loss
# on the student's samples, 5 updates per student step (DMD2's two-time-scale rule)
CRITIC = objectives.Part(init="teacher", network="teacher", loss=critic_loss, updates=5,
                         optimizer=(("lr", 1e-3),))

objectives.register(objectives.Objective(
    name="dmd", loss=dmd_loss, defaults=defaults, needs_teacher=True, parts={"critic": CRITIC},
    doc="distribution matching distillation with a fake-score critic"))
