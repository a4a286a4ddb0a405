"""Tangent family: jit / vmap, bf16 vs fp32 agreement, and the compiled cost of the JVP."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tangent_oracle as o
from fmdistill import models, objectives, paths
from fmdistill.config import base

METHODS = ["scm_ct", "scm_cd", "meanflow", "meanflow_distill", "ayf_emd", "ayf_lmd", "facm",
           "fmm_forward", "fmm_backward", "fmm_forward_self", "fmm_backward_self"]


def _mlp(dtype, name, width=32):
  mcfg = base(name).model
  mcfg.width, mcfg.depth, mcfg.time_scale, mcfg.dtype = width, 1, 1.0, dtype
  net, params = models.build(mcfg, (2,), 0, jax.random.key(0))
  # a non-trivial function: the zero-initialised output layer made random
  params["out"]["kernel"] = 0.3 * jax.random.normal(jax.random.key(1),
                                                    params["out"]["kernel"].shape)
  return net, params


def _call(name, net, params, key, cfg, n=512):
  """The loss; ``params = (network params, {jointly trained part: params})``."""
  path = paths.get_path(cfg.path, cfg.sigma_d)
  teacher = lambda x, t, s=None, cond=None: o.G.velocity(path, x, t)
  batch = {"x": o.G.sample(jax.random.key(7), n)}
  p, parts = params
  return objectives.get(name)(p, batch, key, net=net, teacher=teacher, ema_params=None,
                              step=10 ** 6, cfg=cfg, **parts)[0]


def _with_aux(name, params, cfg):
  return params, o.joint_parts(name, cfg, jax.random.key(2))


@pytest.mark.parametrize("name", METHODS)
def test_bf16_agrees_with_fp32(name):
  """Same weights, bf16 hidden layers (time embedding stays fp32): loss within 5%, gradient
  direction cosine > 0.98, everything finite."""
  cfg = objectives.default_config(name)
  out = {}
  for dtype in ("float32", "bfloat16"):
    net, params = _mlp(dtype, name)
    params = _with_aux(name, params, cfg)
    vg = o.jit(jax.value_and_grad(lambda p: _call(name, net, p, jax.random.key(3), cfg)))
    out[dtype] = vg(params)
  (l32, g32), (l16, g16) = out["float32"], out["bfloat16"]
  flat32 = jnp.concatenate([a.ravel() for a in jax.tree_util.tree_leaves(g32)])
  flat16 = jnp.concatenate([a.ravel() for a in jax.tree_util.tree_leaves(g16)])
  assert np.isfinite(float(l16)) and bool(jnp.all(jnp.isfinite(flat16)))
  assert abs(float(l16) - float(l32)) < 0.05 * abs(float(l32)) + 1e-3, (float(l16), float(l32))
  cos = jnp.dot(flat32, flat16) / (jnp.linalg.norm(flat32) * jnp.linalg.norm(flat16))
  assert float(cos) > 0.98, float(cos)


@pytest.mark.parametrize("name", METHODS)
def test_jit_and_vmap_over_keys(name):
  """``jax.vmap`` of the jitted loss over PRNG keys equals calling it key by key."""
  cfg = objectives.default_config(name)
  net, params = _mlp("float32", name, width=16)
  params = _with_aux(name, params, cfg)
  keys = jax.random.split(jax.random.key(4), 3)
  f = o.jit(lambda k: _call(name, net, params, k, cfg, n=64))
  batched = jax.vmap(f)(keys)
  single = jnp.stack([f(k) for k in keys])
  np.testing.assert_allclose(np.asarray(batched), np.asarray(single), rtol=1e-5, atol=1e-6)


def _compiled(fn, params):
  c = jax.jit(fn).lower(params).compile()  # optimised: this measures real costs
  cost = c.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost["flops"]), c.memory_analysis().temp_size_in_bytes


def test_meanflow_jvp_does_not_differentiate_the_tangent():
  """One jvp call of the student, differentiated through its primal output only, costs about
  a third more than a flow-matching step (fwd + tangent + bwd of the primal), and clearly less
  than differentiating through the tangent as well (which a missing stop_gradient would do)."""
  net, params = _mlp("float32", "meanflow", width=64)
  batch = {"x": o.G.sample(jax.random.key(7), 256)}
  step = lambda name: lambda p: jax.value_and_grad(
      lambda q: objectives.get(name)(q, batch, jax.random.key(0), net=net, teacher=None,
                                     ema_params=None, step=0,
                                     cfg=objectives.default_config(name))[0])(p)

  def no_stop_gradient(p):  # the same loss with the tangent left in the graph
    x_t = o.LINEAR.sample(batch["x"], batch["x"][::-1], jnp.full((256,), 0.5))
    t, s = jnp.full((256,), 0.7), jnp.full((256,), 0.2)
    v = batch["x"][::-1] - batch["x"]
    def loss(q):
      u, du = jax.jvp(lambda x_, t_: net(q, x_, t_, s), (x_t, t), (v, jnp.ones_like(t)))
      return jnp.mean((u - (v - (t - s)[:, None] * du)) ** 2)
    return jax.value_and_grad(loss)(p)

  fm_flops, fm_mem = _compiled(step("flow_matching"), params)
  mf_flops, mf_mem = _compiled(step("meanflow"), params)
  full_flops, _ = _compiled(no_stop_gradient, params)
  assert mf_flops < 1.6 * fm_flops, (mf_flops / fm_flops)
  assert mf_mem < 1.8 * fm_mem + 1e6, (mf_mem, fm_mem)
  assert mf_flops < 0.8 * full_flops, (mf_flops, full_flops)
