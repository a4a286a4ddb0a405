"""Straightness S(Z) = int_0^1 E||(Z_1 - Z_0) - dZ/dtau||^2 dtau against closed forms."""
import jax
import jax.numpy as jnp
import numpy as np

from fmdistill import oracle, paths
from fmdistill.eval import straightness

G = oracle.Gaussian(jnp.array([1.0, -0.5]), jnp.array([0.4, 0.7]))


def closed_form(g: oracle.Gaussian) -> float:
  """On the linear path ``x_t = m(t) + std(t) z`` with ``x_1 = z``, ``x_0 = mu + sc z``: the
  residual is ``(1 - sc - std'(t)) z``, so ``S = int_0^1 sum_d (1 - sc_d - std_d'(t))^2 dt``."""
  t = np.linspace(0.0, 1.0, 200_001)[:, None]
  sc = np.asarray(g.scale)[None]
  std = np.sqrt((1 - t) ** 2 * sc ** 2 + t ** 2)
  dstd = (t - (1 - t) * sc ** 2) / std
  return float(np.trapezoid(np.sum((1 - sc - dstd) ** 2, -1), t[:, 0]))


def test_gaussian_flow_straightness_matches_its_closed_form():
  z = jax.random.normal(jax.random.key(0), (20_000, 2))
  v = lambda x, t: G.velocity(paths.linear(), x, t)
  s = float(jax.jit(lambda z_: straightness.straightness(v, z_, 1.0, 64, "rk4"))(z))
  np.testing.assert_allclose(s, closed_form(G), rtol=0.03)  # Monte Carlo over z: E z^2 = 1
  assert s > 0.05


def test_straight_flows_have_zero_straightness_at_any_speed_profile():
  """Constant velocity: S = 0. A straight path at varying speed is NOT straight in S's sense
  (``dZ/dtau`` differs from the chord), so S > 0 there: the measure is of constant-speed lines."""
  z = jax.random.normal(jax.random.key(1), (512, 2))
  const = lambda x, t: jnp.broadcast_to(jnp.array([0.5, -1.0]), x.shape)
  assert float(straightness.straightness(const, z, 1.0, 16)) < 1e-10
  speed = lambda x, t: jnp.broadcast_to(jnp.array([1.0, 0.0]), x.shape) * (2 * t[:, None])
  assert float(straightness.straightness(speed, z, 1.0, 64, "rk4")) > 0.3
  # TrigFlow time (T = pi/2): the chord over T times the velocity
  trig = lambda x, t: jnp.broadcast_to(jnp.array([0.3, 0.1]), x.shape)
  assert float(straightness.straightness(trig, z, jnp.pi / 2, 16)) < 1e-10
