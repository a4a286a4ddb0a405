"""Direct distillation on teacher trajectories, against the exact Gaussian flow map."""
import jax
import jax.numpy as jnp
import optax

from fmdistill import flowmap, models, objectives, oracle, paths, sampling
from fmdistill.config import base

G = oracle.Gaussian(jnp.array([1.0, -0.5]), jnp.array([0.4, 0.7]))
P = paths.linear()


def _trajectories(key, n, k):
  """Exact ODE states on the uniform grid, from noise at t = 1."""
  x = jax.random.normal(key, (n, 2))
  grid = sampling.time_grid(k)
  states = [G.flow_map(P, x, jnp.ones(n), jnp.full(n, s)) for s in grid]
  return jnp.stack(states, 1)


def _exact_net(params, x, t, s, cond=None):
  """The displacement F of the exact flow map (defined for s != t)."""
  return (G.flow_map(P, x, t, s) - x) / (s - t)[:, None]


def test_loss_vanishes_at_the_exact_map():
  cfg = objectives.default_config("direct_distill")
  batch = {"traj": _trajectories(jax.random.key(0), 256, cfg.pair_steps)}
  for mode in ("all", "endpoints"):
    cfg.pairs = mode
    loss, _ = objectives.get("direct_distill")(None, batch, jax.random.key(1), net=_exact_net,
                                               teacher=None, ema_params=None, step=0, cfg=cfg)
    assert float(loss) < 1e-10


def test_student_converges_to_the_exact_map():
  cfg = objectives.default_config("direct_distill")
  mcfg = base("direct_distill").model
  mcfg.width, mcfg.depth = 64, 2
  net, params = models.build(mcfg, (2,), 0, jax.random.key(0))
  loss = objectives.get("direct_distill")
  opt = optax.adam(optax.cosine_decay_schedule(3e-3, 500, 0.05))
  state = opt.init(params)

  @jax.jit
  def step(params, state, i):
    b = {"traj": _trajectories(jax.random.fold_in(jax.random.key(1), i), 256, cfg.pair_steps)}
    g = jax.grad(lambda p: loss(p, b, jax.random.fold_in(jax.random.key(2), i), net=net,
                                teacher=None, ema_params=None, step=i, cfg=cfg)[0])(params)
    upd, state = opt.update(g, state, params)
    return optax.apply_updates(params, upd), state

  for i in range(500):
    params, state = step(params, state, i)
  x = jax.random.normal(jax.random.key(3), (2000, 2))
  param = flowmap.Parameterization("displacement")
  one_step = param.apply(net, params, x, jnp.ones(2000), jnp.zeros(2000))
  exact = G.flow_map(P, x, jnp.ones(2000), jnp.zeros(2000))
  err = float(jnp.sqrt(jnp.mean(jnp.sum((one_step - exact) ** 2, -1))))
  assert err < 0.05, err  # data std is ~0.6
