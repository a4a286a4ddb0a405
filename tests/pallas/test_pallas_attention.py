"""Pallas flash attention vs the XLA reference: forward, gradient and JVP.

``PallasAttentionTest`` runs the compiled kernels (skipped without a GPU/TPU);
``PallasAttentionInterpretTest`` runs the same checks with ``interpret=True`` on CPU.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from absl.testing import absltest, parameterized

import pallas_test_util as tu
from fmdistill.pallas import (_common, _primitives, attention, attention_jvp,
                              attention_reference, pallas_attention)


def _loss(attn):
  """A non-linear scalar of the attention output, to get non-trivial cotangents."""
  return lambda q, k, v: jnp.sum(jnp.sin(attn(q, k, v).astype(jnp.float32)) ** 2)


class PallasAttentionTest(parameterized.TestCase):
  INTERPRET = False

  def setUp(self):
    super().setUp()
    if not self.INTERPRET and jax.default_backend() not in ("gpu", "tpu"):
      self.skipTest("compiled Pallas kernels need a GPU or TPU (see the Interpret variant)")

  def fns(self, *, key_mask=None, causal=False, block=tu.BLOCK):
    """(pallas, reference) attention closures with the same options."""
    pal = functools.partial(attention, key_mask=key_mask, causal=causal, impl="pallas",
                            block_q=block, block_k=block, interpret=self.INTERPRET)
    ref = functools.partial(attention_reference, key_mask=key_mask, causal=causal)
    return pal, ref

  def case(self, causal, masked, dtype=jnp.float32, nk=None, d=tu.D):
    q, k, v = tu.qkv(0, (tu.B, tu.N, tu.H, d), nk=nk, dtype=dtype)
    mask = tu.key_mask(1, tu.B, k.shape[1]) if masked else None
    return (q, k, v), self.fns(key_mask=mask, causal=causal)

  @parameterized.product(causal=(False, True), masked=(False, True))
  def test_forward(self, causal, masked):
    args, (pal, ref) = self.case(causal, masked)
    out = jax.jit(pal)(*args)
    tu.assert_close(out, ref(*args), tu.TOL[jnp.float32])
    if masked:  # last batch row has every key masked -> zeros, not NaN
      self.assertEqual(float(jnp.abs(out[-1]).max()), 0.0)

  @parameterized.product(causal=(False, True), masked=(False, True))
  def test_grad(self, causal, masked):
    args, (pal, ref) = self.case(causal, masked)
    got = jax.jit(jax.grad(_loss(pal), argnums=(0, 1, 2)))(*args)
    tu.assert_close(got, jax.grad(_loss(ref), argnums=(0, 1, 2))(*args), tu.TOL[jnp.float32])

  @parameterized.product(causal=(False, True), masked=(False, True))
  def test_jvp(self, causal, masked):
    args, (pal, ref) = self.case(causal, masked)
    tangents = tuple(tu.qkv(7, args[0].shape, nk=args[1].shape[1]))
    got = jax.jit(lambda p, t: jax.jvp(pal, p, t))(args, tangents)
    tu.assert_close(got, jax.jvp(ref, args, tangents), tu.TOL[jnp.float32])

  @parameterized.parameters(False, True)
  def test_online_jvp_kernel(self, causal):
    (q, k, v), (_, ref) = self.case(causal, True)
    dq, dk, dv = tu.qkv(7)
    got = attention_jvp(q, k, v, dq, dk, dv, key_mask=tu.key_mask(1, tu.B, tu.N),
                        causal=causal, block_q=tu.BLOCK, block_k=tu.BLOCK,
                        interpret=self.INTERPRET)
    tu.assert_close(got, jax.jvp(ref, (q, k, v), (dq, dk, dv)), tu.TOL[jnp.float32])

  def test_cross_attention_odd_head_dim(self):
    """Nq != Nk (both unaligned to the block) and D = 24 (padded to 32 in the kernel)."""
    args, (pal, ref) = self.case(False, True, nk=23, d=24)
    tangents = tuple(tu.qkv(7, args[0].shape, nk=23))
    tu.assert_close(jax.jvp(pal, args, tangents), jax.jvp(ref, args, tangents),
                    tu.TOL[jnp.float32])
    tu.assert_close(jax.grad(_loss(pal), argnums=(0, 1, 2))(*args),
                    jax.grad(_loss(ref), argnums=(0, 1, 2))(*args), tu.TOL[jnp.float32])

  def test_grouped_query_heads(self):
    """GQA: 4 query heads share 2 key/value heads (cross-attention, masked)."""
    q = tu.qkv(2, (tu.B, tu.N, 4, tu.D), n=1)[0]
    k, v = tu.qkv(3, (tu.B, 23, 2, tu.D), n=2)
    mask = tu.key_mask(1, tu.B, 23)
    pal, ref = self.fns(key_mask=mask)
    dq = jnp.cos(q)
    tangents = (dq, jnp.sin(k), v * 0.5)
    tu.assert_close(jax.jvp(pal, (q, k, v), tangents), jax.jvp(ref, (q, k, v), tangents),
                    tu.TOL[jnp.float32])
    tu.assert_close(jax.grad(_loss(pal), argnums=(0, 1, 2))(q, k, v),
                    jax.grad(_loss(ref), argnums=(0, 1, 2))(q, k, v), tu.TOL[jnp.float32])
    with self.assertRaisesRegex(ValueError, "multiple"):
      pal(q, k[:, :, :1].repeat(3, axis=2), v[:, :, :1].repeat(3, axis=2))

  def test_uneven_blocks_and_scale(self):
    """block_q != block_k with a causal mask and a custom softmax scale."""
    q, k, v = tu.qkv(3)
    pal = functools.partial(attention, causal=True, scale=0.3, impl="pallas", block_q=16,
                            block_k=32, interpret=self.INTERPRET)
    ref = functools.partial(attention_reference, causal=True, scale=0.3)
    tangents = tuple(tu.qkv(8))
    tu.assert_close(jax.jvp(pal, (q, k, v), tangents), jax.jvp(ref, (q, k, v), tangents),
                    tu.TOL[jnp.float32])
    tu.assert_close(jax.grad(_loss(pal), argnums=(0, 1, 2))(q, k, v),
                    jax.grad(_loss(ref), argnums=(0, 1, 2))(q, k, v), tu.TOL[jnp.float32])

  @parameterized.parameters(False, True)
  def test_bf16(self, causal):
    """bf16 in and out; compared with the float32 reference on the same bf16 inputs."""
    args, (pal, ref) = self.case(causal, True, dtype=jnp.bfloat16)
    tangents = tuple(tu.qkv(7, dtype=jnp.bfloat16))
    f32 = lambda xs: tuple(x.astype(jnp.float32) for x in xs)
    o, do = jax.jit(lambda p, t: jax.jvp(pal, p, t))(args, tangents)
    self.assertEqual((o.dtype, do.dtype), (jnp.bfloat16, jnp.bfloat16))
    ro, rdo = jax.jvp(ref, f32(args), f32(tangents))
    tu.assert_close(f32((o, do)), (ro, rdo), tu.TOL[jnp.bfloat16])
    grads = jax.jit(jax.grad(_loss(pal), argnums=(0, 1, 2)))(*args)
    self.assertTrue(all(g.dtype == jnp.bfloat16 for g in grads))
    tu.assert_close(f32(grads), jax.grad(_loss(ref), argnums=(0, 1, 2))(*f32(args)),
                    tu.TOL[jnp.bfloat16])

  def test_head_major_layout(self):
    """The head-major kernel layout (picked on TPU) gives the same jvp and grad."""
    args, (_, ref) = self.case(True, True, d=24)
    pal = functools.partial(pallas_attention, key_mask=tu.key_mask(1, tu.B, tu.N),
                            causal=True, block_q=tu.BLOCK, block_k=tu.BLOCK,
                            interpret=self.INTERPRET, head_major=True)
    tangents = tuple(tu.qkv(7, args[0].shape))
    tu.assert_close(jax.jvp(pal, args, tangents), jax.jvp(ref, args, tangents),
                    tu.TOL[jnp.float32])
    tu.assert_close(jax.grad(_loss(pal), argnums=(0, 1, 2))(*args),
                    jax.grad(_loss(ref), argnums=(0, 1, 2))(*args), tu.TOL[jnp.float32])

  def test_row_statistics_and_tangent_transpose(self):
    """lse and mu = rowsum(P * dS) of the forward, one-pass and tangent kernels, and the
    tangent kernel's transpose with cotangents on both do and mu."""
    q, k, v = tu.qkv(5)
    dq, dk, dv = tu.qkv(6)
    mask = tu.key_mask(6, tu.B, tu.N).at[-1, 0].set(True)  # keep lse finite in every row
    spec = _common.make_spec(q, k, causal=True, scale=None, block_q=tu.BLOCK,
                             block_k=tu.BLOCK, interpret=self.INTERPRET)
    kvalid = _common.default_kvalid(k, mask)
    causal = jnp.tril(jnp.ones((tu.N, tu.N), bool))

    def ref(dq, dk, dv):
      score = lambda a, b: jnp.einsum("bqhd,bkhd->bhqk", a, b) * spec.scale
      s = jnp.where(mask[:, None, None, :] & causal, score(q, k), -jnp.inf)
      p = jax.nn.softmax(s, axis=-1)
      mu = jnp.sum(p * (score(dq, k) + score(q, dk)), axis=-1)
      f = lambda q, k, v: attention_reference(q, k, v, key_mask=mask, causal=True)
      return jax.jvp(f, (q, k, v), (dq, dk, dv))[1], mu, jax.nn.logsumexp(s, axis=-1)

    do_ref, mu_ref, lse_ref = ref(dq, dk, dv)
    o, lse = _primitives.fwd_p.bind(q, k, v, kvalid, spec=spec)
    tol = tu.TOL[jnp.float32]
    tu.assert_close(lse, lse_ref, tol)
    tu.assert_close(_primitives.jvp_p.bind(q, k, v, kvalid, dq, dk, dv, spec=spec)[1:],
                    (do_ref, lse_ref, mu_ref), tol)
    tangent = lambda dq, dk, dv: tuple(_primitives.tangent_p.bind(
        q, k, v, kvalid, o, lse, dq, dk, dv, spec=spec))
    tu.assert_close(tangent(dq, dk, dv), (do_ref, mu_ref), tol)
    cts = (jnp.cos(do_ref), jnp.sin(mu_ref))
    got = jax.linear_transpose(tangent, dq, dk, dv)(cts)
    tu.assert_close(got, jax.vjp(lambda *t: ref(*t)[:2], dq, dk, dv)[1](cts), tol)


class PallasAttentionInterpretTest(PallasAttentionTest):
  INTERPRET = True


if __name__ == "__main__":
  absltest.main()
