"""Improved MeanFlow (gradient through the tangent) and TVM on a 2-block DiT: the Pallas
attention (``attn_impl='pallas'``, interpret mode on CPU; the tangent-backward kernels) gives
the loss and every parameter gradient of the XLA attention."""
import jax
import numpy as np
import pytest

from fmdistill import objectives
from fmdistill.pallas.kernel_count import pallas_call_count
from test_dit_pallas import _build


def _loss_and_grad(name, impl):
  net, params = _build(impl)
  cfg = objectives.default_config(name)
  cfg.tangent_grad, cfg.num_classes, cfg.label_dropout = True, 10, 0.0
  batch = {"x": jax.random.normal(jax.random.key(1), (3, 8, 8, 1)),
           "cond": jax.numpy.array([1, 4, 10])}
  fn = lambda p: objectives.get(name)(p, batch, jax.random.key(2), net=net, teacher=None,
                                      ema_params=None, step=0, cfg=cfg)[0]
  kernels = pallas_call_count(jax.value_and_grad(fn), params)
  assert (kernels > 0) == (impl == "pallas"), (impl, kernels)  # no silent fallback to XLA
  return jax.jit(jax.value_and_grad(fn))(params)


@pytest.mark.parametrize("name", [pytest.param("imf", marks=pytest.mark.slow), "tvm"])
def test_grad_through_the_tangent_pallas_equals_xla(name):
  (lx, gx), (lp, gp) = _loss_and_grad(name, "xla"), _loss_and_grad(name, "pallas")
  np.testing.assert_allclose(lp, lx, rtol=1e-5)
  flat_x, flat_p = jax.tree_util.tree_leaves(gx), jax.tree_util.tree_leaves(gp)
  for a, b in zip(flat_x, flat_p):
    np.testing.assert_allclose(b, a, rtol=2e-4, atol=2e-6)
  assert max(float(abs(a).max()) for a in flat_x) > 1e-3  # the gradient is not trivial
