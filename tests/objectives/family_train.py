"""Test helpers for the consistency / CTM / IMM family: a tiny flow-matching teacher trained on
the oracle Gaussian ``o.G``, students that start from its weights (as every distillation
student does, ``teacher.init_student``), and the figures the convergence tests judge.

The teacher (width-64, depth-2 MLP, 400 Adam steps of flow matching) is trained once per
process (``functools.cache``). Students train with the exact Gaussian velocity as their teacher
and, where the method's ``target_ema`` names one, an EMA target ``theta^-`` kept here exactly as
the train loop keeps it (updated after every step).
"""
import functools

import jax
import jax.numpy as jnp
import optax

import tangent_oracle as o
from fmdistill import flowmap, models, objectives, paths, sampling
from fmdistill.config import base

STEPS = 400
N_EVAL = 2000


def _net():
  mcfg = base("flow_matching").model
  mcfg.width, mcfg.depth = 64, 2
  return models.build(mcfg, (2,), 0, jax.random.key(0))


def _fit(name, cfg, params, net, teacher, steps, lr, ema_decay, seed):
  loss_fn = objectives.get(name)
  opt = optax.adam(optax.cosine_decay_schedule(lr, steps, 0.05))
  state = opt.init(params)

  @o.jit
  def step(params, ema, state, i):
    b = {"x": o.G.sample(jax.random.fold_in(jax.random.key(seed), i), 256)}
    key = jax.random.fold_in(jax.random.key(seed + 1), i)
    g = jax.grad(lambda p: loss_fn(p, b, key, net=net, teacher=teacher, ema_params=ema,
                                   step=i, cfg=cfg)[0])(params)
    upd, state = opt.update(g, state, params)
    params = optax.apply_updates(params, upd)
    if ema_decay is not None:
      ema = optax.incremental_update(params, ema, 1.0 - ema_decay)
    else:
      ema = params
    return params, ema, state

  ema = params
  for i in range(steps):
    params, ema, state = step(params, ema, state, i)
  return params


@functools.cache
def teacher_params():
  """``(net, params)`` of the tiny flow-matching teacher of ``o.G`` (trained once)."""
  net, params = _net()
  cfg = objectives.default_config("flow_matching")
  return net, _fit("flow_matching", cfg, params, net, None, STEPS, 3e-3, None, 7)


def exact_teacher(path=o.LINEAR):
  return lambda x, t, s=None, cond=None: o.G.velocity(path, x, t)


def train(name, cfg=None, steps=STEPS, lr=1e-3):
  """A student of ``name`` trained from the tiny teacher's weights; returns ``(net, params,
  cfg)``."""
  cfg = cfg or objectives.default_config(name)
  if "curriculum_steps" in cfg and not cfg.curriculum_steps:
    cfg.curriculum_steps = steps
  net, params = teacher_params()
  decay = float(cfg.target_ema[4:]) if cfg.target_ema.startswith("ema_") else None
  return net, _fit(name, cfg, params, net, exact_teacher(), steps, lr, decay, 11), cfg


def noises(n=N_EVAL):
  return jax.random.normal(jax.random.key(3), (n, 2))


def jump_rmse(net, params, cfg, nfe=1):
  """RMSE against the exact map ``T -> 0`` of ``nfe`` deterministic flow-map jumps (uniform
  grid; for ``nfe = 1`` the one-step map)."""
  param = flowmap.Parameterization(cfg.param, cfg.sigma_d)
  f = lambda x, t, s: param.apply(net, params, x, t, s)
  x = noises()
  out = sampling.sample_flow_map(f, x, sampling.time_grid(nfe))
  n = x.shape[0]
  exact = o.G.flow_map(o.LINEAR, x, jnp.ones((n,)), jnp.zeros((n,)))
  return float(jnp.sqrt(jnp.mean(jnp.sum((out - exact) ** 2, -1))))


def samples(net, params, cfg, nfe, gamma, key=4):
  """``nfe``-step samples with gamma-sampling (``gamma = 1``: consistency multistep)."""
  param = flowmap.Parameterization(cfg.param, cfg.sigma_d)
  f = lambda x, t, s: param.apply(net, params, x, t, s)
  return sampling.sample_flow_map(f, noises(), sampling.time_grid(nfe), path=paths.linear(),
                                  gamma=gamma, key=jax.random.key(key))


def moment_error(x):
  """``max(|mean - mu|, |std - scale|)`` over coordinates, against ``o.G``."""
  return float(jnp.maximum(jnp.max(jnp.abs(x.mean(0) - o.G.mu)),
                           jnp.max(jnp.abs(x.std(0) - o.G.scale))))
