"""Pallas attention under transformations: MeanFlow and improved-MeanFlow patterns, jit, vmap,
checkpoint, scan, and the number of kernels each transform launches.

``PallasTransformsTest`` needs a GPU/TPU; ``PallasTransformsInterpretTest`` runs on CPU.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from absl.testing import absltest, parameterized

import pallas_test_util as tu
from fmdistill import pallas
from fmdistill.pallas import _primitives, attention
from fmdistill.pallas.kernel_count import pallas_call_count

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

  def test_imf_pattern(self):
    """Improved MeanFlow: grad_params || u + t du/dt - v ||^2, the gradient through du/dt."""
    params = tu.init_net(4)
    z, v = tu.qkv(5, (tu.B, tu.N, 32), n=2)
    t = jnp.array([0.4, 0.9])

    def loss(params, impl):
      f = lambda z, t: tu.net(params, z, t, self.attn(impl, causal=True))
      u, dudt = jax.jvp(f, (z, t), (v, jnp.ones_like(t)))
      return jnp.mean((u + t[:, None, None] * dudt - v) ** 2)

    got = jax.jit(jax.value_and_grad(loss), static_argnums=1)(params, "pallas")
    tu.assert_close(got, jax.value_and_grad(loss)(params, "xla"), 1e-5)

  def test_vmap(self):
    """vmap (with an unbatched operand and a batched mask) of forward, jvp, grad and grad
    through the tangent."""
    q, k, v = tu.qkv(4, (3, tu.B, tu.N, tu.H, tu.D))
    mask = jax.random.bernoulli(jax.random.PRNGKey(5), 0.8, (3, tu.B, tu.N))

    def run(impl):
      def one(q, k, v, m):
        f = lambda q, k: self.attn(impl, key_mask=m)(q, k, v)
        o, do = jax.jvp(f, (q, k), (jnp.cos(q), k))
        g = jax.grad(lambda q, k: jnp.sum(jnp.sin(f(q, k))), argnums=(0, 1))(q, k)
        gt = jax.grad(lambda q, k: jnp.sum(jnp.sin(jax.jvp(f, (q, k), (k, q))[1])),
                      argnums=(0, 1))(q, k)
        return o, do, g, gt
      return jax.jit(jax.vmap(one, in_axes=(0, 0, None, 0)))(q, k, v[0], mask)

    tu.assert_close(run("pallas"), run("xla"), 1e-5)

  def test_checkpoint_scan(self):
    """lax.scan over checkpointed attention layers: grad, jvp, MeanFlow and iMF patterns."""
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
      jvp = lambda ws: jax.jvp(lambda x: model(ws, x, impl), (x,), (x,))
      mf = jax.grad(lambda ws: jnp.sum((jvp(ws)[0] - sg(do)) ** 2))(ws)
      imf = jax.grad(lambda ws: jnp.sum(jnp.sin(jvp(ws)[1]) + jvp(ws)[0] ** 2))(ws)
      return g, o, do, mf, imf

    got = jax.jit(losses, static_argnums=1)(ws, "pallas")
    tu.assert_close(got, losses(ws, "xla"), 1e-5)

  def test_higher_order_is_an_error(self):
    """jvp-of-jvp, Hessian-vector products and grad-of-grad raise, they never run."""
    q, k, v = tu.qkv(11)
    attn = lambda q: self.attn("pallas")(q, k, v)
    sq = lambda f: lambda q: jnp.sum(f(q) ** 2)
    cases = {
        "jvp of jvp": lambda: jax.jvp(lambda q: jax.jvp(attn, (q,), (k,))[1], (q,), (v,)),
        "hvp": lambda: jax.jvp(jax.grad(sq(attn)), (q,), (k,)),
        "grad of grad": lambda: jax.grad(sq(jax.grad(sq(attn))))(q),
    }
    for name, fn in cases.items():
      with self.subTest(name), self.assertRaisesRegex(NotImplementedError, "third derivative"):
        fn()

  def test_kernel_counts(self):
    """Kernel launches per transform, so that a regression (e.g. jvp falling back to a
    forward + tangent pair, or a second backward pass) cannot go unnoticed."""
    s = jax.ShapeDtypeStruct((1, 64, 2, 16), jnp.float32)
    attn = self.attn("pallas")
    jvp = lambda q, k, v, dq, dk, dv: jax.jvp(attn, (q, k, v), (dq, dk, dv))

    def grad_of(loss):
      return jax.grad(lambda *a: loss(*jvp(*a)), argnums=range(6))

    fns = {
        "value": lambda q, k, v, *_: attn(q, k, v),
        "jvp": jvp,
        "grad": jax.grad(lambda q, k, v, *_: jnp.sum(attn(q, k, v) ** 2), argnums=(0, 1, 2)),
        "grad through primal of jvp": grad_of(lambda o, do: jnp.sum((o - sg(do)) ** 2)),
        "grad through tangent": grad_of(lambda o, do: jnp.sum(do ** 2)),
        "grad through both": grad_of(lambda o, do: jnp.sum(o ** 2 + do ** 2)),
        "grad, checkpointed": jax.grad(
            lambda q, *_: jnp.sum(jax.checkpoint(attn)(q, q, q) ** 2)),
    }
    want = {"value": 1, "jvp": 1}
    got = {name: pallas_call_count(fn, *[s] * 6) for name, fn in fns.items()}
    self.assertEqual(got, {name: want.get(name, 3) for name in fns})

  def test_impl_dispatch(self):
    q, k, v = tu.qkv(10)
    jaxpr = lambda impl: str(jax.make_jaxpr(functools.partial(attention, impl=impl))(q, k, v))
    accel = jax.default_backend() in ("gpu", "tpu")
    self.assertEqual(pallas.resolve_impl("auto"), "pallas" if accel else "xla")
    count = lambda impl: pallas_call_count(functools.partial(attention, impl=impl), q, k, v)
    self.assertEqual(count("auto") > 0, accel)
    self.assertEqual(count("pallas"), 1)  # never silently falls back
    self.assertEqual(count("xla"), 0)
    self.assertIn(_primitives.fwd_p.name, jaxpr("pallas"))
    with self.assertRaises(ValueError):
      attention(q, k, v, impl="triton")


class PallasTransformsInterpretTest(PallasTransformsTest):
  INTERPRET = True


if __name__ == "__main__":
  absltest.main()
