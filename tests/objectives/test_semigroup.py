"""The self-consistency family -- Shortcut, SplitMeanFlow, tri-consistency -- against the exact
Gaussian flow map (DESIGN.md "Testing oracle").

1. The exact map (and the exact velocity as the boundary target) is a fixed point: loss and
   gradient vanish; a perturbed map is pulled back (descending the gradient moves it home).
2. SplitMeanFlow written as the paper's u-space algorithm equals the library loss (tri-consistency's
   semigroup core with ``split="uniform"``), and each split rule puts ``r`` where seed 004 says.
3. A width-64 MLP trained 400 steps reaches a stated 1- and 2-step tolerance (the exact
   velocity as the boundary target; measured figures beside the tolerances).
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import tangent_oracle as o
from fmdistill import flowmap, models, objectives, paths
from fmdistill.config import base
from fmdistill.objectives import _semigroup, shortcut, tri_consistency

CASES = {
    "shortcut": dict(finest="map"),
    "splitmeanflow": {},
    "tri_uniform": dict(split="uniform"),
    "tri_midpoint": dict(split="midpoint"),
    "tri_forward": dict(split="forward"),
    "tri_backward": dict(split="backward"),
    "tri_edm": dict(split="uniform", param="edm"),
}
TEACHER = lambda x, t, s=None, cond=None: o.G.velocity(o.LINEAR, x, t)


def _method(case):
  return "tri_consistency" if case.startswith("tri") else case


def _cfg(case):
  cfg = objectives.default_config(_method(case))
  cfg.update(CASES[case])
  cfg.velocity = "teacher"
  return cfg


def edm_plug(g):
  """The exact map of ``g`` as an EDM-parameterised network (generic inversion off the
  diagonal, the exact velocity on it: ``d c_out / ds = 1`` at ``s = t``)."""
  param = flowmap.Parameterization("edm")

  def net(p, x, t, s, cond=None):
    diag = jnp.abs(t - s) < 1e-6
    s_off = jnp.where(diag, t - 0.1, s)
    F = param.from_flow_map(g.flow_map(o.LINEAR, x, t, s_off), x, t, s_off)
    out = jnp.where(diag[:, None], g.velocity(o.LINEAR, x, t), F)
    return p["a"] * out + p["b"]
  return net


def _net(case):
  return edm_plug(o.G) if case == "tri_edm" else o.plug(o.linear_F(o.G))


@functools.lru_cache(maxsize=None)
def _compiled(case, n=512):
  """The case's jitted ``value_and_grad`` in the plug-in parameters (compiled once)."""
  cfg, net = _cfg(case), _net(case)
  batch = {"x": o.G.sample(jax.random.key(1), n)}
  fn = lambda p: objectives.get(_method(case))(p, batch, jax.random.key(2), net=net,
                                               teacher=TEACHER, ema_params=None, step=0,
                                               cfg=cfg)[0]
  return o.jit(jax.value_and_grad(fn))


def _value_and_grad(case, params):
  return _compiled(case)(params)


@pytest.mark.parametrize("case", list(CASES))
def test_exact_map_is_a_fixed_point_and_perturbations_are_pulled_back(case):
  loss, g = _value_and_grad(case, o.exact_params())
  assert abs(float(loss)) < 1e-6, float(loss)
  assert abs(float(g["a"])) < 1e-5 and float(jnp.max(jnp.abs(g["b"]))) < 1e-5, g
  for da, db in ((0.3, (0.0, 0.0)), (-0.3, (0.0, 0.0)), (0.0, (0.2, -0.1))):
    p = {"a": jnp.float32(1.0 + da), "b": jnp.array(db, jnp.float32)}
    _, g = _value_and_grad(case, p)
    step = da * float(g["a"]) + float(jnp.dot(g["b"], jnp.array(db)))
    assert step > 0, (case, da, db, g)  # -gradient has a component back towards the exact map


def test_shortcut_finest_level_bootstraps_from_two_euler_steps():
  """``finest='flow'``: at ``d = T/M`` the target is the mean of two Euler steps of the model's
  velocity ``F(x, t, t)`` (the paper's code: its finest step is the flow-matching level); above
  it, two jumps of the network."""
  F = o.linear_F(o.G_OTHER)
  net = o.plug(F)
  x = o.G.sample(jax.random.key(0), 64)
  t = jnp.full((64,), 0.5)
  d = jnp.full((64,), 1.0 / 8)
  half = o.jit(lambda m: shortcut.half_jumps(net, o.exact_params(), x, t, d, m))
  got = half(jnp.ones(64, bool))
  u1 = F(x, t, t)
  u2 = F(x - d[:, None] * u1, t - d, t - d)
  np.testing.assert_allclose(got, 0.5 * (u1 + u2), rtol=1e-6, atol=1e-6)
  got = half(jnp.zeros(64, bool))
  u1 = F(x, t, t - d)
  u2 = F(x - d[:, None] * u1, t - d, t - 2 * d)
  np.testing.assert_allclose(got, 0.5 * (u1 + u2), rtol=1e-6, atol=1e-6)
  # default 'flow' on the exact map: off only by the Euler error of the finest level
  cfg = objectives.default_config("shortcut")
  cfg.velocity = "teacher"
  loss = o.jit(lambda p: objectives.get("shortcut")(
      p, {"x": o.G.sample(jax.random.key(1), 512)}, jax.random.key(2),
      net=o.plug(o.linear_F(o.G)), teacher=TEACHER, cfg=cfg)[0])(o.exact_params())
  assert 0 < float(loss) < 1e-4


def test_shortcut_jumps_lie_on_the_dyadic_grid():
  t, d = shortcut.sample_jumps(jax.random.key(3), 4096, 128, 1.0)
  big = np.asarray(2 * d)
  assert set(np.round(np.log2(big * 128)).astype(int)) == set(range(1, 8))  # 2d = 2^k / 128
  ratio = np.asarray(t) / big
  np.testing.assert_allclose(ratio, np.round(ratio), atol=1e-4)  # t is a multiple of 2d
  assert np.all(np.asarray(t) <= 1.0 + 1e-6) and np.all(np.asarray(t) - big >= -1e-6)
  with pytest.raises(ValueError, match="power of two"):
    shortcut.levels(96)


def test_splitmeanflow_is_the_papers_u_space_algorithm():
  """SplitMeanFlow's training step written out as the paper's algorithm (``lambda ~ U(0, 1)``,
  ``r = (1 - lambda) t + lambda s``, ``u2 = u(x_t, t, r)``, ``x_r = x_t - lambda (t - s) u2``,
  ``u1 = u(x_r, r, s)``, target ``lambda u2 + (1 - lambda) u1``) on the library's draws (same
  key split) equals the library loss, which runs through tri-consistency's semigroup core, and
  the uniform tri-consistency loss agrees too (a random MLP, so nothing vanishes)."""
  mcfg = base("splitmeanflow").model
  mcfg.width, mcfg.depth = 32, 1
  net, params = models.build(mcfg, (2,), 0, jax.random.key(0))
  params["out"]["kernel"] = 0.3 * jax.random.normal(jax.random.key(1),
                                                    params["out"]["kernel"].shape)
  batch = {"x": o.G.sample(jax.random.key(2), 256)}
  cfg = objectives.default_config("splitmeanflow")

  def paper(p):
    path = paths.get_path(cfg.path, cfg.sigma_d)
    _, kp, kl, kn, _ = jax.random.split(jax.random.key(3), 5)
    n = _semigroup.sc_count(256, cfg.sc_ratio)
    t, s = _semigroup.distinct_pairs(kp, n, cfg, path)
    lam = jax.random.uniform(kl, t.shape)
    r = (1.0 - lam) * t + lam * s
    x_t = _semigroup.noised(kn, batch["x"][:n], t, path)
    u2 = net(p, x_t, t, r)
    x_r = x_t - (lam * (t - s))[:, None] * u2
    u1 = net(p, x_r, r, s)
    target = jax.lax.stop_gradient(lam[:, None] * u2 + (1.0 - lam[:, None]) * u1)
    return jnp.mean(jnp.mean((net(p, x_t, t, s) - target) ** 2, axis=-1))

  run = lambda name, c: o.jit(lambda p: objectives.get(name)(
      p, batch, jax.random.key(3), net=net, cfg=c)[1])(params)
  a = run("splitmeanflow", cfg)
  b = run("tri_consistency", objectives.default_config("tri_consistency"))
  np.testing.assert_allclose(a["self_consistency"], o.jit(paper)(params), rtol=1e-4)
  np.testing.assert_allclose(a["self_consistency"], b["self_consistency"], rtol=1e-4)
  np.testing.assert_allclose(a["boundary"], b["boundary"], rtol=1e-6)


@pytest.mark.parametrize("split,share", [("midpoint", 0.5), ("forward", 0.95),
                                         ("backward", 0.05)])
def test_split_rules_put_the_intermediate_time_where_seed_004_says(split, share):
  t, s = jnp.full((8,), 0.9), jnp.full((8,), 0.1)
  r = tri_consistency.intermediate(jax.random.key(0), t, s, split, 0.05)
  np.testing.assert_allclose((t - r) / (t - s), share, rtol=1e-5)  # the first jump's share


STEPS = 400
# measured when written (1-step / 2-step RMSE to the exact map after 400 steps; the data's own
# RMS spread is ~0.57): shortcut (M = 128) .043 / .029, splitmeanflow .054 / .034, tri-consistency
# with the near-boundary 'backward' split .075 / .062 (midpoint .050 / .026, forward .069 / .046
# were measured too and are covered by the oracle tests above). Tolerances about 2x.
TOL = {"shortcut": (0.09, 0.06), "splitmeanflow": (0.11, 0.07), "tri_backward": (0.15, 0.12)}


def _train(case):
  cfg = _cfg(case)
  if case == "shortcut":
    cfg.update(finest="flow", target_ema="")  # the paper's M = 128
  mcfg = base(_method(case)).model
  mcfg.width, mcfg.depth = 64, 2
  net, params = models.build(mcfg, (2,), 0, jax.random.key(0))
  loss = objectives.get(_method(case))
  opt = optax.adam(optax.cosine_decay_schedule(3e-3, STEPS, 0.05))
  state = opt.init(params)

  @o.jit
  def step(params, state, i):
    b = {"x": o.G.sample(jax.random.fold_in(jax.random.key(10), i), 256)}
    g = jax.grad(lambda p: loss(p, b, jax.random.fold_in(jax.random.key(11), i), net=net,
                                teacher=TEACHER, ema_params=None, step=i, cfg=cfg)[0])(params)
    upd, state = opt.update(g, state, params)
    return optax.apply_updates(params, upd), state

  for i in range(STEPS):
    params, state = step(params, state, i)
  return net, params


def _rmse(f, nfe):
  x = jax.random.normal(jax.random.key(3), (2000, 2))
  grid = jnp.linspace(1.0, 0.0, nfe + 1)
  y = x
  for a, b in zip(grid[:-1], grid[1:]):
    y = f(y, jnp.full((2000,), a), jnp.full((2000,), b))
  exact = o.G.flow_map(o.LINEAR, x, jnp.ones(2000), jnp.zeros(2000))
  return float(jnp.sqrt(jnp.mean(jnp.sum((y - exact) ** 2, -1))))


@pytest.mark.parametrize("case", list(TOL))
def test_student_reaches_the_exact_map_in_one_and_two_steps(case):
  net, params = _train(case)
  param = flowmap.Parameterization("displacement")
  f = lambda x, t, s: param.apply(net, params, x, t, s)
  errs = _rmse(f, 1), _rmse(f, 2)
  assert errs[0] < TOL[case][0] and errs[1] < TOL[case][1], (case, errs)
