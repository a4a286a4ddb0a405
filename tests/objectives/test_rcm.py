"""rCM = sCM + lambda DMD, against the exact Gaussian map on TrigFlow."""
import jax
import jax.numpy as jnp

from fmdistill import objectives
from tests.objectives import tangent_oracle as o

SD = 0.8


def _setup():
  from fmdistill import paths
  trig = paths.trigflow(SD)
  cfg = objectives.default_config("rcm")
  cfg.sigma_d = SD
  net = o.plug(o.trigflow_cm_F(o.G, SD))
  params = (o.exact_params(), o.joint_parts("rcm", cfg))
  teacher = lambda x, t, s=None, cond=None: o.G.velocity(trig, x, t)
  critic = lambda x, t, cond=None: o.G.velocity(trig, x, t)  # student distribution = data
  batch = {"x": o.G.sample(jax.random.key(1), 512)}
  return cfg, net, params, teacher, critic, batch


def _grad(cfg, net, params, teacher, critic, batch, step):
  loss = objectives.get("rcm")
  return o.jit(jax.value_and_grad(lambda q: loss(q[0], batch, jax.random.key(2), net=net,
                                                 teacher=teacher, critic=critic, step=step,
                                                 cfg=cfg, **q[1])[0]))(params)[1][0]


def test_gradient_vanishes_at_the_exact_map_with_the_dmd_term_on():
  cfg, net, params, teacher, critic, batch = _setup()
  cfg.dmd_weight = 1.0
  g = _grad(cfg, net, params, teacher, critic, batch, 10 ** 7)
  assert abs(float(g["a"])) < 1e-5 and float(jnp.max(jnp.abs(g["b"]))) < 1e-5, g


def test_dmd_term_is_off_before_dmd_start_and_weighted_after():
  cfg, net, params, teacher, _, batch = _setup()
  wrong = lambda x, t, cond=None: o.G_OTHER.velocity(o.LINEAR, x, t)  # a fake score != real
  cfg.dmd_start = 100
  cfg.tangent_warmup = 1
  scm_only = objectives.get("scm_cd")
  scfg = objectives.default_config("scm_cd")
  scfg.update({k: cfg[k] for k in scfg.keys()})
  k_scm = jax.random.split(jax.random.key(2))[0]
  want = jax.grad(lambda q: scm_only(q[0], batch, k_scm, net=net, teacher=teacher, step=10,
                                     cfg=scfg, **q[1])[0])(params)[0]
  before = _grad(cfg, net, params, teacher, wrong, batch, 10)
  after = _grad(cfg, net, params, teacher, wrong, batch, 200)
  assert abs(float(before["a"] - want["a"])) < 1e-6
  assert float(jnp.max(jnp.abs(after["b"] - want["b"]))) > 1e-4  # the DMD gradient arrived
