"""Solvers against the closed-form Gaussian flow map, with their convergence orders."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import enable_x64

from fmdistill import oracle, paths, sampling


def _gaussian():
  return oracle.Gaussian(jnp.array([1.0, -2.0]), jnp.array([0.3, 0.8]))


def _mixture():
  return oracle.GaussianMixture(jnp.array([0.6, 0.4]), jnp.array([[-1.0, 0.0], [1.5, 1.0]]),
                                jnp.array([0.4, 0.3]))


@pytest.mark.parametrize("method,order", [("euler", 1), ("midpoint", 2), ("heun", 2),
                                          ("rk4", 4)])
def test_solver_order_on_gaussian(method, order):
  """Global error against the exact flow map shrinks by at least ~2^order as steps double
  (midpoint happens to do better on this affine ODE; its order is pinned on the mixture)."""
  with enable_x64(True):
    p = paths.linear()
    g = oracle.Gaussian(jnp.array([1.0, -2.0], jnp.float64), jnp.array([0.3, 0.8], jnp.float64))
    x = jax.random.normal(jax.random.key(0), (64, 2), jnp.float64)
    t1, t0 = 0.95, 0.05
    exact = g.flow_map(p, x, jnp.full(64, t1), jnp.full(64, t0))
    v = lambda x_, t_: g.velocity(p, x_, t_)
    errs = [float(jnp.max(jnp.abs(sampling.solve_ode(
        v, x, jnp.linspace(t1, t0, n + 1, dtype=jnp.float64), method) - exact)))
        for n in (8, 16, 32)]
    rates = [np.log2(errs[i] / errs[i + 1]) for i in range(2)]
  assert all(r > order - 0.35 for r in rates), (errs, rates)
  assert all(r < order + 1.2 for r in rates), (errs, rates)


@pytest.mark.parametrize("method,order", [("euler", 1), ("midpoint", 2), ("heun", 2),
                                          ("rk4", 4)])
def test_solver_order_on_mixture(method, order):
  """Mixture velocity (closed form), reference from RK4 with many steps."""
  with enable_x64(True):
    p = paths.linear()
    gm = oracle.GaussianMixture(jnp.array([0.6, 0.4], jnp.float64),
                                jnp.array([[-1.0, 0.0], [1.5, 1.0]], jnp.float64),
                                jnp.array([0.4, 0.3], jnp.float64))
    v = lambda x_, t_: gm.velocity(p, x_, t_)
    x = jax.random.normal(jax.random.key(1), (32, 2), jnp.float64)
    ref = sampling.solve_ode(v, x, jnp.linspace(0.9, 0.1, 2049, dtype=jnp.float64), "rk4")
    errs = [float(jnp.max(jnp.abs(sampling.solve_ode(
        v, x, jnp.linspace(0.9, 0.1, n + 1, dtype=jnp.float64), method) - ref)))
        for n in (32, 64, 128)]
    rates = [np.log2(errs[i] / errs[i + 1]) for i in range(2)]
  assert all(abs(r - order) < 0.5 for r in rates), (errs, rates)


def test_exact_flow_map_sampler_is_grid_independent():
  p, g = paths.linear(), _gaussian()
  x = jax.random.normal(jax.random.key(2), (128, 2))
  f = lambda x_, t_, s_: g.flow_map(p, x_, t_, s_)
  one = sampling.sample_flow_map(f, x, sampling.time_grid(1))
  four = sampling.sample_flow_map(f, x, sampling.time_grid(4, kind="power", rho=2.0))
  np.testing.assert_allclose(one, four, atol=1e-5)
  np.testing.assert_allclose(one, g.flow_map(p, x, jnp.ones(128), jnp.zeros(128)), atol=1e-6)


@pytest.mark.parametrize("gamma", [0.5, 1.0])
def test_gamma_sampling_preserves_the_marginal(gamma):
  """With the exact map, gamma-sampling (re-noising) still lands on the data distribution."""
  p, g = paths.linear(), _gaussian()
  n = 50_000
  x = jax.random.normal(jax.random.key(3), (n, 2))
  f = lambda x_, t_, s_: g.flow_map(p, x_, t_, s_)
  out = sampling.sample_flow_map(f, x, sampling.time_grid(3), path=p, gamma=gamma,
                                 key=jax.random.key(4))
  np.testing.assert_allclose(out.mean(0), g.mu, atol=0.02)
  np.testing.assert_allclose(out.std(0), g.scale, atol=0.02)


def test_time_grid_and_nfe():
  grid = sampling.time_grid(4, T=2.0)
  np.testing.assert_allclose(grid, [2.0, 1.5, 1.0, 0.5, 0.0])
  assert sampling.solver_steps_for_nfe(8, "heun") == 4
  with pytest.raises(ValueError, match="multiple"):
    sampling.solver_steps_for_nfe(3, "heun")
  with pytest.raises(ValueError, match="known"):
    sampling.solve_ode(lambda x, t: x, jnp.ones((1, 2)), grid, "rk45")


def _toy_map():
  """A flow map that is not the exact one (so every jump matters): the exact map of another
  Gaussian on the linear path, evaluated with a scaled displacement."""
  p, g = paths.linear(), _gaussian()
  return lambda x, t, s: x + 1.1 * (g.flow_map(p, x, t, s) - x)


def test_gamma_zero_is_deterministic_multistep():
  f, x = _toy_map(), jax.random.normal(jax.random.key(5), (256, 2))
  grid = sampling.time_grid(4)
  want = x
  for t, s in zip(grid[:-1], grid[1:]):
    want = f(want, jnp.full((256,), t), jnp.full((256,), s))
  got = sampling.sample_flow_map(f, x, grid, path=paths.linear(), gamma=0.0,
                                 key=jax.random.key(6))
  np.testing.assert_allclose(got, want, atol=1e-6)
  # the stochastic branch tends to the same jumps as gamma -> 0
  near = sampling.sample_flow_map(f, x, grid, path=paths.linear(), gamma=1e-3,
                                  key=jax.random.key(6))
  np.testing.assert_allclose(near, want, atol=5e-3)


def test_gamma_one_is_consistency_multistep():
  """``x0 = f(x, t_i, 0)``, then ``x = alpha(t_{i+1}) x0 + sigma(t_{i+1}) z_i`` with the
  sampler's per-step keys; the last step returns ``x0``."""
  p, f = paths.linear(), _toy_map()
  n, x = 256, jax.random.normal(jax.random.key(7), (256, 2))
  grid, key = sampling.time_grid(3), jax.random.key(8)
  keys = jax.random.split(key, 3)
  want = x
  for i in range(3):
    x0 = f(want, jnp.full((n,), grid[i]), jnp.zeros((n,)))
    s = grid[i + 1]
    want = x0 if i == 2 else p.alpha(s) * x0 + p.sigma(s) * jax.random.normal(keys[i], x.shape)
  got = sampling.sample_flow_map(f, x, grid, path=p, gamma=1.0, key=key)
  np.testing.assert_allclose(got, want, atol=1e-5)
