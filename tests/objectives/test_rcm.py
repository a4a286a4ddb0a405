"""rCM = sCM + lambda DMD, against the exact Gaussian map on TrigFlow: the rollout is the
student's own sampler, lambda = 0 is exactly scm_cd, the DMD term vanishes at the exact map and
pulls a perturbed one back, and the defaults are the paper's recipe."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fmdistill import config as config_lib, models, objectives, oracle, paths
from fmdistill.objectives import _score, dmd
from tests.objectives import tangent_oracle as o

SD = 0.8
TRIG = paths.trigflow(SD)


def _cfg(**kw):
  cfg = objectives.default_config("rcm")
  cfg.sigma_d = SD
  cfg.update(kw)
  return cfg


EXACT = o.plug(o.trigflow_cm_F(o.G, SD))  # the exact consistency map: a F + b at a=1, b=0
TEACHER = lambda x, t, s=None, cond=None: o.G.velocity(TRIG, x, t)


@pytest.mark.parametrize("times", ["uniform", "random"])
def test_two_step_rollout_of_the_exact_map_reproduces_the_data(times):
  """Consistency multistep (denoise to 0, re-noise with fresh noise) with the exact map gives
  data samples after any number of steps; the deterministic jumps ``f(x, t_i, t_{i+1})`` the
  rollout used before query the consistency network at ``s != 0`` and get the spread wrong."""
  n = 20_000
  x = jnp.zeros((n, 2))
  for gamma, ok in ((1.0, True), (0.0, False)):
    cfg = _cfg(rollout_steps=2, rollout_times=times, rollout_gamma=gamma)
    x0, t_last = _score.rollout(o.exact_params(), jax.random.key(0), x, None, net=EXACT,
                                cfg=cfg, step_index=1)
    assert float(jnp.max(t_last)) < TRIG.T  # the last map starts below T: two steps were taken
    err = max(float(jnp.max(jnp.abs(x0.mean(0) - o.G.mu))),
              float(jnp.max(jnp.abs(x0.std(0) - o.G.scale))))
    if ok:
      assert err < 0.025, (times, err)  # sampling error of 20k samples: ~0.005
    else:
      assert err > 0.05, (times, err)


def test_rollout_feeds_the_last_map_the_noised_marginal():
  """The input of the last (differentiated) map of an ``N = 3`` rollout on the evaluation grid
  is at ``t = T/3`` and distributed as the data noised to ``T/3``: what the student sees there
  at sampling time (each step re-noises an exact denoising with fresh noise)."""
  cfg = _cfg(rollout_steps=3, rollout_times="uniform")
  seen = {}

  def spy(p, x, t, s, cond=None):
    seen["x"], seen["t"] = x, t
    return EXACT(p, x, t, s, cond)
  _score.rollout(o.exact_params(), jax.random.key(3), jnp.zeros((20_000, 2)), None, net=spy,
                 cfg=cfg, step_index=2)
  t = seen["t"]
  np.testing.assert_allclose(t, TRIG.T / 3, rtol=1e-6)
  x = seen["x"] * SD  # the network sees x / sigma_d
  a, s = TRIG.alpha(t[0]), TRIG.sigma(t[0])
  np.testing.assert_allclose(x.mean(0), a * o.G.mu, atol=0.02)
  np.testing.assert_allclose(x.std(0), jnp.sqrt((a * o.G.scale) ** 2 + s ** 2), atol=0.02)


def _small_net():
  mcfg = config_lib.base("rcm").model
  mcfg.width, mcfg.depth = 32, 2
  net, params = models.build(mcfg, (2,), 0, jax.random.key(0))
  params = jax.tree_util.tree_map(
      lambda p: p + 0.05 * jax.random.normal(jax.random.key(1), p.shape), params)
  return net, params


def test_rcm_with_lambda_zero_is_scm_cd():
  """Same loss and gradient as ``scm_cd`` configured with rCM's sCM fields, for the same key,
  with lambda = 0, and with lambda > 0 before ``dmd_start``."""
  net, params = _small_net()
  batch = {"x": o.G.sample(jax.random.key(1), 256)}
  critic = lambda x, t, cond=None: o.G_OTHER.velocity(TRIG, x, t)
  scfg = objectives.default_config("scm_cd")
  for lam, step in ((0.0, 1500), (0.01, 500)):
    rcfg = _cfg(dmd_weight=lam, tangent_warmup=1000)
    scfg.update({k: rcfg[k] for k in scfg.keys()})
    key = jax.random.key(7)
    kw = dict(net=net, teacher=TEACHER, step=step)
    (lr, _), gr = jax.value_and_grad(lambda p: objectives.get("rcm")(
        p, batch, key, critic=critic, cfg=rcfg, **kw), has_aux=True)(params)
    (ls, _), gs = jax.value_and_grad(lambda p: objectives.get("scm_cd")(
        p, batch, key, cfg=scfg, **kw), has_aux=True)(params)
    assert float(lr) == float(ls)
    for a, b in zip(jax.tree_util.tree_leaves(gr), jax.tree_util.tree_leaves(gs)):
      np.testing.assert_array_equal(a, b)
  assert not scfg.adaptive_weight and scfg.tangent_norm == "l2"  # rCM's sCM is the plain sum


def _generator_dist(params):
  """The distribution of the 1-step generator ``f(x_T, T, 0)`` of ``a F + b`` (affine in
  ``x_T ~ N(0, sigma_d^2 I)``, elementwise): ``N(c, (m sigma_d)^2)``, from the stop-gradient
  parameters -- the critic's exact target."""
  from fmdistill import flowmap
  param = flowmap.Parameterization("trigflow", SD)
  T = jnp.full((1,), TRIG.T)
  f = lambda x: param.apply(EXACT, jax.lax.stop_gradient(params), x, T, 0 * T)[0]
  c = f(jnp.zeros((1, 2)))
  m = f(jnp.ones((1, 2))) - c
  return oracle.Gaussian(c, jnp.abs(m) * SD)


def _dm_grad(params, cfg):
  critic = lambda x, t, cond=None: _generator_dist(params).velocity(TRIG, x, t)
  loss = lambda p: dmd.dm_loss(p, {"x": jnp.zeros((8192, 2))}, jax.random.key(2), net=EXACT,
                               teacher=TEACHER, critic=critic, cfg=cfg, scale=1.0)[0]
  return jax.grad(loss)(params)


def test_dmd_term_vanishes_at_the_exact_map_and_pulls_a_perturbed_one_back():
  """The critic is the exact velocity of the generator's own samples (never the teacher's):
  at the exact map it coincides with the data's and the DMD gradient vanishes; with the output
  shifted by ``b`` the generator's mean moves by ``-sigma_d b`` and descending the gradient
  moves ``b`` back towards 0 (a sign error that keeps the fixed point fails here)."""
  cfg = _cfg(rollout_steps=1)
  g0 = _dm_grad(o.exact_params(), cfg)
  assert abs(float(g0["a"])) < 1e-5 and float(jnp.max(jnp.abs(g0["b"]))) < 1e-5, g0
  for b in (jnp.array([0.3, -0.2]), jnp.array([-0.25, 0.15])):
    g = _dm_grad({"a": jnp.float32(1.0), "b": b}, cfg)
    assert float(jnp.min(g["b"] * b)) > 0.0, (b, g["b"])


def test_dmd_term_is_off_before_dmd_start_and_weighted_after():
  net, params = _small_net()
  batch = {"x": o.G.sample(jax.random.key(1), 256)}
  wrong = lambda x, t, cond=None: o.G_OTHER.velocity(TRIG, x, t)  # a fake score != real
  cfg = _cfg(dmd_start=100, tangent_warmup=1)
  grad = lambda c, step: jax.grad(lambda p: objectives.get("rcm")(
      p, batch, jax.random.key(2), net=net, teacher=TEACHER, critic=wrong, step=step,
      cfg=c)[0])(params)
  off = _cfg(dmd_start=100, tangent_warmup=1, dmd_weight=0.0)
  for a, b in zip(jax.tree_util.tree_leaves(grad(cfg, 10)),
                  jax.tree_util.tree_leaves(grad(off, 10))):
    np.testing.assert_array_equal(a, b)
  diff = [float(jnp.max(jnp.abs(a - b))) for a, b in zip(
      jax.tree_util.tree_leaves(grad(cfg, 200)), jax.tree_util.tree_leaves(grad(off, 200)))]
  assert max(diff) > 1e-6  # the DMD gradient arrived


def test_defaults_are_the_papers_recipe():
  cfg = objectives.default_config("rcm")
  c = config_lib.base("rcm")
  entry = objectives.entry("rcm")
  assert cfg.dmd_weight == 0.01 and not cfg.adaptive_weight and cfg.tangent_norm == "l2"
  assert (cfg.time_mean, cfg.time_std) == (-0.8, 1.6)
  assert (cfg.noise_time, cfg.noise_shift, cfg.rollout_steps) == ("shift", 5.0, 4)
  assert cfg.dmd_start == cfg.tangent_warmup == c.parts.critic.start
  assert (c.parts.critic.updates, c.parts.critic.every) == (4, 1)
  assert "weighting" not in entry.parts_for(cfg) and entry.consistency
  # rCM's shifted times: the median rectified-flow time is 5/6 (u = 1/2)
  t = _score.sample_noise_time(jax.random.key(0), 100_000, cfg, TRIG)
  r = paths.convert_time(t, TRIG, paths.linear())
  assert abs(float(jnp.median(r)) - 5 / 6) < 0.01
