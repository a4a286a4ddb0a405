"""Flow matching against the Gaussian-mixture oracle."""
import jax
import jax.numpy as jnp
import numpy as np
import optax

from fmdistill import models, objectives, oracle, paths
from fmdistill.config import base

GM = oracle.GaussianMixture(jnp.array([0.5, 0.3, 0.2]),
                            jnp.array([[-1.5, -0.5], [1.5, 0.5], [0.0, 1.8]]),
                            jnp.array([0.3, 0.4, 0.25]))


def _batch(n, seed=0):
  return {"x": GM.sample(jax.random.key(seed), n)}


def test_gradient_vanishes_at_the_exact_velocity():
  """F = a * v* + b: at (a, b) = (1, 0) the expected FM gradient is zero (E[u | x_t] = v*)."""
  path = paths.linear()
  net = lambda p, x, t, s, cond=None: p["a"] * GM.velocity(path, x, t) + p["b"]
  cfg = objectives.default_config("flow_matching")
  loss = objectives.get("flow_matching")
  grad = lambda p: jax.grad(lambda q: loss(q, _batch(400_000), jax.random.key(1), net=net,
                                           teacher=None, ema_params=None, step=0, cfg=cfg)[0])(p)
  g_exact = grad({"a": jnp.float32(1.0), "b": jnp.zeros(2)})
  g_off = grad({"a": jnp.float32(1.3), "b": jnp.zeros(2)})
  assert abs(float(g_exact["a"])) < 0.02 * abs(float(g_off["a"]))
  assert float(jnp.max(jnp.abs(g_exact["b"]))) < 0.01


def test_loss_at_exact_velocity_is_the_conditional_variance_floor():
  """The FM loss is minimised by v*; any perturbation raises it (same batch and key)."""
  path = paths.linear()
  cfg = objectives.default_config("flow_matching")
  loss = objectives.get("flow_matching")
  call = lambda net: float(loss(None, _batch(50_000), jax.random.key(2), net=net, teacher=None,
                                ema_params=None, step=0, cfg=cfg)[0])
  exact = call(lambda p, x, t, s, c=None: GM.velocity(path, x, t))
  worse = call(lambda p, x, t, s, c=None: GM.velocity(path, x, t) * 1.05 + 0.02)
  assert exact < worse


def test_small_mlp_learns_the_mixture_velocity():
  """A small MLP trained for 800 steps gets within 10% relative error of v* on t in [0.1, 0.9]."""
  cfg = base("flow_matching").model
  cfg.width, cfg.depth = 64, 2
  net, params = models.build(cfg, (2,), 0, jax.random.key(0))
  ocfg = objectives.default_config("flow_matching")
  loss = objectives.get("flow_matching")
  opt = optax.adam(optax.cosine_decay_schedule(3e-3, 800, 0.05))
  state = opt.init(params)

  @jax.jit
  def step(params, state, i):
    b = {"x": GM.sample(jax.random.fold_in(jax.random.key(10), i), 512)}
    g = jax.grad(lambda p: loss(p, b, jax.random.fold_in(jax.random.key(11), i), net=net,
                                teacher=None, ema_params=None, step=i, cfg=ocfg)[0])(params)
    upd, state = opt.update(g, state, params)
    return optax.apply_updates(params, upd), state

  for i in range(800):
    params, state = step(params, state, i)
  path = paths.linear()
  k1, k2, k3 = jax.random.split(jax.random.key(99), 3)
  t = jax.random.uniform(k1, (4000,), minval=0.1, maxval=0.9)
  xt = path.sample(GM.sample(k2, 4000), jax.random.normal(k3, (4000, 2)), t)
  v_true = GM.velocity(path, xt, t)
  v_net = net(params, xt, t, t)
  rel = float(jnp.mean(jnp.sum((v_net - v_true) ** 2, -1)) / jnp.mean(jnp.sum(v_true ** 2, -1)))
  assert rel < 0.1, rel


def test_label_dropout_uses_null_label():
  from fmdistill.objectives import _common
  cfg = objectives.default_config("flow_matching")
  cfg.label_dropout, cfg.num_classes = 0.5, 10
  out = _common.drop_labels(jax.random.key(0), jnp.zeros(10_000, jnp.int32), cfg)
  assert set(np.unique(out).tolist()) == {0, 10}
  assert abs(float(jnp.mean(out == 10)) - 0.5) < 0.02
