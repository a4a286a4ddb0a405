"""IMM against the Gaussian oracle.

The exact flow map pushes ``p_t`` and ``p_r`` to the same ``p_s``, so the population MMD and
its gradient vanish there. With the unbiased estimate (``mmd='u'``, pairs ``i != j`` only) the
expected gradient is exactly zero; IMM's V-statistic (all ``M x M`` pairs, the default) adds
the ``i = j`` pairs, which pull each particle towards its own ``x_r`` partner (a consistency
term of size ``O(t - r)``): small but not zero. Both are checked by Monte Carlo against the
gradient at a perturbed map, which must point back. Plus the kernel, weighting and time
sampler against their formulas, and a teacher-initialised tiny MLP whose one-step samples reach
the data's moments.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import family_train as ft
import tangent_oracle as o
from fmdistill import paths
from fmdistill.objectives import imm


def _grad_fn(cfg, n, seed=4):
  batch = {"x": o.G.sample(jax.random.key(seed), n)}
  return o.jit(jax.grad(lambda q: imm.imm_loss(
      q, batch, jax.random.key(seed + 1), net=o.plug(o.linear_F(o.G)), teacher=None,
      ema_params=None, step=0, cfg=cfg)[0]))


@pytest.mark.parametrize("estimator,rel", [("u", 0.15), ("v", 0.05)])
def test_gradient_at_the_exact_map_is_small_and_a_perturbed_map_is_pulled_back(estimator, rel):
  cfg = imm.defaults()
  cfg.mmd = estimator
  grad = _grad_fn(cfg, 131_072)
  g = grad(o.exact_params())
  g_a = grad({"a": jnp.float32(1.5), "b": jnp.zeros(2)})
  g_b = grad({"a": jnp.float32(1.0), "b": jnp.array([1.0, -1.0])})
  assert float(g_a["a"]) > 0 and float(g_b["b"][0]) > 0 > float(g_b["b"][1]), (g_a, g_b)
  assert abs(float(g["a"])) < rel * float(g_a["a"]), (g, g_a)
  assert float(jnp.max(jnp.abs(g["b"]))) < rel * float(jnp.min(jnp.abs(g_b["b"]))), (g, g_b)


def test_mmd_and_kernel():
  a = jax.random.normal(jax.random.key(0), (3, 4, 5))
  b = jax.random.normal(jax.random.key(1), (3, 4, 5)) + 0.5
  w = jnp.array([0.5, 1.0, 2.0])
  kern = lambda x, y, ww: np.exp(-ww * max(np.linalg.norm(x - y), 1e-4) / 5)
  for est in ("v", "u"):
    want = []
    for gi in range(3):
      pairs = [(i, j) for i in range(4) for j in range(4) if est == "v" or i != j]
      m = lambda x, y: np.mean([kern(x[i], y[j], float(w[gi])) for i, j in pairs])
      an, bn = np.asarray(a[gi]), np.asarray(b[gi])
      want.append(m(an, an) + m(bn, bn) - 2 * m(an, bn))
    np.testing.assert_allclose(imm.mmd2(a, b, w, est), want, rtol=1e-5)
  assert float(jnp.max(jnp.abs(imm.mmd2(a, a, w, "v")))) < 1e-6
  g = jax.grad(lambda x: jnp.sum(imm.mmd2(x, b, w)))(a)  # finite at coinciding particles
  assert bool(jnp.all(jnp.isfinite(g)))


def test_weighting_is_the_papers():
  """``w = 1/2 sigmoid(b - lambda_t) (-dlambda/dt) alpha^a / (alpha^2 + sigma^2)`` on the
  linear path: ``lambda = 2 log((1 - t)/t)``, ``-dlambda/dt = 2 / (t (1 - t))``."""
  t = jnp.array([0.01, 0.2, 0.5, 0.9])
  lam = 2 * jnp.log((1 - t) / t)
  want = 0.5 * jax.nn.sigmoid(4 - lam) * 2 / (t * (1 - t)) * (1 - t) ** 2 / ((1 - t) ** 2 + t ** 2)
  np.testing.assert_allclose(imm.weighting(t, paths.linear(), 2.0, 4.0), want, rtol=1e-5)


def test_time_sampler():
  cfg, path = imm.defaults(), paths.linear()
  t, r, s = o.jit(lambda k: imm.sample_times(k, 200_000, cfg, path))(jax.random.key(0))
  assert bool(jnp.all(s <= r)) and bool(jnp.all(r < t)) and float(jnp.max(t)) <= 0.994 + 1e-6
  eta = lambda u: u / (1 - u)
  gap = (0.994 / 0.006) / 2 ** 12
  far = (eta(t) - gap > eta(s)) & (eta(t) < 4.0)  # no clamp, and float32 eta accurate
  np.testing.assert_allclose(eta(t[far]) - eta(r[far]), gap, rtol=0.02)
  # log eta_t is N(-1.1, 2) truncated above at log eta(0.994) = 5.11
  q = float(jax.scipy.stats.norm.cdf((math.log(0.994 / 0.006) + 1.1) / 2.0))
  med = -1.1 + 2.0 * float(jax.scipy.stats.norm.ppf(0.5 * q))
  assert abs(float(jnp.median(jnp.log(eta(t)))) - med) < 0.03


def test_batch_must_split_into_groups():
  with pytest.raises(ValueError, match="group_size"):
    imm.imm_loss(o.exact_params(), {"x": jnp.zeros((10, 2))}, jax.random.key(0),
                 net=o.plug(o.linear_F(o.G)), cfg=imm.defaults())


def test_teacher_initialised_student_reaches_the_data_moments():
  """Measured at 400 steps from the tiny teacher (whose one-step samples are 0.63 off):
  1-step moments 0.10, 2-jump RMSE to the exact map 0.06."""
  net, params, cfg = ft.train("imm")
  assert ft.moment_error(ft.samples(net, params, cfg, 1, 0.0)) < 0.2
  assert ft.jump_rmse(net, params, cfg, 2) < 0.15
