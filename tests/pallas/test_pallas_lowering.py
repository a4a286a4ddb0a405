"""The kernels lower for CUDA (Triton) and TPU (Mosaic) without a device (``jax.export``).

For every transform (value, jvp, grad, grad through the primal of a jvp with the tangent
under ``stop_gradient``, grad through the tangent, grad through both) this runs the
Python-side Pallas -> Triton IR and Pallas -> Mosaic lowering of every kernel involved, checks
that the lowered program launches as many kernels as ``pallas_call_count`` says and has no
N x N tensor, while the XLA reference's program has one. It does not compile or run the
kernels (no ptxas / libtpu here); the non-interpret test classes do that on a GPU/TPU.
"""
from __future__ import annotations

import re

import jax
import jax.numpy as jnp
from absl.testing import absltest, parameterized
from jax import export

from fmdistill.pallas import attention, pallas_attention
from fmdistill.pallas.kernel_count import pallas_call_count

N = 256
TARGETS = {"cuda": "__gpu$xla.gpu.triton", "tpu": "tpu_custom_call"}
KERNELS = {"value": 1, "jvp": 1, "grad": 3, "grad_primal": 3, "grad_tangent": 3,
           "grad_both": 3}
sg = jax.lax.stop_gradient


def _attn(impl: str, platform: str):
  if impl == "xla":
    return lambda q, k, v: attention(q, k, v, impl="xla", causal=True)
  # What make_spec picks on that platform (tracing happens on this CPU host).
  kw = dict(block_q=128, block_k=128, head_major=True) if platform == "tpu" else {}
  return lambda q, k, v: pallas_attention(q, k, v, causal=True, interpret=False, **kw)


def transform(name: str, attn):
  """``(q, k, v, dq, dk, dv) -> ...`` for one transform of ``attn``."""
  jvp = lambda q, k, v, dq, dk, dv: jax.jvp(attn, (q, k, v), (dq, dk, dv))
  losses = {"grad_primal": lambda o, do: jnp.sum((o - sg(do)) ** 2),
            "grad_tangent": lambda o, do: jnp.sum(do ** 2),
            "grad_both": lambda o, do: jnp.sum(o ** 2 + jnp.sin(do))}
  if name == "value":
    return lambda q, k, v, *_: attn(q, k, v)
  if name == "jvp":
    return jvp
  if name == "grad":
    return jax.grad(lambda q, k, v, *_: jnp.sum(attn(q, k, v) ** 2), argnums=(0, 1, 2))
  return jax.grad(lambda *a: losses[name](*jvp(*a)), argnums=range(6))


def _stablehlo(fn, platform: str, kv_heads: int = 8) -> str:
  s = jax.ShapeDtypeStruct((1, N, 8, 64), jnp.float32)
  kv = jax.ShapeDtypeStruct((1, N, kv_heads, 64), jnp.float32)
  old = jax.config.jax_pallas_use_mosaic_gpu
  # On a GPU the kernels pass Triton compiler params; here the host is CPU, so pick Triton
  # through the config flag instead.
  jax.config.update("jax_pallas_use_mosaic_gpu", False)
  try:
    checks = [export.DisabledSafetyCheck.custom_call(TARGETS[platform])]
    exp = export.export(jax.jit(fn), platforms=[platform], disabled_checks=checks)(
        s, kv, kv, s, kv, kv)
  finally:
    jax.config.update("jax_pallas_use_mosaic_gpu", old)
  return exp.mlir_module()


def _has_square(text: str) -> bool:
  return re.search(rf"\b{N}x{N}x", text) is not None or f"x{N}x{N}x" in text


class PallasLoweringTest(parameterized.TestCase):

  @parameterized.parameters("cuda", "tpu")
  def test_lowering_without_square_tensors(self, platform):
    s = jax.ShapeDtypeStruct((1, N, 8, 64), jnp.float32)
    for name, kernels in KERNELS.items():
      with self.subTest(name):
        fn = transform(name, _attn("pallas", platform))
        text = _stablehlo(fn, platform)
        self.assertEqual(pallas_call_count(fn, *[s] * 6), kernels)
        self.assertEqual(text.count(f"custom_call @{TARGETS[platform]}"), kernels)
        self.assertFalse(_has_square(text))
        self.assertTrue(_has_square(_stablehlo(transform(name, _attn("xla", platform)),
                                               platform)))

  @parameterized.parameters("cuda", "tpu")
  def test_grouped_query_heads_lower(self, platform):
    """8 query heads sharing 2 key/value heads: same kernels, key-side BlockSpecs mapped."""
    text = _stablehlo(transform("grad_both", _attn("pallas", platform)), platform, kv_heads=2)
    self.assertEqual(text.count(f"custom_call @{TARGETS[platform]}"), KERNELS["grad_both"])
    self.assertFalse(_has_square(text))


if __name__ == "__main__":
  absltest.main()
