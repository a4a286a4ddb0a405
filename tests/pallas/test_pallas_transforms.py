"""Pallas attention under transformations: the MeanFlow pattern, jit, vmap, checkpoint, scan.

``PallasTransformsTest`` needs a GPU/TPU; ``PallasTransformsInterpretTest`` runs on CPU.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from absl.testing import absltest, parameterized

import pallas_test_util as tu
from fmdistill import pallas
from fmdistill.pallas import attention, fused_attention

sg = jax.lax.stop_gradient


class PallasTransformsTest(parameterized.TestCase):
  INTERPRET = False

  def setUp(self):
    super().setUp()
    if not self.INTERPRET and jax.default_backend() not in ("gpu", "tpu"):
      self.skipTest("compiled Pallas kernels need a GPU or TPU (see the Interpret variant)")

  def attn(self, impl: str, **kw):
    if impl == "xla":
      return functools.partial(attention, impl="xla", **kw)
    return functools.partial(attention, impl="pallas", block_q=tu.BLOCK, block_k=tu.BLOCK,
                             interpret=self.INTERPRET, **kw)

  def test_meanflow_pattern(self):
    """grad_params || u - sg(v - t du/dt) ||^2 with (u, du/dt) = jvp of a 2-block net."""
    params = tu.init_net(0)
    z, v = tu.qkv(1, (tu.B, tu.N, 32), n=2)
    t = jnp.array([0.3, 0.8])

    def loss(params, impl):
      f = lambda z, t: tu.net(params, z, t, self.attn(impl, causal=False))
      u, dudt = jax.jvp(f, (z, t), (v, jnp.ones_like(t)))
      return jnp.mean((u - sg(v - t[:, None, None] * dudt)) ** 2)

    got = jax.jit(jax.value_and_grad(loss), static_argnums=1)(params, "pallas")
    want = jax.value_and_grad(loss)(params, "xla")
    tu.assert_close(got, want, 1e-5)

  def test_scm_pattern(self):
    """sCM-style: the JVP is taken at stop-gradiented params and only enters the target."""
    params = tu.init_net(2)
    z, v = tu.qkv(3, (tu.B, tu.N, 32), n=2)
    t = jnp.array([0.2, 0.6])

    def loss(params, impl):
      f = lambda p, z, t: tu.net(p, z, t, self.attn(impl))
      _, dfdt = jax.jvp(lambda z, t: f(sg(params), z, t), (z, t), (v, jnp.ones_like(t)))
      return jnp.mean(f(params, z, t) * sg(dfdt + z))

    got = jax.jit(jax.value_and_grad(loss), static_argnums=1)(params, "pallas")
    tu.assert_close(got, jax.value_and_grad(loss)(params, "xla"), 1e-5)

  def test_vmap(self):
    """vmap (with an unbatched operand and a batched mask) of forward, jvp and grad."""
    q, k, v = tu.qkv(4, (3, tu.B, tu.N, tu.H, tu.D))
    mask = jax.random.bernoulli(jax.random.PRNGKey(5), 0.8, (3, tu.B, tu.N))

    def run(impl):
      def one(q, k, v, m):
        f = lambda q, k: self.attn(impl, key_mask=m)(q, k, v)
        o, do = jax.jvp(f, (q, k), (jnp.cos(q), k))
        g = jax.grad(lambda q, k: jnp.sum(jnp.sin(f(q, k))), argnums=(0, 1))(q, k)
        return o, do, g
      return jax.jit(jax.vmap(one, in_axes=(0, 0, None, 0)))(q, k, v[0], mask)

    tu.assert_close(run("pallas"), run("xla"), 1e-5)

  def test_checkpoint_scan(self):
    """lax.scan over checkpointed attention layers: grad, jvp and the MeanFlow pattern."""
    x = tu.qkv(6, (tu.B, tu.N, tu.H, tu.D), n=1)[0]
    ws = 0.3 * tu.qkv(7, (2, tu.D, tu.D), n=1)[0]

    def model(ws, x, impl):
      @jax.checkpoint
      def layer(h, w):
        h = h + self.attn(impl, causal=True)(h @ w, h, jnp.tanh(h))
        return h, None
      return jax.lax.scan(layer, x, ws)[0]

    def losses(ws, impl):
      g = jax.grad(lambda ws: jnp.sum(model(ws, x, impl) ** 2))(ws)
      o, do = jax.jvp(lambda x: model(ws, x, impl), (x,), (jnp.sin(x),))
      mf = jax.grad(lambda ws: jnp.sum((jax.jvp(lambda x: model(ws, x, impl), (x,), (x,))[0]
                                        - sg(do)) ** 2))(ws)
      return g, o, do, mf

    got = jax.jit(losses, static_argnums=1)(ws, "pallas")
    tu.assert_close(got, losses(ws, "xla"), 1e-5)

  def test_grad_through_tangent(self):
    """Through the tangent: fine w.r.t. the tangent inputs, a clear error w.r.t. q/k/v."""
    q, k, v = tu.qkv(8)
    dq, dk, dv = tu.qkv(9)

    def tangent_loss(impl):
      return lambda q, dv: jnp.sum(jax.jvp(self.attn(impl), (q, k, v), (dq, dk, dv))[1] ** 2)

    got = jax.grad(lambda dv: tangent_loss("pallas")(q, dv))(dv)
    tu.assert_close(got, jax.grad(lambda dv: tangent_loss("xla")(q, dv))(dv), 1e-5)
    with self.assertRaisesRegex(NotImplementedError, "stop_gradient"):
      jax.grad(tangent_loss("pallas"))(q, dv)

  def test_higher_order_is_an_error(self):
    """jvp-of-jvp and grad-of-grad are documented as unsupported: they must not run."""
    q, k, v = tu.qkv(11)
    attn = lambda q: self.attn("pallas")(q, k, v)
    with self.assertRaises((TypeError, ValueError, NotImplementedError)):
      jax.jvp(lambda q: jax.jvp(attn, (q,), (k,))[1], (q,), (v,))
    with self.assertRaises((TypeError, ValueError, NotImplementedError)):
      jax.grad(lambda q: jnp.sum(jax.grad(lambda q: jnp.sum(attn(q) ** 2))(q) ** 2))(q)

  def test_impl_dispatch(self):
    q, k, v = tu.qkv(10)
    jaxpr = lambda impl: str(jax.make_jaxpr(functools.partial(attention, impl=impl))(q, k, v))
    accel = jax.default_backend() in ("gpu", "tpu")
    self.assertEqual(pallas.resolve_impl("auto"), "pallas" if accel else "xla")
    self.assertEqual("pallas_call" in jaxpr("auto"), accel)
    self.assertIn("pallas_call", jaxpr("pallas"))  # never silently falls back
    self.assertNotIn("pallas_call", jaxpr("xla"))
    with self.assertRaises(ValueError):
      attention(q, k, v, impl="triton")


class PallasTransformsInterpretTest(PallasTransformsTest):
  INTERPRET = True


if __name__ == "__main__":
  absltest.main()
