"""The kernels lower to Triton for CUDA without a GPU (``jax.export``; no compile or run).

This checks the Pallas -> Triton IR lowering of every kernel (forward, tangent, both backward
kernels, the one-pass online JVP) on the MeanFlow pattern, and that the lowered program has
no N x N tensor while the XLA reference's does. Compiling and running on a GPU is covered by
the non-interpret test classes, which need a GPU.
"""
from __future__ import annotations

import re

import jax
import jax.numpy as jnp
from absl.testing import absltest
from jax import export

from fmdistill.pallas import attention, attention_jvp

N = 256
TRITON = "__gpu$xla.gpu.triton"


def _meanflow(impl: str):
  attn = lambda q, k, v: attention(q, k, v, impl=impl, causal=True, interpret=False)

  def fn(q, k, v, dq, dk, dv):
    def loss(q, k, v):
      o, do = jax.jvp(attn, (q, k, v), (dq, dk, dv))
      return jnp.sum((o - jax.lax.stop_gradient(do)) ** 2)
    online = attention_jvp(q, k, v, dq, dk, dv, interpret=False)
    return jax.grad(loss, argnums=(0, 1, 2))(q, k, v), online
  return fn


def _cuda_stablehlo(fn) -> str:
  s = jax.ShapeDtypeStruct((1, N, 8, 64), jnp.float32)
  old = jax.config.jax_pallas_use_mosaic_gpu
  jax.config.update("jax_pallas_use_mosaic_gpu", False)  # Triton (set on GPU via params)
  try:
    exp = export.export(jax.jit(fn), platforms=["cuda"],
                        disabled_checks=[export.DisabledSafetyCheck.custom_call(TRITON)])(
                            *[s] * 6)
  finally:
    jax.config.update("jax_pallas_use_mosaic_gpu", old)
  return exp.mlir_module()


def _has_square(text: str) -> bool:
  return re.search(rf"\b{N}x{N}x", text) is not None or f"x{N}x{N}x" in text


class PallasLoweringTest(absltest.TestCase):

  def test_triton_lowering_without_square_tensors(self):
    text = _cuda_stablehlo(_meanflow("pallas"))
    self.assertEqual(text.count(f"custom_call @{TRITON}"), 5)  # fwd, tangent, dkdv, dq, online
    self.assertFalse(_has_square(text))
    self.assertTrue(_has_square(_cuda_stablehlo(_meanflow("xla"))))  # the check can fail


if __name__ == "__main__":
  absltest.main()
