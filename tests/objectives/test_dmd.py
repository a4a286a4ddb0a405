"""DMD against Gaussian oracles: a critic family that contains the exact velocity, exact maps."""
import jax
import jax.numpy as jnp
import numpy as np
import optax

from fmdistill import flowmap, models, objectives, oracle, paths
from fmdistill.config import base

P = paths.linear()
DATA = oracle.Gaussian(jnp.array([1.0, -0.5]), jnp.array([0.4, 0.7]))
CFG = objectives.default_config("dmd")


def gaussian_velocity(params, x, t, cond=None):
  """A critic/teacher family: the exact velocity of N(mu, diag(exp(log_s))^2)."""
  return oracle.Gaussian(params["mu"], jnp.exp(params["log_s"])).velocity(P, x, t)


def exact_student(g: oracle.Gaussian):
  """A displacement net whose 1-step map sends N(0, I) at t = 1 exactly onto ``g``; ``b`` shifts
  the output (a handle to differentiate)."""
  def net(params, x, t, s, cond=None):
    f = g.flow_map(P, x, t, s) + params["b"]
    return (f - x) / (s - t)[:, None]
  return net


def _batch(n=4096):
  return {"x": jnp.zeros((n, 2))}


def test_critic_gradient_vanishes_at_the_students_velocity():
  student_dist = oracle.Gaussian(jnp.array([0.3, 0.2]), jnp.array([0.9, 0.5]))
  net = exact_student(student_dist)
  loss = objectives.entry("dmd").parts["critic"].loss
  grad = lambda cp: jax.grad(lambda p: loss(p, {"b": jnp.zeros(2)}, _batch(200_000),
                                            jax.random.key(0), net=net,
                                            apply=gaussian_velocity, cfg=CFG)[0])(cp)
  exact = {"mu": student_dist.mu, "log_s": jnp.log(student_dist.scale)}
  g = grad(exact)
  g_off = grad({"mu": exact["mu"] + 0.3, "log_s": exact["log_s"]})
  assert float(jnp.max(jnp.abs(g["mu"]))) < 0.03 * float(jnp.max(jnp.abs(g_off["mu"])))
  assert float(jnp.max(jnp.abs(g["log_s"]))) < 0.02


def test_generator_gradient_vanishes_on_the_data_and_points_home_off_it():
  loss = objectives.get("dmd")
  teacher = lambda x, t, s, cond=None: DATA.velocity(P, x, t)
  for delta, expect_zero in ((jnp.zeros(2), True), (jnp.array([0.5, -0.3]), False)):
    student_dist = oracle.Gaussian(DATA.mu + delta, DATA.scale)
    critic = lambda x, t, cond=None, d=student_dist: d.velocity(P, x, t)
    g = jax.grad(lambda p: loss(p, _batch(), jax.random.key(1), net=exact_student(student_dist),
                                teacher=teacher, critic=critic, cfg=CFG)[0])({"b": jnp.zeros(2)})
    if expect_zero:
      assert float(jnp.max(jnp.abs(g["b"]))) < 1e-6
    else:  # descending the gradient moves the student's mean back towards the data's
      assert float(jnp.dot(g["b"], delta)) > 0.0
      assert float(jnp.min(g["b"] * delta)) > 0.0


def test_student_distribution_converges_to_the_data():
  """Alternating updates (the registry's schedule: ``parts['critic'].updates`` fake-score
  steps, then one student step) move a 1-step MLP generator from N(0, I) onto the data Gaussian (mean and
  per-axis std within 0.08)."""
  mcfg = base("dmd").model
  mcfg.width, mcfg.depth = 64, 2
  net, params = models.build(mcfg, (2,), 0, jax.random.key(0))
  critic_params = {"mu": DATA.mu, "log_s": jnp.log(DATA.scale)}  # starts as the teacher
  teacher = lambda x, t, s, cond=None: DATA.velocity(P, x, t)
  entry = objectives.entry("dmd")
  opt, copt = optax.adam(1e-3), optax.adam(5e-2)
  st, cst = opt.init(params), copt.init(critic_params)
  batch = _batch(512)

  @jax.jit
  def step(params, st, cp, cst, i):
    kc, ks = jax.random.split(jax.random.fold_in(jax.random.key(5), i))
    part = entry.parts["critic"]
    for j in range(part.updates):
      gc = jax.grad(lambda c: part.loss(c, params, batch, jax.random.fold_in(kc, j),
                                        net=net, apply=gaussian_velocity, cfg=CFG)[0])(cp)
      upd, cst = copt.update(gc, cst, cp)
      cp = optax.apply_updates(cp, upd)
    critic = lambda x, t, cond=None: gaussian_velocity(cp, x, t)
    g = jax.grad(lambda p: entry.loss(p, batch, ks, net=net, teacher=teacher, critic=critic,
                                      cfg=CFG)[0])(params)
    upd, st = opt.update(g, st, params)
    return optax.apply_updates(params, upd), st, cp, cst

  for i in range(300):
    params, st, critic_params, cst = step(params, st, critic_params, cst, i)
  z = jax.random.normal(jax.random.key(9), (20_000, 2))
  x = flowmap.Parameterization().apply(net, params, z, jnp.ones(20_000), jnp.zeros(20_000))
  np.testing.assert_allclose(x.mean(0), DATA.mu, atol=0.08)
  np.testing.assert_allclose(x.std(0), DATA.scale, atol=0.08)
