"""The kernels lower for CUDA (Triton) and TPU (Mosaic) without a device (``jax.export``).

This runs the Python-side Pallas -> Triton IR and Pallas -> Mosaic lowering of every kernel
(forward, tangent, both backward kernels, the one-pass online JVP) on the MeanFlow pattern,
and checks that the lowered program has no N x N tensor while the XLA reference's does. It
does not compile or run the kernels (no ptxas / libtpu here); the non-interpret test classes
do that on a GPU/TPU.
"""
from __future__ import annotations

import re

import jax
import jax.numpy as jnp
from absl.testing import absltest, parameterized
from jax import export

from fmdistill.pallas import attention, attention_jvp

N = 256
TARGETS = {"cuda": "__gpu$xla.gpu.triton", "tpu": "tpu_custom_call"}


def _meanflow(impl: str, platform: str):
  # What make_spec picks on that platform (tracing happens on this CPU host).
  kw = dict(block_q=128, block_k=128, head_major=True) if platform == "tpu" else {}
  if impl == "xla":
    attn = lambda q, k, v: attention(q, k, v, impl="xla", causal=True)
  else:
    from fmdistill.pallas import pallas_attention  # noqa: PLC0415
    attn = lambda q, k, v: pallas_attention(q, k, v, causal=True, interpret=False, **kw)

  def fn(q, k, v, dq, dk, dv):
    def loss(q, k, v):
      o, do = jax.jvp(attn, (q, k, v), (dq, dk, dv))
      return jnp.sum((o - jax.lax.stop_gradient(do)) ** 2)
    online = attention_jvp(q, k, v, dq, dk, dv, interpret=False, **kw)
    return jax.grad(loss, argnums=(0, 1, 2))(q, k, v), online
  return fn


def _stablehlo(fn, platform: str) -> str:
  s = jax.ShapeDtypeStruct((1, N, 8, 64), jnp.float32)
  old = jax.config.jax_pallas_use_mosaic_gpu
  # On a GPU the kernels pass Triton compiler params; here the host is CPU, so pick Triton
  # through the config flag instead.
  jax.config.update("jax_pallas_use_mosaic_gpu", False)
  try:
    checks = [export.DisabledSafetyCheck.custom_call(TARGETS[platform])]
    exp = export.export(jax.jit(fn), platforms=[platform], disabled_checks=checks)(*[s] * 6)
  finally:
    jax.config.update("jax_pallas_use_mosaic_gpu", old)
  return exp.mlir_module()


def _has_square(text: str) -> bool:
  return re.search(rf"\b{N}x{N}x", text) is not None or f"x{N}x{N}x" in text


class PallasLoweringTest(parameterized.TestCase):

  @parameterized.parameters("cuda", "tpu")
  def test_lowering_without_square_tensors(self, platform):
    text = _stablehlo(_meanflow("pallas", platform), platform)
    # fwd, tangent, dK/dV, dQ and the online JVP kernel.
    self.assertEqual(text.count(f"custom_call @{TARGETS[platform]}"), 5)
    self.assertFalse(_has_square(text))
    self.assertTrue(_has_square(_stablehlo(_meanflow("xla", platform), platform)))


if __name__ == "__main__":
  absltest.main()
