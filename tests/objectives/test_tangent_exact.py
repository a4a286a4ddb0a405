"""Tangent family against the exact Gaussian flow map (DESIGN.md "Testing oracle").

1. With the exact map plugged in as the network (``a F_exact + b`` at ``(a, b) = (1, 0)``) and
   the exact velocity as the teacher, every loss is ~0 and its gradient vanishes (fp32, 1e-5).
2. Each tangent a loss computes equals the analytic time derivative of a (wrong) exact map.
3. With the conditional velocity (training from scratch), the expected gradient vanishes at
   the exact map when the nonlinear stabilisers are off (Monte Carlo, relative).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tangent_oracle as o
from fmdistill import flowmap, objectives, paths
from fmdistill.objectives import _common, _tangent, ayf, facm, fmm, meanflow, scm

SD = 0.8  # sigma_d for the TrigFlow cases (catches a missing sigma_d factor)
TRIG = paths.trigflow(SD)
BIG_STEP = 10 ** 7  # past every tangent warmup


def _case(name):
  """``(net, teacher_path, cfg)`` for the plug-in test of a registered method."""
  cfg = objectives.default_config(name.replace("_order2", ""))
  if "velocity" in cfg:
    cfg.velocity = "teacher"
  if name.startswith("scm"):
    cfg.sigma_d = SD
    return o.plug(o.trigflow_cm_F(o.G, SD)), TRIG, cfg
  if name == "facm":
    return o.facm_plug(o.linear_F(o.G), o.G), o.LINEAR, cfg
  if name == "fmm_forward_order2":
    cfg.order = 2
    return o.plug(o.linear_NN2(o.G)), o.LINEAR, cfg
  return o.plug(o.linear_F(o.G)), o.LINEAR, cfg


def test_meanflow_gradient_vanishes_unweighted():
  """The same check at 1e-5 without the adaptive weight (p = 0)."""
  net, tpath, cfg = _case("meanflow_distill")
  cfg.adaptive_p = 0.0
  teacher = lambda x, t, s=None, cond=None: o.G.velocity(tpath, x, t)
  batch = {"x": o.G.sample(jax.random.key(1), 512)}
  g = o.jit(jax.grad(lambda q: objectives.get("meanflow_distill")(
      q, batch, jax.random.key(2), net=net, teacher=teacher, ema_params=None, step=0,
      cfg=cfg)[0]))(o.exact_params())
  assert abs(float(g["a"])) < 1e-5 and float(jnp.max(jnp.abs(g["b"]))) < 1e-5, g


TANGENT_METHODS = ["scm_ct", "scm_cd", "meanflow", "meanflow_distill", "ayf_emd", "ayf_lmd",
                   "facm", "fmm_forward", "fmm_backward", "fmm_forward_self",
                   "fmm_backward_self", "fmm_forward_order2"]


@pytest.mark.parametrize("name", TANGENT_METHODS)
def test_loss_and_gradient_vanish_at_the_exact_map(name):
  net, tpath, cfg = _case(name)
  entry = objectives.entry(name.replace("_order2", ""))
  teacher = lambda x, t, s=None, cond=None: o.G.velocity(tpath, x, t)
  params = o.exact_params()
  if "weighting" in entry.parts:
    cfg.adaptive_weight = True
  parts = o.joint_parts(entry.name, cfg)
  batch = {"x": o.G.sample(jax.random.key(1), 512)}

  @o.jit
  def value_and_grad(p):
    return jax.value_and_grad(lambda q: entry.loss(q, batch, jax.random.key(2), net=net,
                                                   teacher=teacher, ema_params=None,
                                                   step=BIG_STEP, cfg=cfg, **parts)[0])(p)
  loss, g = value_and_grad(params)
  assert abs(float(loss)) < 1e-5, float(loss)
  # MeanFlow's adaptive weight 1/(err + c)^p and FACM's norm-L2 multiply the gradient of the
  # float32 rounding residual by up to 1/c^p (1e3, 31) at the optimum: scale the bound by it
  tol = 1e-5 / (cfg.adaptive_c ** cfg.adaptive_p if "adaptive_p" in cfg
                else cfg.norm_c ** cfg.norm_p if "norm_p" in cfg else 1.0)
  assert abs(float(g["a"])) < tol and float(jnp.max(jnp.abs(g["b"]))) < tol, (g, tol)


def _points(key, n, path, s_zero=False):
  k1, k2, k3 = jax.random.split(key, 3)
  t = jax.random.uniform(k1, (n,), minval=0.05, maxval=0.95) * path.T
  s = jnp.zeros(n) if s_zero else t * jax.random.uniform(k2, (n,), minval=0.0, maxval=0.9)
  x_t = path.sample(o.G.sample(k3, n), jax.random.normal(k1, (n, 2)), t)
  return x_t, t, s


def _close(a, b, tol=2e-4):
  scale = 1 + float(jnp.max(jnp.abs(b)))
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=tol * scale)


def test_scm_tangent_is_cos_t_times_the_time_derivative_of_the_map():
  x_t, t, _ = _points(jax.random.key(0), 256, TRIG, s_zero=True)
  v = o.G.velocity(TRIG, x_t, t)  # the (true) ODE; the network is G_OTHER's exact map
  net = o.plug(o.trigflow_cm_F(o.G_OTHER, SD))
  want = jnp.cos(t)[:, None] * o.eulerian_derivative(o.G_OTHER, TRIG, x_t, t, 0 * t, v)
  _close(scm.tangent(net, o.exact_params(), x_t, t, v, sigma_d=SD), want)
  # semi-continuous time (rCM): forward difference in t with dt = 1e-4, spatial part by jvp
  _close(scm.tangent(net, o.exact_params(), x_t, t, v, sigma_d=SD, time_fd=1e-4), want, 5e-3)
  # and zero for the map's own ODE
  v_own = o.G_OTHER.velocity(TRIG, x_t, t)
  _close(scm.tangent(net, o.exact_params(), x_t, t, v_own, sigma_d=SD), 0 * want)


def test_meanflow_target_is_F_plus_the_time_derivative_of_the_map():
  x_t, t, s = _points(jax.random.key(1), 256, o.LINEAR)
  v = o.G.velocity(o.LINEAR, x_t, t)
  F = o.linear_F(o.G_OTHER)
  want = F(x_t, t, s) + o.eulerian_derivative(o.G_OTHER, o.LINEAR, x_t, t, s, v)
  _close(meanflow.target(o.plug(F), o.exact_params(), x_t, t, s, v), want)
  _close(meanflow.target(o.plug(F), o.exact_params(), x_t, t, t, v), v)  # s = t: FM target
  _close(facm.cm_target(o.plug(F), o.exact_params(), x_t, t, v),
         F(x_t, t, 0 * t) + o.eulerian_derivative(o.G_OTHER, o.LINEAR, x_t, t, 0 * t, v))
  out, tgt = fmm.backward_target(o.plug(F), o.exact_params(), None, x_t, t, s, v)
  _close(tgt, want)


def test_ayf_tangents_are_the_eulerian_and_lagrangian_derivatives():
  x_t, t, s = _points(jax.random.key(2), 256, o.LINEAR)
  v = o.G.velocity(o.LINEAR, x_t, t)
  net = o.plug(o.linear_F(o.G_OTHER))
  _close(ayf.emd_tangent(net, o.exact_params(), x_t, t, s, v),
         o.eulerian_derivative(o.G_OTHER, o.LINEAR, x_t, t, s, v))
  teacher = lambda x, t_, s_=None, cond=None: o.G.velocity(o.LINEAR, x, t_)
  f, _, _, d_s = o.map_derivatives(o.G_OTHER, o.LINEAR, x_t, t, s)
  want = d_s - o.G.velocity(o.LINEAR, f, s)
  _close(ayf.lmd_residual(net, o.exact_params(), teacher, x_t, t, s), want)
  # flow-map matching's forward target: G^- minus the same residual; and the second order form
  vel = lambda x, u: o.G.velocity(o.LINEAR, x, u)
  _, tgt = fmm.forward_target(net, o.exact_params(), None, vel, x_t, t, s)
  _close(tgt, o.linear_F(o.G_OTHER)(x_t, t, s) - want)
  G2 = fmm.displacement_net(o.plug(o.linear_NN2(o.G_OTHER)),
                            lambda x, t_, s_=None, c=None: o.G_OTHER.velocity(o.LINEAR, x, t_), 2)
  _, tgt2 = fmm.forward_target(G2, o.exact_params(), None, vel, x_t, t, s)
  _close(tgt2, o.linear_F(o.G_OTHER)(x_t, t, s) - want)


@pytest.mark.parametrize("pname", flowmap.PARAMETERIZATIONS)
def test_flow_map_time_derivative_for_every_parameterisation(pname):
  """The shared helper differentiates ``c_skip x + c_out F(c_in x)`` as a whole."""
  path = TRIG if pname == "trigflow" else o.LINEAR
  param = flowmap.Parameterization(pname, SD if pname == "trigflow" else 1.0)
  x_t, t, s = _points(jax.random.key(3), 128, path)

  def net(p, x_in, t_, s_, cond=None):  # F from the exact map, generic inversion (t - s > 0)
    _, _, c_in = param.coefficients(t_, s_)
    x = x_in / c_in[:, None]
    return param.from_flow_map(o.G_OTHER.flow_map(path, x, t_, s_), x, t_, s_)
  v = o.G.velocity(path, x_t, t)
  f, dfdt = _tangent.flow_map_time_derivative(param, net, None, x_t, t, s, v)
  _close(f, o.G_OTHER.flow_map(path, x_t, t, s), 1e-4)
  _close(dfdt, o.eulerian_derivative(o.G_OTHER, path, x_t, t, s, v), 2e-3)


@pytest.mark.parametrize("name,overrides", [
    ("meanflow", dict(adaptive_p=0.0, equal_ratio=0.5)),
    ("scm_ct", dict(tangent_norm="none", adaptive_weight=False, sigma_d=SD)),
])
def test_conditional_velocity_gradient_vanishes_in_expectation(name, overrides):
  """Training from scratch: E[v(x_t | x_0) | x_t] is the marginal velocity, so with the
  nonlinear stabilisers off the expected gradient is zero at the exact map (the normalised /
  adaptively weighted forms are biased at finite c, as in the papers)."""
  cfg = objectives.default_config(name)
  cfg.update(overrides)
  F = o.trigflow_cm_F(o.G, SD) if name == "scm_ct" else o.linear_F(o.G)
  loss = objectives.get(name)
  batch = {"x": o.G.sample(jax.random.key(4), 200_000)}
  grad = o.jit(jax.grad(lambda p: loss(p, batch, jax.random.key(5), net=o.plug(F),
                                         teacher=None, ema_params=None, step=BIG_STEP,
                                         cfg=cfg)[0]))
  g_exact = grad(o.exact_params())
  g_off = grad({"a": jnp.float32(1.3), "b": jnp.zeros(2)})
  assert abs(float(g_exact["a"])) < 0.03 * abs(float(g_off["a"])), (g_exact, g_off)
  assert float(jnp.max(jnp.abs(g_exact["b"]))) < 0.03 * float(jnp.max(jnp.abs(g_off["b"]))) + 2e-3


def test_meanflow_guidance_is_folded_into_the_target_velocity():
  """``v~ = omega v + kappa u(x, t, t | c) + (1 - omega - kappa) u(x, t, t | null)`` for
  labelled examples, ``v`` for examples whose label was dropped to the null label."""
  cfg = objectives.default_config("meanflow")
  cfg.num_classes, cfg.guidance, cfg.guidance_kappa = 10, 2.5, 0.3
  net = lambda p, x, t, s, cond: jnp.broadcast_to(cond[:, None].astype(x.dtype), x.shape) * 0.1
  x, t, v = jnp.ones((4, 2)), jnp.full((4,), 0.5), jnp.full((4, 2), 3.0)
  cond = jnp.array([1, 10, 4, 10])
  out = meanflow.guided_velocity(net, None, x, t, v, cond, cfg)
  want = jnp.where((cond == 10)[:, None], v,
                   2.5 * v + 0.3 * 0.1 * cond[:, None] + (1 - 2.5 - 0.3) * 0.1 * 10)
  np.testing.assert_allclose(np.asarray(out), np.asarray(want), rtol=1e-6)
