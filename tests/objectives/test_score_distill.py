"""The distribution-matching family (DMD, DMD v1, DMD2, VSD, SiD) against Gaussian oracles.

The critic is always the exact velocity of the *generator's own* samples (never the teacher's:
a test with critic = teacher cannot fail): at the exact generator it coincides with the data's
and every generator gradient vanishes; a generator shifted off the data is pulled back."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fmdistill import flowmap, models, objectives, oracle, paths
from fmdistill.config import base
from fmdistill.objectives import _score, dmd

P = paths.linear()
DATA = oracle.Gaussian(jnp.array([1.0, -0.5]), jnp.array([0.4, 0.7]))
TEACHER = lambda x, t, s=None, cond=None: DATA.velocity(P, x, t)
METHODS = ("dmd", "dmd2", "dmd_v1", "vsd", "sid")


def exact_student(g: oracle.Gaussian):
  """A displacement net whose map is ``g``'s exact flow map plus ``b``: its 1-step samples from
  ``N(0, I)`` at ``t = 1`` are ``N(g.mu + b, g.scale^2)``."""
  def net(params, x, t, s, cond=None):
    return (g.flow_map(P, x, t, s) + params["b"] - x) / (s - t)[:, None]
  return net


def _batch(method, n=4096):
  batch = {"x": jnp.zeros((n, 2))}
  if objectives.entry(method).needs_pairs:  # (noise, the teacher's exact output) pairs
    z = jax.random.normal(jax.random.key(5), (n, 2))
    y = DATA.flow_map(P, z, jnp.ones(n), jnp.zeros(n))
    batch["traj"] = jnp.stack([z, y], 1)
  return batch


def _grad(method, student_dist, b=jnp.zeros(2)):
  critic = lambda x, t, cond=None: oracle.Gaussian(
      student_dist.mu + b, student_dist.scale).velocity(P, x, t)  # the generator's own
  loss = objectives.get(method)
  cfg = objectives.default_config(method)
  if "gan_weight" in cfg:
    cfg.gan_weight = 0.0  # the GAN term is tested on its own below
  return jax.grad(lambda p: loss(p, _batch(method), jax.random.key(1),
                                 net=exact_student(student_dist), teacher=TEACHER,
                                 critic=critic, cfg=cfg)[0])({"b": b})["b"]


@pytest.mark.parametrize("method", METHODS)
def test_generator_gradient_vanishes_at_the_data_and_points_home_off_it(method):
  g = _grad(method, DATA)
  assert float(jnp.max(jnp.abs(g))) < 1e-6, g
  for delta in (jnp.array([0.5, -0.3]), jnp.array([-0.2, 0.4])):
    # the generator's samples are off by delta: descending moves its mean back
    g = _grad(method, oracle.Gaussian(DATA.mu + delta, DATA.scale))
    assert float(jnp.min(g * delta)) > 0.0, (method, delta, g)
  # and a generator shifted by its output bias b is pulled back through b
  b = jnp.array([0.3, 0.2])
  assert float(jnp.min(_grad(method, DATA, b) * b)) > 0.0


def test_rollout_with_and_without_backward_simulation_feeds_the_same_marginal():
  """DMD2: with the exact map, the generator's own 2-step sampler (backward simulation) and
  real data noised to ``t_1`` give the last map the same input distribution."""
  cfg = objectives.default_config("dmd2")
  cfg.rollout_steps = 2
  net = exact_student(DATA)
  x_data = DATA.sample(jax.random.key(0), 20_000)
  outs = []
  for bs in (True, False):
    cfg.backward_simulation = bs
    seen = {}

    def spy(p, x, t, s, cond=None):
      seen["x"] = x
      return net(p, x, t, s, cond)
    _score.rollout({"b": jnp.zeros(2)}, jax.random.key(1), x_data, None, net=spy, cfg=cfg,
                   step_index=1)
    outs.append(seen["x"])
  a, s = P.alpha(0.5), P.sigma(0.5)
  for x in outs:
    np.testing.assert_allclose(x.mean(0), a * DATA.mu, atol=0.02)
    np.testing.assert_allclose(x.std(0), jnp.sqrt((a * DATA.scale) ** 2 + s ** 2), atol=0.02)


def test_a_k_step_rollout_trains_the_last_map_at_every_start_time_of_the_k_step_sampler():
  """``rollout_times='uniform'``, ``rollout_steps = 4``: over random step counts ``N`` the last
  map starts at ``T, 3T/4, T/2, T/4`` -- the start times of the 4-step (and 2- and 1-step)
  sampler the report uses -- not at ``T/N`` (a grid rebuilt for each ``N`` trained ``T/3``, which
  no sampler uses, and never ``3T/4``, which the 4-step sampler does)."""
  cfg = objectives.default_config("dmd2")
  cfg.update(rollout_steps=4, rollout_times="uniform")
  net = exact_student(DATA)
  x_data = jnp.zeros((4, 2))
  starts = set()
  for i in range(64):
    _, t = _score.rollout({"b": jnp.zeros(2)}, jax.random.key(i), x_data, None, net=net, cfg=cfg)
    starts.add(round(float(t[0]) / P.T, 6))
  assert starts == {1.0, 0.75, 0.5, 0.25}


class IdentityCritic:
  """A frozen critic whose "features" are its input and time (for the GAN head)."""

  def __init__(self, dist):
    self.dist = dist

  def __call__(self, x, t, cond=None):
    return self.dist.velocity(P, x, t)

  def features(self, x, t, cond=None):
    return jnp.concatenate([x, t[:, None]], -1)


def test_gan_head_learns_real_from_fake_and_pulls_the_generator_home():
  """DMD2's GAN term: the ``disc`` part's loss trains a head on the critic's features to tell
  data from the generator's samples; the generator's non-saturating loss through that head then
  points back to the data. (The critic here is the teacher, so the DM gradient is zero and only
  the GAN term acts.)"""
  delta = jnp.array([0.6, -0.4])
  student = exact_student(oracle.Gaussian(DATA.mu + delta, DATA.scale))
  cfg = objectives.default_config("dmd2")
  cfg.update(gan_weight=1.0, gan_t_max=0.3)
  critic = IdentityCritic(DATA)
  part = objectives.entry("dmd2").parts["disc"]
  head = _score.init_head(jax.random.key(0), 3, 32)
  opt = optax.adam(1e-2)
  st = opt.init(head)
  real = {"x": DATA.sample(jax.random.key(2), 512)}

  @jax.jit
  def step(head, st, i):
    g = jax.grad(lambda h: part.loss(h, {"b": jnp.zeros(2)}, real, jax.random.key(i), net=student,
                                     parts={"critic": critic}, cfg=cfg)[0])(head)
    upd, st = opt.update(g, st, head)
    return optax.apply_updates(head, upd), st
  for i in range(200):
    head, st = step(head, st, i)
  _, m = part.loss(head, {"b": jnp.zeros(2)}, real, jax.random.key(999), net=student,
                   parts={"critic": critic}, cfg=cfg)
  assert float(m["disc_margin"]) > 1.0  # logits(real) - logits(fake)
  g = jax.grad(lambda p: dmd.dmd_loss(p, real, jax.random.key(3), net=student, teacher=TEACHER,
                                      critic=critic, cfg=cfg, disc=head)[0])({"b": jnp.zeros(2)})
  assert float(jnp.min(g["b"] * delta)) > 0.0, g


@pytest.fixture(scope="module")
def mlp():
  mcfg = base("dmd").model
  mcfg.width, mcfg.depth = 64, 2
  return models.build(mcfg, (2,), 0, jax.random.key(0))


def gaussian_velocity(params, x, t, cond=None):
  return oracle.Gaussian(params["mu"], jnp.exp(params["log_s"])).velocity(P, x, t)


@pytest.mark.parametrize("method", ["vsd", "sid"])
def test_student_distribution_converges_to_the_data(mlp, method, steps=200, updates=5):
  """Alternating critic/generator updates move a 1-step MLP generator from N(0, I) onto the
  data Gaussian (mean and per-axis std within 0.08; measured within 0.02 at 200 steps); the
  critic is a Gaussian-velocity family started at the teacher, updated 5 times per generator
  step (with one update at this critic learning rate it lags and the pair oscillates)."""
  net, params = mlp
  entry = objectives.entry(method)
  cfg = objectives.default_config(method)
  critic_params = {"mu": DATA.mu, "log_s": jnp.log(DATA.scale)}
  opt, copt = optax.adam(1e-3), optax.adam(5e-2)
  st, cst = opt.init(params), copt.init(critic_params)
  batch = {"x": jnp.zeros((512, 2))}
  part = entry.parts["critic"]

  @jax.jit
  def step(params, st, cp, cst, i):
    kc, ks = jax.random.split(jax.random.fold_in(jax.random.key(5), i))
    for j in range(updates):
      gc = jax.grad(lambda c: part.loss(c, params, batch, jax.random.fold_in(kc, j), net=net,
                                        apply=gaussian_velocity, cfg=cfg)[0])(cp)
      upd, cst = copt.update(gc, cst, cp)
      cp = optax.apply_updates(cp, upd)
    critic = lambda x, t, cond=None: gaussian_velocity(cp, x, t)
    g = jax.grad(lambda p: entry.loss(p, batch, ks, net=net, teacher=TEACHER, critic=critic,
                                      cfg=cfg)[0])(params)
    upd, st = opt.update(g, st, params)
    return optax.apply_updates(params, upd), st, cp, cst

  for i in range(steps):
    params, st, critic_params, cst = step(params, st, critic_params, cst, i)
  z = jax.random.normal(jax.random.key(9), (20_000, 2))
  x = flowmap.Parameterization().apply(net, params, z, jnp.ones(20_000), jnp.zeros(20_000))
  np.testing.assert_allclose(x.mean(0), DATA.mu, atol=0.08)
  np.testing.assert_allclose(x.std(0), DATA.scale, atol=0.08)


def test_one_step_generators_are_evaluated_at_their_own_step_count():
  """DMD/DMD2/VSD/SiD generators train on one fixed ``rollout_steps``-step grid (1 by
  default): a 2-step sampler would query ``f(x_t, t, 0)`` at ``t = T/2``, which they never saw
  (a checkerboard DMD student: 0.059 at 1 NFE, 1.03 at 2), so their reports sample 1 step;
  rCM's random rollout times and its sCM term train every time, so it keeps 1/2/4."""
  from fmdistill import config
  for m in ("dmd", "dmd2", "dmd_v1", "vsd", "sid"):
    assert config.base(m).eval.student_nfe == (1,), m
  assert config.base("rcm").eval.student_nfe == (1, 2, 4)
