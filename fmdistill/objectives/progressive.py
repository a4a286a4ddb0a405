"""Progressive distillation (Salimans & Ho 2022, "Progressive distillation for fast sampling
of diffusion models", Algorithm 2; seed ``000_*`` section 2; seed ``004_*``: PD uses the
tri-consistency loss).

A stage trains a student that samples in ``N = cfg.student_steps`` steps on the uniform grid
``t_i = i T / N`` so that **one** student step matches **two** steps of the teacher of half the
size, starting from noised data ``z_t = alpha_t x + sigma_t eps`` at a grid time ``t = t_i``,
``i ~ U{1..N}``, ``t' = t - T/(2N)``, ``t'' = t - T/N``:

    z_{t''} = teacher_step(teacher_step(z_t, t, t'), t', t'')            (stop-gradient)

``teacher_step`` is a DDIM step of a velocity teacher (``teacher_solver='ddim'``, the paper's:
``x_hat, eps_hat`` from the teacher's velocity, ``z_s = alpha_s x_hat + sigma_s eps_hat``;
'euler' is the seed's pseudocode; on the linear path the two coincide), or a jump
``f_prev(z, t, s)`` of a flow-map teacher -- the previous stage, ``flowmap.FlowMapTeacher``.
The student is a flow map ``f_theta(z_t, t, t'')`` (any parameterisation). The loss is the
paper's **x-prediction target** with its **truncated-SNR weighting**: the data estimate that
makes one DDIM step from ``z_t`` land on ``z_{t''}``,

    x~ = (z_{t''} - (sigma_{t''} / sigma_t) z_t) / (alpha_{t''} - (sigma_{t''} / sigma_t) alpha_t),

against the student's own ``x_theta`` (the same formula with ``f_theta``), weighted by
``w = max(alpha_t^2 / sigma_t^2, 1)`` (``weighting='truncated_snr'``; ``'snr_plus_one'`` is the
paper's other choice). Both estimates are affine in the endpoints, so the loss is computed as
``w / c^2 ||f_theta - z_{t''}||^2`` with ``c = alpha_{t''} - (sigma_{t''}/sigma_t) alpha_t``
(on the linear path ``w / c^2 = max((1 - t)^2, t^2) / (t - t'')^2``). ``weighting='none'`` is
the seed's x-space endpoint match ``||f_theta - z_{t''}||^2``.

Stages halve ``N`` (``fmdistill.chains.progressive``: 64 -> 32 -> ... -> 1 on the toys), each
initialised from and taught by the previous one.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from fmdistill import objectives, paths
from fmdistill.objectives import _common

WEIGHTINGS = ("truncated_snr", "snr_plus_one", "none")
TEACHER_SOLVERS = ("ddim", "euler")


def defaults():
  cfg = _common.base_config()
  cfg.student_steps = 1             # N: the student's sampler steps (the teacher takes 2N)
  cfg.teacher_solver = "ddim"       # one step of a velocity teacher: 'ddim' or 'euler'
  cfg.weighting = "truncated_snr"   # 'truncated_snr', 'snr_plus_one' (paper) or 'none' (x-space)
  return cfg


def teacher_step(teacher, x, t, s, cond, path: paths.Path, solver: str):
  """One teacher step ``t -> s`` (``(B,)`` times): a jump of a flow-map teacher, else a DDIM or
  Euler step of its velocity ``teacher(x, t, t, cond)``."""
  if hasattr(teacher, "jump"):
    return teacher.jump(x, t, s, cond)
  v = teacher(x, t, t, cond)
  if solver == "euler":
    return x + paths.bcast(s - t, x) * v
  if solver != "ddim":
    raise ValueError(f"teacher_solver must be one of {TEACHER_SOLVERS}, got {solver!r}")
  x0, eps = path.denoise(x, v, t)
  return path.sample(x0, eps, s)


def weight(path: paths.Path, t, s, kind: str):
  """``(B,)`` weight of ``||f_theta - z_s||^2`` (see the module docstring)."""
  if kind == "none":
    return jnp.ones_like(t)
  a_t, s_t, a_s, s_s = path.alpha(t), path.sigma(t), path.alpha(s), path.sigma(s)
  c = a_s - s_s / s_t * a_t
  snr = (a_t / s_t) ** 2
  if kind == "truncated_snr":
    w = jnp.maximum(snr, 1.0)
  elif kind == "snr_plus_one":
    w = snr + 1.0
  else:
    raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {kind!r}")
  return w / c ** 2


def progressive_loss(params, batch, key, *, net, teacher, ema_params=None, step=0, cfg=None):
  """One progressive-distillation stage. ``batch['x']``: data ``(B, ...)``; ``teacher``: a
  velocity ``teacher(x, t, s, cond)`` or a ``flowmap.FlowMapTeacher``."""
  del ema_params, step
  cfg = cfg or defaults()
  if teacher is None:
    raise ValueError("progressive distillation needs a teacher (teacher.workdir or the "
                     "previous stage)")
  if cfg.student_steps < 1:
    raise ValueError(f"student_steps must be >= 1, got {cfg.student_steps}")
  path, param = _common.path_of(cfg), _common.param_of(cfg)
  x0, cond = batch["x"], batch.get("cond")
  b, n = x0.shape[0], cfg.student_steps
  ki, kn = jax.random.split(key)
  i = jax.random.randint(ki, (b,), 1, n + 1)
  h = path.T / n
  t = i.astype(jnp.float32) * h
  mid, s = t - 0.5 * h, jnp.maximum(t - h, 0.0)
  eps = jax.random.normal(kn, x0.shape, x0.dtype)
  z_t = path.sample(x0, eps, t)
  z_mid = teacher_step(teacher, z_t, t, mid, cond, path, cfg.teacher_solver)
  target = jax.lax.stop_gradient(teacher_step(teacher, z_mid, mid, s, cond, path,
                                              cfg.teacher_solver))
  pred = param.apply(net, params, z_t, t, s, cond)
  err = _common.mean_sq(pred - target)
  w = weight(path, t, s, cfg.weighting)
  loss = jnp.mean(w * err)
  return loss, {"loss": loss, "x_mse": jnp.mean(err)}


def check(config) -> None:
  """Config checks (run by ``config.validate``)."""
  o = config.objective
  _common.check_fields(config, [
      ("student_steps", o.student_steps >= 1, "a positive integer"),
      ("teacher_solver", o.teacher_solver in TEACHER_SOLVERS, list(TEACHER_SOLVERS)),
      ("weighting", o.weighting in WEIGHTINGS, list(WEIGHTINGS))])


objectives.register(objectives.Objective(
    name="progressive", loss=progressive_loss, defaults=defaults, needs_teacher=True,
    check=check,
    teacher_kinds=("velocity", "flowmap"),
    doc="progressive distillation stage: one student step = two teacher steps"))
