"""Every tangent-family method trains a small MLP to the exact flow map of a 2-D Gaussian.

A width-64, depth-2 MLP (``model.time_scale = 1``: tangent methods need a smooth time
embedding, see docs/tangent.md), 400 Adam steps of batch 256, the exact Gaussian velocity as
the teacher. Measured: the 1-step map from noise at ``t = T`` to data, against the exact map on
2000 fixed noises (RMSE; the data's own RMS spread is ~0.57, the untrained identity map is
~1.3 off). Tolerances are per method, about 2x what was measured when they were set.
"""
import jax
import jax.numpy as jnp
import optax
import pytest

import tangent_oracle as o
from fmdistill import flowmap, models, objectives, paths
from fmdistill.config import base
from fmdistill.objectives import _common, fmm

STEPS = 400
# measured 1-step RMSE at 400 steps when written (FiLM MLP): scm_ct .08, scm_cd .06, meanflow
# .28, meanflow_distill .14, ayf_emd .08, ayf_lmd .03, facm .09, fmm_forward .03, fmm_backward
# .07, fmm_forward_self .10, fmm_backward_self .10; with the ADN MLP (model.modulation='adn',
# the default since issue 12): scm_ct .19, scm_cd .09, facm .20 (slower from random init here)
TOL = {"scm_ct": 0.35, "scm_cd": 0.15, "meanflow": 0.45, "meanflow_distill": 0.3,
       "ayf_emd": 0.16, "ayf_lmd": 0.1, "facm": 0.4, "fmm_forward": 0.1, "fmm_backward": 0.15,
       "fmm_forward_self": 0.2, "fmm_backward_self": 0.2, "fmm_forward_order2": 0.1}


def train(name, steps=STEPS, lr=3e-3, cfg=None):
  """Train ``name`` on ``o.G``; returns ``(net, params, cfg, path)``."""
  cfg = cfg or objectives.default_config(name)
  if "tangent_warmup" in cfg:
    cfg.tangent_warmup = steps // 4
  path = paths.get_path(cfg.path, cfg.sigma_d)
  mcfg = base(name).model
  mcfg.width, mcfg.depth = 64, 2
  net, params = models.build(mcfg, (2,), 0, jax.random.key(0))
  entry = objectives.entry(name)
  params = (params, o.joint_parts(name, cfg, jax.random.key(1)))  # the weighting trains too
  teacher = lambda x, t, s=None, cond=None: o.G.velocity(path, x, t)
  opt = optax.adam(optax.cosine_decay_schedule(lr, steps, 0.05))
  state = opt.init(params)

  @o.jit
  def step(params, state, i):
    b = {"x": o.G.sample(jax.random.fold_in(jax.random.key(10), i), 256)}
    g = jax.grad(lambda p: entry.loss(p[0], b, jax.random.fold_in(jax.random.key(11), i),
                                      net=net, teacher=teacher, ema_params=None, step=i, cfg=cfg,
                                      **p[1])[0])(params)
    upd, state = opt.update(g, state, params)
    return optax.apply_updates(params, upd), state

  for i in range(steps):
    params, state = step(params, state, i)
  return net, params[0], cfg, path


def one_step_error(f, path):
  """RMSE of ``f(x_T, T, 0)`` against the exact map over 2000 fixed noises."""
  n = 2000
  x = path.sigma(jnp.float32(path.T)) * jax.random.normal(jax.random.key(3), (n, 2))
  T, z = jnp.full((n,), path.T, jnp.float32), jnp.zeros((n,))
  err = f(x, T, z) - o.G.flow_map(path, x, T, z)
  return float(jnp.sqrt(jnp.mean(jnp.sum(err ** 2, -1))))


@pytest.mark.parametrize("name", [n for n in TOL if n != "fmm_forward_order2"])
def test_student_reaches_the_exact_one_step_map(name):
  net, params, cfg, path = train(name)
  param = flowmap.Parameterization(cfg.param, cfg.sigma_d)
  err = one_step_error(lambda x, t, s: param.apply(net, params, x, t, s), path)
  assert err < TOL[name], (name, err)


def test_second_order_student_reaches_the_exact_one_step_map():
  """``f = x + (s - t) v + (s - t)^2 NN`` (seed 004) with the forward loss."""
  cfg = objectives.default_config("fmm_forward")
  cfg.order = 2
  net, params, cfg, path = train("fmm_forward", cfg=cfg)
  teacher = lambda x, t, s=None, cond=None: o.G.velocity(path, x, t)
  G = fmm.displacement_net(net, teacher, 2)
  param = flowmap.Parameterization("displacement")
  err = one_step_error(lambda x, t, s: param.apply(G, params, x, t, s), path)
  assert err < TOL["fmm_forward_order2"], err
