"""The hard case on the real model: the MeanFlow pattern through a 2-block DiT.

``F, dF = jax.jvp(F_theta, (x, t, s), (v, 1, 0))``, target ``v - (t - s) dF`` under
``stop_gradient``, loss ``||F - target||^2`` differentiated in the parameters: with
``attn_impl='pallas'`` (flash kernels, custom JVP rule, interpret mode on CPU) the loss and
every parameter gradient equal the XLA reference's.
"""
import jax
import jax.numpy as jnp
import numpy as np

from fmdistill import models
from fmdistill.config import base


def _loss_and_grad(impl: str):
  cfg = base("flow_matching").model
  cfg.update(name="dit", width=32, depth=2, heads=2, patch=2, attn_impl=impl)
  net, params = models.build(cfg, (8, 8, 1), 10, jax.random.key(0))
  # leave the zero-initialised adaLN/output layers non-zero so attention matters
  params = jax.tree_util.tree_map(
      lambda p: p + 0.05 * jax.random.normal(jax.random.key(7), p.shape), params)
  k1, k2, k3 = jax.random.split(jax.random.key(1), 3)
  x = jax.random.normal(k1, (3, 8, 8, 1))
  v = jax.random.normal(k2, (3, 8, 8, 1))
  t = jnp.array([0.9, 0.6, 0.3])
  s = jnp.array([0.2, 0.1, 0.3])
  cond = jnp.array([1, 4, 10])

  def loss(p):
    f = lambda x_, t_, s_: net(p, x_, t_, s_, cond)
    out, dout = jax.jvp(f, (x, t, s), (v, jnp.ones_like(t), jnp.zeros_like(s)))
    target = jax.lax.stop_gradient(v - (t - s)[:, None, None, None] * dout)
    return jnp.mean((out - target) ** 2)
  return jax.jit(jax.value_and_grad(loss))(params)


def test_meanflow_pattern_on_dit_pallas_equals_xla():
  lx, gx = _loss_and_grad("xla")
  lp, gp = _loss_and_grad("pallas")
  np.testing.assert_allclose(lp, lx, rtol=1e-5)
  flat_x, flat_p = jax.tree_util.tree_leaves(gx), jax.tree_util.tree_leaves(gp)
  for a, b in zip(flat_x, flat_p):
    np.testing.assert_allclose(b, a, rtol=2e-4, atol=2e-6)
  assert max(float(jnp.abs(a).max()) for a in flat_x) > 1e-3  # the gradient is not trivial
