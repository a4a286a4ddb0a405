"""The Pallas attention on the real model: a 2-block DiT, ``attn_impl='pallas'`` vs ``'xla'``.

* MeanFlow pattern: ``F, dF = jax.jvp(F_theta, (x, t, s), (v, 1, 0))``, target
  ``v - (t - s) dF`` under ``stop_gradient``; loss and every parameter gradient agree.
* Improved-MeanFlow pattern, trained for a few steps: the loss regresses
  ``u + (t - s) du/dt`` onto ``v`` with the gradient *through* ``du/dt`` (the tangent
  backward kernels); with QK-norm on, the parameters after training agree.
* QK-norm (``model.qk_norm``) adds one RMSNorm scale per head dim for q and k per block and
  nothing when off.

The Pallas kernels run in interpret mode on CPU.
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fmdistill import models
from fmdistill.config import base


def _build(impl: str, qk_norm: bool = False, seed: int = 0):
  cfg = base("flow_matching").model
  cfg.update(name="dit", width=32, depth=2, heads=2, patch=2, attn_impl=impl, qk_norm=qk_norm)
  net, params = models.build(cfg, (8, 8, 1), 10, jax.random.key(seed))
  # leave the zero-initialised adaLN/output layers non-zero so attention matters
  params = jax.tree_util.tree_map(
      lambda p: p + 0.05 * jax.random.normal(jax.random.key(7), p.shape), params)
  return net, params


def _batch(seed: int = 1):
  k1, k2 = jax.random.split(jax.random.key(seed))
  x = jax.random.normal(k1, (3, 8, 8, 1))
  v = jax.random.normal(k2, (3, 8, 8, 1))
  return x, v, jnp.array([0.9, 0.6, 0.3]), jnp.array([0.2, 0.1, 0.3]), jnp.array([1, 4, 10])


def _jvp(net, p, x, v, t, s, cond):
  f = lambda x_, t_, s_: net(p, x_, t_, s_, cond)
  return jax.jvp(f, (x, t, s), (v, jnp.ones_like(t), jnp.zeros_like(s)))


def _meanflow_loss(net):
  def loss(p, x, v, t, s, cond):
    out, dout = _jvp(net, p, x, v, t, s, cond)
    target = jax.lax.stop_gradient(v - (t - s)[:, None, None, None] * dout)
    return jnp.mean((out - target) ** 2)
  return loss


def _imf_loss(net):
  def loss(p, x, v, t, s, cond):
    u, dudt = _jvp(net, p, x, v, t, s, cond)
    return jnp.mean((u + (t - s)[:, None, None, None] * dudt - v) ** 2)
  return loss


def _train(impl: str, steps: int = 3):
  net, params = _build(impl, qk_norm=True)
  opt = optax.adam(1e-2)
  loss = _imf_loss(net)

  @jax.jit
  def step(params, state, batch):
    value, grads = jax.value_and_grad(loss)(params, *batch)
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state, value

  state, losses = opt.init(params), []
  for i in range(steps):
    params, state, value = step(params, state, _batch(i))
    losses.append(float(value))
  return params, losses


def test_meanflow_pattern_on_dit_pallas_equals_xla():
  (lx, gx), (lp, gp) = (
      jax.jit(jax.value_and_grad(_meanflow_loss(net)))(params, *_batch())
      for net, params in (_build("xla"), _build("pallas")))
  np.testing.assert_allclose(lp, lx, rtol=1e-5)
  flat_x, flat_p = jax.tree_util.tree_leaves(gx), jax.tree_util.tree_leaves(gp)
  for a, b in zip(flat_x, flat_p):
    np.testing.assert_allclose(b, a, rtol=2e-4, atol=2e-6)
  assert max(float(jnp.abs(a).max()) for a in flat_x) > 1e-3  # the gradient is not trivial


@pytest.mark.slow
def test_imf_training_with_qk_norm_pallas_equals_xla():
  px, lx = _train("xla")
  pp, lp = _train("pallas")
  np.testing.assert_allclose(lp, lx, rtol=1e-5)
  _, p0 = _build("xla", qk_norm=True)
  moved = max(float(jnp.abs(a - b).max()) for a, b in
              zip(jax.tree_util.tree_leaves(px), jax.tree_util.tree_leaves(p0)))
  assert moved > 1e-2  # three Adam steps of 1e-2 moved the parameters
  for a, b in zip(jax.tree_util.tree_leaves(px), jax.tree_util.tree_leaves(pp)):
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)


def test_qk_norm_parameters_and_effect():
  _, off = _build("xla", qk_norm=False)
  _, on = _build("xla", qk_norm=True)
  assert "q_norm" not in off["block0"] and "k_norm" not in off["block0"]
  assert on["block0"]["q_norm"]["scale"].shape == (16,)  # head dim = width / heads
  n = lambda p: sum(x.size for x in jax.tree_util.tree_leaves(p))
  assert n(on) - n(off) == 2 * 2 * 16  # depth x (q, k) x head dim
  # With QK-norm, scaling the q and k projections by a constant leaves the network
  # unchanged (RMSNorm removes it); without, the attention logits and the output change.
  x, _, t, s, cond = _batch()
  w = 32  # width

  def scaled(p):
    p = jax.tree_util.tree_map(lambda a: a, p)
    for name in ("kernel", "bias"):
      a = p["block0"]["qkv"][name]
      p["block0"]["qkv"][name] = a.at[..., :2 * w].multiply(5.0)
    return p

  for params, invariant in ((on, True), (off, False)):
    base_net = _build("xla", qk_norm=invariant)[0]
    diff = float(jnp.abs(base_net(scaled(params), x, t, s, cond)
                         - base_net(params, x, t, s, cond)).max())
    assert (diff < 1e-5) if invariant else (diff > 1e-3), (invariant, diff)
