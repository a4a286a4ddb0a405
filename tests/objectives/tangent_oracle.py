"""Exact Gaussian flow maps as plug-in networks, and their analytic derivatives (test helpers).

For ``N(mu, diag(sc^2))`` data the flow map is ``f(x, t, s) = m_s + (std_s / std_t)(x - m_t)``
(``fmdistill.oracle``). The network-level ``F`` of a parameterisation is ``(f - c_skip x) /
c_out``, which cancels catastrophically in float32 as ``c_out -> 0``; the closed forms below
divide the ``(s - t)`` / ``sin t`` factors out symbolically, so they are accurate for every
``(t, s)`` (and equal the velocity at ``s = t``).
"""
import jax
import jax.numpy as jnp

from fmdistill import oracle, paths

G = oracle.Gaussian(jnp.array([1.0, -0.5]), jnp.array([0.4, 0.7]))
G_OTHER = oracle.Gaussian(jnp.array([0.3, 0.2]), jnp.array([0.9, 0.5]))  # a wrong map
LINEAR = paths.linear()


def _b(a, x):
  return paths.bcast(a, x)


def linear_F(g):
  """Displacement ``F(x, t, s)`` of ``g``'s exact map on the linear path (stable closed form):
  ``F = -mu + [(s + t) - sc^2 (2 - s - t)] / ((std_s + std_t) std_t) (x - m_t)``."""
  def F(x, t, s):
    sc2 = g.scale ** 2
    std = lambda u: jnp.sqrt((1 - _b(u, x)) ** 2 * sc2 + _b(u, x) ** 2)
    num = (_b(s, x) + _b(t, x)) - sc2 * (2 - _b(s, x) - _b(t, x))
    m_t = (1 - _b(t, x)) * g.mu
    return -g.mu + num / ((std(s) + std(t)) * std(t)) * (x - m_t)
  return F


def linear_NN2(g):
  """``NN`` of the second-order form ``F = v(x, t) + (s - t) NN`` (stable closed form)."""
  def NN(x, t, s):
    sc2 = g.scale ** 2
    var = lambda u: (1 - _b(u, x)) ** 2 * sc2 + _b(u, x) ** 2
    num = lambda u: (_b(u, x) + _b(t, x)) - sc2 * (2 - _b(u, x) - _b(t, x))
    st, ss = jnp.sqrt(var(t)), jnp.sqrt(var(s))
    d_t, d_s = 2 * st * st, (ss + st) * st
    m_t = (1 - _b(t, x)) * g.mu
    return ((1 + sc2) * d_t - num(t) * num(s) * st / (ss + st)) / (d_s * d_t) * (x - m_t)
  return NN


def trigflow_cm_F(g, sigma_d):
  """sCM's ``F(x / sigma_d, t, 0)`` of ``g``'s exact map on TrigFlow, as a function of the
  network input ``x' = x / sigma_d``: ``cos t x - f = sigma_d sin t (A x - B mu)``."""
  def F(x_in, t, s):
    del s
    x = x_in * sigma_d
    c, sn, sc = jnp.cos(_b(t, x)), jnp.sin(_b(t, x)), g.scale
    std = jnp.sqrt(c ** 2 * sc ** 2 + sigma_d ** 2 * sn ** 2)
    A = sn * (c ** 2 * sigma_d ** 2 - (1 + c ** 2) * sc ** 2) / (sigma_d * std * (c * std + sc))
    B = sigma_d * sn / (std * (std + sc * c))
    return A * x - B * g.mu
  return F


def plug(F):
  """``net(params, x, t, s, cond) = a F(x, t, s) + b`` with ``params = {'a', 'b'}``."""
  return lambda p, x, t, s, cond=None: p["a"] * F(x, t, s) + p["b"]


def facm_plug(F, g, path=LINEAR):
  """FACM's network: the exact ``F`` for ``t <= 1`` and the exact velocity at the anchor times
  ``t' = 1 + t`` (``t' > 1``)."""
  def net(p, x, t, s, cond=None):
    anchor = _b(t > 1.0, x)
    out = jnp.where(anchor, g.velocity(path, x, t - 1.0), F(x, t, s))
    return p["a"] * out + p["b"]
  return net


def exact_params(d=2):
  return {"a": jnp.float32(1.0), "b": jnp.zeros((d,), jnp.float32)}


def map_derivatives(g, path, x, t, s):
  """``(f, d_t f, grad_x f (diagonal), d_s f)`` of ``g``'s exact map, analytically."""
  m_t, dm_t, std_t, dstd_t = g._moments(path, t, x)
  m_s, dm_s, std_s, dstd_s = g._moments(path, s, x)
  k = std_s / std_t
  f = m_s + k * (x - m_t)
  d_t = -(std_s * dstd_t / std_t ** 2) * (x - m_t) - k * dm_t
  d_s = dm_s + dstd_s / std_t * (x - m_t)
  return f, d_t, k, d_s


def eulerian_derivative(g, path, x, t, s, v):
  """``d/dt f(x_t, t, s)`` of ``g``'s map along ``dx_t/dt = v``: ``d_t f + (grad_x f) v``."""
  _, d_t, k, _ = map_derivatives(g, path, x, t, s)
  return d_t + k * v


def jit(fn, **kw):
  """``jax.jit`` with XLA's backend optimisation off: these tests compile many small graphs
  once each, and on CPU compilation dominates their run time (about 2x faster this way)."""
  return jax.jit(fn, compiler_options={"xla_backend_optimization_level": 0}, **kw)


def joint_parts(name, cfg, key=None):
  """Initial parameters of the method's parts trained jointly with the student (sCM's and
  AYF's learned weighting), as the loss's keyword arguments: ``{'weighting': ...}`` or {}."""
  import types
  from fmdistill import objectives
  key = jax.random.key(0) if key is None else key
  ctx = types.SimpleNamespace(config=types.SimpleNamespace(objective=cfg))
  parts = objectives.entry(name).parts_for(cfg)
  return {n: p.init(jax.random.fold_in(key, i), ctx)
          for i, (n, p) in enumerate(sorted(parts.items())) if p.joint}
