"""ReFlow / k-rectified flow (Liu, Gong & Liu 2023, "Flow straight and fast"; seed ``000_*``
section 1 "ReFlow"; seed ``001_*`` "ReFlow").

A round of ReFlow is flow matching on a *coupling* instead of independent noise and data: the
previous round (the teacher, a velocity model) integrates its ODE from noise ``z`` at ``t = T``
to its endpoint ``x_1 = ODE_teacher(z)`` (the cached teacher pairs, ``batch['traj'][:, 0]`` and
``[:, -1]``), and the student learns the velocity of the path's interpolation between them
(straight on the linear path, the only one on which Liu et al.'s straightening holds):

    L(theta) = E_{(z, x_1), t} || v_theta(x_t, t) - (alpha'(t) x_1 + sigma'(t) eps) ||^2,
    x_t = alpha(t) x_1 + sigma(t) eps,   eps = z / sigma(T)

(on the linear path ``x_t = (1 - t) x_1 + t z`` and the target is ``z - x_1``, the seed's
``target_velocity = z_1 - z_0`` in our time direction). Each round keeps the marginals at both
ends (``x_1`` has the teacher's distribution, ``z`` is the noise) and, on the linear path,
straightens the flow (on ``trigflow``/``vp`` the interpolation is curved and no such bound is
claimed): the
straightness ``S(Z) = int_0^1 E||(Z_1 - Z_0) - dZ_t/dt||^2 dt`` (``fmdistill.eval.straightness``)
of a rectified coupling is no larger than that of the one it came from. Rounds are a stage chain
(``fmdistill.chains.reflow``): teacher -> pairs -> flow matching on the pairs -> next round. The
learned model is a velocity (``sampler='ode'``), sampled by an ODE solver with 1-4 Euler steps.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from fmdistill import errors, objectives
from fmdistill.objectives import _common


def defaults():
  cfg = _common.base_config()
  cfg.pair_steps = 1   # grid points stored per teacher trajectory: ReFlow needs the two ends
  return cfg


def reflow_loss(params, batch, key, *, net, teacher=None, ema_params=None, step=0, cfg=None):
  """Flow matching on teacher pairs. ``batch['traj']``: ``(B, K + 1, ...)`` teacher ODE states
  from noise (index 0, ``t = T``) to the endpoint (index ``K``, ``t = 0``)."""
  del teacher, ema_params, step
  cfg = cfg or defaults()
  path, param = _common.path_of(cfg), _common.param_of(cfg)
  traj = batch["traj"]
  noise, x1 = traj[:, 0], traj[:, -1]
  eps = noise / path.sigma(jnp.float32(path.T))
  kt, kd = jax.random.split(key)
  t = _common.sample_t(kt, x1.shape[0], cfg, path)
  x_t = path.sample(x1, eps, t)
  target = jax.lax.stop_gradient(path.velocity(x1, eps, t))
  cond = _common.drop_labels(kd, batch.get("cond"), cfg)
  v = param.velocity(net, params, x_t, t, cond)
  loss = jnp.mean(_common.mean_sq(v - target))
  return loss, {"loss": loss}


def check(config) -> None:
  """Config checks (run by ``config.validate``)."""
  if config.objective.pair_steps < 1:
    raise errors.invalid("objective.pair_steps", config.objective.pair_steps,
                         "a positive integer (ReFlow uses the two ends)")


objectives.register(objectives.Objective(
    name="reflow", loss=reflow_loss, defaults=defaults, needs_teacher=True, check=check,
    batch="teacher_pairs", sampler="ode",
    doc="ReFlow round: flow matching on (noise, teacher ODE endpoint) pairs"))
