"""CTM: Consistency Trajectory Models (Kim et al. 2024, "Consistency Trajectory Models: Learning
Probability Flow ODE Trajectory of Diffusion", ICLR; seed ``001_*`` "Continuous CM" paragraph on
CTM and gamma-sampling, seed ``004_*`` "global forward loss" / tri-consistency table).

An anywhere-to-anywhere flow map ``f_theta(x_t, t, s)`` (displacement form on the linear path,
so the student starts from the flow-matching teacher as ``f = x + (s - t) v``) is trained by the
soft-consistency loss: for ``s <= u < t`` on the grid,

    x_est = f_{theta^-}( f_theta(x_t, t, s), s, 0 )
    x_tgt = f_{theta^-}( f_{sg(theta)}( Solver_{t -> u}(x_t), u, s ), s, 0 )
    L_CTM = E[ d(x_est, sg x_tgt) ]

i.e. jumping ``t -> s`` directly must agree with a short teacher solve ``t -> u`` followed by the
student's own jump ``u -> s``, both compared after mapping to ``0`` with the target network
``theta^-`` (an EMA, ``mu = 0.999``; the gradient flows through ``f_theta`` *and* through the
outer map's input, not its weights). ``compare='s'`` compares at ``s`` instead (the seed's
``f_theta(x_t, t, s) ≈ f(Solver_{t->u}(x_t), u, s)``). Plus the denoising term at ``s = t``
(CTM's DSM), here the flow-matching loss on the network's diagonal,

    L_DSM = E[ ||F_theta(x_t, t, t) - v||^2 ],   L = L_CTM + dsm_weight L_DSM,

with ``v`` the conditional velocity ``eps - x_0`` (``dsm_target='data'``, the paper's DSM up
to the weighting ``t^2``: ``||x_0 - (x_t - t F)||^2 = t^2 ||F - v||^2``) or the teacher's
(``'teacher'``).

Times (CTM's official code for CIFAR-10): the EDM grid of ``N = 18`` Karras times
``sigma_0 = 80 > ... > sigma_17 = 0.002`` (``rho = 7``, mapped to ``t = sigma / (1 + sigma)``,
see ``consistency``); one number of solver steps ``k`` per batch with ``p(k) ∝ k``; per
example ``t = sigma_i``, ``i ~ U{0..N-1-k}``, ``u = sigma_{i+k}``, ``s = sigma_j``,
``j ~ U{i+k..N-1}``; the solver is Heun (``k`` steps, ``2k`` teacher calls). ``k`` is capped at
``max_solver_steps = 4`` (a short teacher solve); CTM's code draws ``k`` up to ``N - 1 = 17``
(``max_solver_steps=17``), which on the 2-D Gaussian test trained mid-range times rarely (large
``k`` forces ``t`` near ``sigma_max``) and left the ``t = 0.5`` consistency map 0.27 off after
400 steps, against 0.05 with the cap, at up to a quarter of the teacher calls.
Sampling: multistep jumps along the grid (``gamma = 0``, the default of ``eval.gamma`` for this
method) or CTM's gamma-sampling (``--config.eval.gamma``; ``fmdistill.sampling``): ``gamma = 1``
is consistency multistep sampling.

Deviations: no GAN term; a fixed ``dsm_weight`` instead of CTM's adaptive weight
``||grad L_CTM|| / ||grad L_DSM||`` at the last layer; ``d`` is the mean square (LPIPS, CTM's
image metric, is not offered; ``metric='pseudo_huber'`` is); the DSM weighting is flow
matching's (uniform ``t``) rather than EDM's; ``compare='zero'`` maps both sides to ``s = 0``
(CTM's code maps them to ``sigma_min = 0.002``).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from fmdistill import objectives, sampling
from fmdistill.objectives import _common, consistency

sg = jax.lax.stop_gradient


def defaults() -> ml_collections.ConfigDict:
  cfg = _common.base_config(target_ema="ema_0.999")
  cfg.update(dict(
      sigma_min=0.002, sigma_max=80.0, rho=7.0,
      num_scales=18,            # N: grid size (CTM: 18 on CIFAR-10, 40 on ImageNet)
      max_solver_steps=4,       # the largest k (CTM's code: N - 1 = 17)
      solver_step_power=1.0,    # p(k) ∝ k^power (CTM's 'weighted'; 0 = uniform)
      solver="heun",
      compare="zero",           # 'zero' (map both to 0 with theta^-, CTM) or 's'
      metric="l2", huber_c=0.00054,
      dsm_weight=1.0,
      dsm_target="data"))       # 'data' (conditional velocity) or 'teacher'
  return cfg


def grid_time(idx: jax.Array, cfg, path) -> jax.Array:
  """``t`` of grid index ``idx`` (0 = ``sigma_max``, ``N - 1`` = ``sigma_min``)."""
  u = 1.0 - idx.astype(jnp.float32) / (cfg.num_scales - 1)
  return consistency.t_of_sigma(path, consistency.karras(u, cfg.sigma_min, cfg.sigma_max,
                                                          cfg.rho))


def sample_indices(key: jax.Array, n: int, cfg) -> tuple[jax.Array, jax.Array, jax.Array]:
  """``(k, i, j)``: solver steps (scalar, one per batch), ``t``-index ``i (n,)`` and
  ``s``-index ``j (n,)`` with ``0 <= i``, ``i + k <= j <= N - 1``."""
  big_n, kmax = cfg.num_scales, min(cfg.max_solver_steps, cfg.num_scales - 1)
  if kmax < 1:
    raise ValueError(f"CTM needs num_scales >= 2 and max_solver_steps >= 1, got {cfg}")
  kk, ki, kj = jax.random.split(key, 3)
  ks = jnp.arange(1, kmax + 1, dtype=jnp.float32)
  k = 1 + jax.random.categorical(kk, cfg.solver_step_power * jnp.log(ks))
  i = jax.random.randint(ki, (n,), 0, big_n - k)
  j = jax.random.randint(kj, (n,), i + k, big_n)
  return k, i, j


def teacher_solve(teacher, x: jax.Array, i: jax.Array, k: jax.Array, cfg, path,
                  cond=None) -> jax.Array:
  """``k`` solver steps of the teacher ODE along the grid from index ``i`` to ``i + k``
  (``x (B, ...)``, ``i (B,)``, ``k`` a traced scalar), under ``stop_gradient``."""
  v = lambda x_, t_: teacher(x_, t_, t_, cond).astype(x_.dtype)

  def body(m, x_):
    return sampling.ode_step(v, x_, grid_time(i + m, cfg, path), grid_time(i + m + 1, cfg, path),
                             cfg.solver)
  return sg(jax.lax.fori_loop(0, k, body, sg(x)))


def ctm_loss(params, batch, key, *, net, teacher=None, ema_params=None, step=0, cfg=None):
  """CTM (module docstring). ``batch['x'] (B, ...)``; ``teacher(x, t, s, cond)`` the frozen
  teacher (its velocity is ``teacher(x, t, t)``); ``ema_params`` is ``theta^-``. Metrics: loss,
  ctm, dsm, the batch's solver steps ``k``."""
  del step
  cfg = cfg or defaults()
  if teacher is None:
    raise ValueError("CTM distils a teacher: pass teacher= (the train loop binds it)")
  if cfg.compare not in ("zero", "s"):
    raise ValueError(f"compare must be 'zero' or 's', got {cfg.compare!r}")
  path, param = _common.path_of(cfg), _common.param_of(cfg)
  x0 = batch["x"]
  b = x0.shape[0]
  ki, kn, kd, kf, kfn = jax.random.split(key, 5)
  k, i, j = sample_indices(ki, b, cfg)
  t, u, s = grid_time(i, cfg, path), grid_time(i + k, cfg, path), grid_time(j, cfg, path)
  cond = _common.drop_labels(kd, batch.get("cond"), cfg)
  x_t = path.sample(x0, jax.random.normal(kn, x0.shape, x0.dtype), t)
  x_u = teacher_solve(teacher, x_t, i, k, cfg, path, cond)
  theta_minus = sg(params if ema_params is None else ema_params)
  zero = jnp.zeros_like(t)
  est = param.apply(net, params, x_t, t, s, cond)
  tgt = param.apply(net, sg(params), x_u, u, s, cond)
  if cfg.compare == "zero":
    est = param.apply(net, theta_minus, est, s, zero, cond)
    tgt = param.apply(net, theta_minus, tgt, s, zero, cond)
  delta = est.astype(jnp.float32) - sg(tgt).astype(jnp.float32)
  ctm = jnp.mean(consistency.distance(delta, cfg.metric, cfg.huber_c))
  # the denoising (flow-matching) term on the diagonal s = t
  t_f = _common.sample_t(kf, b, cfg, path)
  x_f, _, v_cond = _common.noisy(kfn, x0, t_f, path)
  if cfg.dsm_target == "data":
    v = v_cond
  elif cfg.dsm_target == "teacher":
    v = teacher(x_f, t_f, t_f, cond)
  else:
    raise ValueError(f"dsm_target must be 'data' or 'teacher', got {cfg.dsm_target!r}")
  dsm = jnp.mean(_common.mean_sq(param.velocity(net, params, x_f, t_f, cond).astype(jnp.float32)
                                 - sg(v).astype(jnp.float32)))
  loss = ctm + cfg.dsm_weight * dsm
  return loss, {"loss": loss, "ctm": ctm, "dsm": dsm, "solver_steps": k.astype(jnp.float32)}


objectives.register(objectives.Objective(
    name="ctm", loss=ctm_loss, defaults=defaults, needs_teacher=True,
    doc="consistency trajectory model: soft consistency via a short teacher solve + DSM"))
