"""Parameterisations: exact boundary condition, closed-form velocity, guidance, conversion."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fmdistill import flowmap, oracle, paths


def _net(params, x, t, s, cond=None):
  """A smooth nonlinear test network with the one signature."""
  h = jnp.tanh(x @ params["w"] + (t - 0.3 * s)[:, None] * params["b"])
  out = h @ params["w"].T + jnp.sin(t)[:, None]
  if cond is not None:
    out = out + cond[:, None].astype(out.dtype)
  return out


PARAMS = {"w": jax.random.normal(jax.random.key(0), (3, 3)), "b": jnp.arange(3.0)}
X = jax.random.normal(jax.random.key(1), (5, 3))
T = jnp.linspace(0.1, 0.9, 5)


@pytest.mark.parametrize("name", flowmap.PARAMETERIZATIONS)
def test_boundary_condition_is_exact(name):
  param = flowmap.Parameterization(name, sigma_d=0.7)
  out = param.apply(_net, PARAMS, X, T, T)
  assert bool(jnp.all(out == X))


@pytest.mark.parametrize("name", flowmap.PARAMETERIZATIONS)
def test_closed_form_velocity_equals_jvp(name):
  param = flowmap.Parameterization(name, sigma_d=0.7)
  v_closed = param.velocity(_net, PARAMS, X, T)
  v_jvp = flowmap.velocity_from_flow_map(param, _net, PARAMS, X, T)
  np.testing.assert_allclose(v_closed, v_jvp, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", flowmap.PARAMETERIZATIONS)
def test_from_flow_map_inverts(name):
  param = flowmap.Parameterization(name, sigma_d=0.7)
  s = T * 0.3
  f = param.apply(_net, PARAMS, X, T, s)
  c_in = param.coefficients(T, s)[2][:, None]
  np.testing.assert_allclose(param.from_flow_map(f, X, T, s), _net(PARAMS, c_in * X, T, s),
                             rtol=1e-4, atol=1e-5)


def test_unknown_parameterization():
  with pytest.raises(ValueError, match="displacement"):
    flowmap.Parameterization("ctm")


def test_second_order_boundary_and_slope():
  v = lambda x, t, cond: jnp.cos(x) * t[:, None]
  g = flowmap.second_order(_net, v)
  param = flowmap.Parameterization("displacement")
  np.testing.assert_allclose(param.apply(g, PARAMS, X, T, T), X)
  slope = flowmap.velocity_from_flow_map(param, g, PARAMS, X, T)
  np.testing.assert_allclose(slope, v(X, T, None), rtol=1e-5, atol=1e-6)
  # the curvature term is second order in (s - t)
  s = T - 1e-2
  f = param.apply(g, PARAMS, X, T, s)
  lin = X + (s - T)[:, None] * v(X, T, None)
  assert float(jnp.max(jnp.abs(f - lin))) < 2e-3


def test_classifier_free_guidance():
  param = flowmap.Parameterization("displacement")
  cond = jnp.array([0, 1, 2, 1, 0])
  null = 7
  v = flowmap.teacher_velocity(_net, PARAMS, param, guidance=3.0, null_label=null)
  vc, vu = _net(PARAMS, X, T, T, cond), _net(PARAMS, X, T, T, jnp.full(5, null))
  np.testing.assert_allclose(v(X, T, cond), vu + 3.0 * (vc - vu), rtol=1e-6)
  with pytest.raises(ValueError, match="null label"):
    flowmap.teacher_velocity(_net, PARAMS, param, guidance=2.0)(X, T, cond)


def test_teacher_network_converts_paths():
  """A linear-path teacher that knows the exact Gaussian velocity, bound for a TrigFlow
  student, returns the exact TrigFlow velocity at (x, t) and ignores s."""
  g = oracle.Gaussian(jnp.array([0.5, -1.0]), jnp.array([0.6, 0.9]))
  lin, trig = paths.linear(), paths.trigflow(0.8)
  net = lambda params, x, t, s, cond=None: g.velocity(lin, x, t)
  teacher = flowmap.teacher_network(net, None, flowmap.Parameterization(), lin, trig)
  x = jax.random.normal(jax.random.key(5), (7, 2))
  t = jnp.linspace(0.1, 1.4, 7)
  np.testing.assert_allclose(teacher(x, t, t * 0.2), g.velocity(trig, x, t), rtol=1e-4,
                             atol=1e-4)
