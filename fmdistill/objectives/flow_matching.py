"""Flow matching: the teacher objective (conditional FM, Lipman et al. 2023; seed ``001_*``).

    L(theta) = E_{x_0, eps, t} || v_theta(x_t, t) - (alpha'(t) x_0 + sigma'(t) eps) ||^2

with ``x_t = alpha(t) x_0 + sigma(t) eps`` and ``v_theta = df_theta(x, t, s)/ds |_{s=t}`` (for the
displacement parameterisation ``v_theta = F_theta(x, t, t)``). Labels are dropped to the null
label with probability ``label_dropout`` so the model supports classifier-free guidance.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from fmdistill import objectives
from fmdistill.objectives import _common


def defaults():
  return _common.base_config(label_dropout=0.1)


def flow_matching_loss(params, batch, key, *, net, teacher=None, ema_params=None, step=0,
                       cfg=None):
  """Conditional flow-matching loss (see module docstring). ``batch['x']`` is ``(B, ...)``."""
  del teacher, ema_params, step
  cfg = cfg or defaults()
  path, param = _common.path_of(cfg), _common.param_of(cfg)
  x0 = batch["x"]
  kt, kn, kd = jax.random.split(key, 3)
  t = _common.sample_t(kt, x0.shape[0], cfg, path)
  xt, _, v_target = _common.noisy(kn, x0, t, path)
  cond = _common.drop_labels(kd, batch.get("cond"), cfg)
  v = param.velocity(net, params, xt, t, cond)
  per_example = _common.mean_sq(v - v_target)
  loss = jnp.mean(per_example)
  return loss, {"loss": loss}


objectives.register(objectives.Objective(
    name="flow_matching", loss=flow_matching_loss, defaults=defaults, sampler="ode",
    doc="conditional flow matching (the teacher)"))
