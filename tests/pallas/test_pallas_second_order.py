"""Gradients through the attention tangent: ``jax.grad`` of a loss on ``(o, do) = jax.jvp(...)``.

Improved MeanFlow and TVM differentiate a loss on ``do``; every case differentiates
``w_o * sum(sin(o)) + w_t * sum(cos(do) * do)`` in all six inputs ``(q, k, v, dq, dk, dv)``
and compares with the same on the XLA reference. ``PallasSecondOrderTest`` runs the compiled
kernels (GPU/TPU); ``PallasSecondOrderInterpretTest`` the same checks with
``interpret=True`` on CPU.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from absl.testing import absltest, parameterized

import pallas_test_util as tu
from fmdistill.pallas import attention, attention_jvp, attention_reference, pallas_attention


def _loss(jvp, w_o: float, w_t: float):
  """``(q, k, v, dq, dk, dv) -> scalar`` of ``(o, do) = jvp(q, k, v, dq, dk, dv)``."""
  def loss(q, k, v, dq, dk, dv):
    o, do = (x.astype(jnp.float32) for x in jvp(q, k, v, dq, dk, dv))
    return w_o * jnp.sum(jnp.sin(o)) + w_t * jnp.sum(jnp.cos(do) * do)
  return loss


def _jvp_of(attn):
  return lambda q, k, v, dq, dk, dv: jax.jvp(attn, (q, k, v), (dq, dk, dv))


class PallasSecondOrderTest(parameterized.TestCase):
  INTERPRET = False

  def setUp(self):
    super().setUp()
    if not self.INTERPRET and jax.default_backend() not in ("gpu", "tpu"):
      self.skipTest("compiled Pallas kernels need a GPU or TPU (see the Interpret variant)")

  def inputs(self, nk=None, d=tu.D, dtype=jnp.float32):
    shape = (tu.B, tu.N, tu.H, d)
    return (*tu.qkv(0, shape, nk=nk, dtype=dtype), *tu.qkv(7, shape, nk=nk, dtype=dtype))

  def check(self, pal_jvp, ref_jvp, args, w_o=1.0, w_t=1.0, tol=tu.TOL[jnp.float32]):
    grad = lambda jvp: jax.value_and_grad(_loss(jvp, w_o, w_t), argnums=range(6))
    got = jax.jit(grad(pal_jvp))(*args)
    f32 = tuple(x.astype(jnp.float32) for x in args)
    want = grad(ref_jvp)(*f32)
    self.assertTrue(all(g.dtype == a.dtype for g, a in zip(got[1], args)))
    tu.assert_close((got[0], tuple(g.astype(jnp.float32) for g in got[1])), want, tol)

  @parameterized.named_parameters(
      ("self_masked", dict(masked=True)),
      ("causal_tangent_loss_only", dict(causal=True, w_o=0.0)),
      ("cross_masked_odd_head_dim", dict(masked=True, nk=23, d=24)),
      ("uneven_blocks_custom_scale", dict(causal=True, scale=0.3, block_k=32)),
  )
  def test_grad_through_tangent(self, masked=False, causal=False, nk=None, d=tu.D, scale=None,
                                block_k=tu.BLOCK, w_o=1.0):
    args = self.inputs(nk, d)
    mask = tu.key_mask(1, tu.B, args[1].shape[1]) if masked else None
    kw = dict(key_mask=mask, causal=causal, scale=scale)
    pal = functools.partial(attention, impl="pallas", block_q=tu.BLOCK, block_k=block_k,
                            interpret=self.INTERPRET, **kw)
    ref = functools.partial(attention_reference, **kw)
    self.check(_jvp_of(pal), _jvp_of(ref), args, w_o=w_o)

  @parameterized.parameters(None, 23)
  def test_bf16(self, nk):
    """bf16 inputs and cotangents; the reference runs in float32 on the same bf16 inputs."""
    args = self.inputs(nk, dtype=jnp.bfloat16)
    mask = tu.key_mask(1, tu.B, args[1].shape[1])
    pal = functools.partial(attention, key_mask=mask, impl="pallas", block_q=tu.BLOCK,
                            block_k=tu.BLOCK, interpret=self.INTERPRET)
    ref = functools.partial(attention_reference, key_mask=mask)
    self.check(_jvp_of(pal), _jvp_of(ref), args, tol=tu.TOL[jnp.bfloat16])

  def test_grouped_query_heads(self):
    """GQA (2 query heads per key/value head), cross-attention with a key mask."""
    q, dq = tu.qkv(2, (tu.B, tu.N, 4, tu.D), n=2)
    k, v, dk, dv = tu.qkv(3, (tu.B, 23, 2, tu.D), n=4)
    mask = tu.key_mask(1, tu.B, 23)
    pal = functools.partial(attention, key_mask=mask, impl="pallas", block_q=tu.BLOCK,
                            block_k=tu.BLOCK, interpret=self.INTERPRET)
    ref = functools.partial(attention_reference, key_mask=mask)
    self.check(_jvp_of(pal), _jvp_of(ref), (q, k, v, dq, dk, dv))

  def test_public_attention_jvp_head_major(self):
    """``attention_jvp`` (the one-pass kernel called directly) is differentiable the same
    way, here in the head-major (TPU) layout with a causal mask and one shared key/value
    head (multi-query attention)."""
    q, k, v, dq, dk, dv = self.inputs()
    args = (q, k[:, :, :1], v[:, :, :1], dq, dk[:, :, :1], dv[:, :, :1])
    mask = tu.key_mask(1, tu.B, tu.N)
    pal = functools.partial(attention_jvp, key_mask=mask, causal=True, block_q=tu.BLOCK,
                            block_k=tu.BLOCK, interpret=self.INTERPRET, head_major=True)
    ref = functools.partial(attention_reference, key_mask=mask, causal=True)
    self.check(pal, _jvp_of(ref), args)

  def test_checkpointed(self):
    """Under ``jax.checkpoint`` (jvp + partial-eval linearisation) the same gradients."""
    args = self.inputs()
    pal = jax.checkpoint(functools.partial(pallas_attention, block_q=tu.BLOCK,
                                           block_k=tu.BLOCK, interpret=self.INTERPRET))
    self.check(_jvp_of(pal), _jvp_of(attention_reference), args)


class PallasSecondOrderInterpretTest(PallasSecondOrderTest):
  INTERPRET = True


if __name__ == "__main__":
  absltest.main()
