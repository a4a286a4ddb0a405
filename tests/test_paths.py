"""Paths: boundary values, derivatives against jax.jvp, SNR conversion, time samplers."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fmdistill import oracle, paths

PATHS = [paths.linear(), paths.trigflow(0.5), paths.trigflow(1.0), paths.vp()]


@pytest.mark.parametrize("p", PATHS, ids=lambda p: f"{p.name}{p.sigma_d}")
def test_boundaries(p):
  assert float(p.alpha(jnp.float32(0.0))) == 1.0
  assert float(p.sigma(jnp.float32(0.0))) == 0.0
  assert abs(float(p.alpha(jnp.float32(p.T)))) < 1e-6
  assert float(p.sigma(jnp.float32(p.T))) > 0


@pytest.mark.parametrize("p", PATHS, ids=lambda p: f"{p.name}{p.sigma_d}")
def test_derivatives_match_jvp(p):
  t = jnp.linspace(0.01, p.T - 0.01, 17)
  one = jnp.ones_like(t)
  np.testing.assert_allclose(jax.jvp(p.alpha, (t,), (one,))[1], p.dalpha(t), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(jax.jvp(p.sigma, (t,), (one,))[1], p.dsigma(t), rtol=1e-5, atol=1e-6)
  x0, eps = jax.random.normal(jax.random.key(0), (2, 17, 3))
  vel = jax.jvp(lambda tt: p.sample(x0, eps, tt), (t,), (one,))[1]
  np.testing.assert_allclose(vel, p.velocity(x0, eps, t), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("p", PATHS, ids=lambda p: f"{p.name}{p.sigma_d}")
def test_log_snr_inverse_and_denoise(p):
  t = jnp.linspace(0.05, p.T - 0.05, 11)
  np.testing.assert_allclose(p.time_from_log_snr(p.log_snr(t)), t, rtol=1e-5, atol=1e-6)
  x0, eps = jax.random.normal(jax.random.key(1), (2, 11, 4))
  xt, v = p.sample(x0, eps, t), p.velocity(x0, eps, t)
  x0h, epsh = p.denoise(xt, v, t)
  np.testing.assert_allclose(x0h, x0, atol=2e-4)
  np.testing.assert_allclose(epsh, eps, atol=2e-4)


@pytest.mark.parametrize("src,dst", [(PATHS[0], PATHS[1]), (PATHS[1], PATHS[0]),
                                     (PATHS[0], PATHS[3]), (PATHS[3], PATHS[2])])
def test_snr_conversion_matches_closed_form_velocity(src, dst):
  """Converting the exact Gaussian velocity of one path gives the exact one of the other."""
  g = oracle.Gaussian(jnp.array([0.7, -0.3]), jnp.array([0.5, 1.2]))
  v_dst = paths.convert_velocity(lambda x, t: g.velocity(src, x, t), src, dst)
  t = jnp.linspace(0.05, dst.T - 0.05, 9)
  x = jax.random.normal(jax.random.key(2), (9, 2))
  np.testing.assert_allclose(v_dst(x, t), g.velocity(dst, x, t), rtol=1e-4, atol=1e-4)
  back = paths.convert_time(paths.convert_time(t, dst, src), src, dst)
  np.testing.assert_allclose(back, t, rtol=1e-5, atol=1e-6)


def test_time_samplers():
  k = jax.random.key(0)
  u = paths.sample_time(k, 10_000, paths.linear(), "uniform")
  assert 0 < float(u.min()) and float(u.max()) <= 1.0
  ln = paths.sample_time(k, 10_000, paths.trigflow(), "logit_normal")
  assert 0 < float(ln.min()) and float(ln.max()) < np.pi / 2
  assert abs(float(jnp.median(ln)) - np.pi / 4) < 0.05
  sc = paths.sample_time(k, 10_000, paths.trigflow(0.5), "scm", mean=-1.0, std=1.4)
  assert 0 < float(sc.min()) and float(sc.max()) < np.pi / 2
  # median of arctan(exp(P_mean + P_std n)/sigma_d) is arctan(exp(P_mean)/sigma_d)
  assert abs(float(jnp.median(sc)) - np.arctan(np.exp(-1.0) / 0.5)) < 0.02
  with pytest.raises(ValueError, match="known"):
    paths.sample_time(k, 3, paths.linear(), "nope")


@pytest.mark.parametrize("kind", paths.TIME_SAMPLERS)
@pytest.mark.parametrize("name", sorted(paths.PATHS))
def test_every_time_sampler_stays_inside_the_path(kind, name):
  """Every sampler on every path draws times in ``[0, T]`` (the sCM sampler once drew
  ``t > T = 1`` for about 22% of samples on the linear path), pairs too, with wide
  log-normal parameters that push into both tails."""
  path = paths.get_path(name, 0.5)
  for mean, std in ((-1.0, 1.4), (2.0, 3.0), (-3.0, 3.0)):
    t = paths.sample_time(jax.random.key(1), 50_000, path, kind, mean=mean, std=std)
    assert float(t.min()) >= 0.0 and float(t.max()) <= path.T, (kind, name, mean, std)
    t, s = paths.sample_pairs(jax.random.key(2), 20_000, path, kind, equal_ratio=0.3,
                              mean=mean, std=std)
    assert bool(jnp.all((0 <= s) & (s <= t) & (t <= path.T)))


def test_scm_sampler_on_the_linear_path_is_the_rescaled_trigflow_draw():
  k = jax.random.key(4)
  lin = paths.sample_time(k, 1000, paths.linear(), "scm", mean=-0.8, std=1.6)
  trig = paths.sample_time(k, 1000, paths.trigflow(1.0), "scm", mean=-0.8, std=1.6)
  np.testing.assert_allclose(lin, trig / (np.pi / 2), rtol=1e-6)


def test_time_pairs():
  t, s = paths.sample_pairs(jax.random.key(3), 20_000, paths.linear(), equal_ratio=0.3)
  assert bool(jnp.all(s <= t))
  assert abs(float(jnp.mean(s == t)) - 0.3) < 0.02


def test_unknown_path_lists_known():
  with pytest.raises(ValueError, match="linear"):
    paths.get_path("cosine2")
