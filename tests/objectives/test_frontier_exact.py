"""Improved MeanFlow, TVM and FreeFlow against the exact Gaussian flow map (DESIGN.md "Testing
oracle").

1. The exact map plugged in as the network (``a F_exact + b`` at ``(a, b) = (1, 0)``), the exact
   velocity as teacher (iMF's ``velocity='teacher'``; TVM's terminal term; FreeFlow with the
   exact noising velocity as its critic): loss and gradient vanish (fp32).
2. Each residual equals its analytic value for a *wrong* exact map (another Gaussian's).
3. A perturbed map is pulled back: ``<grad, theta - theta*> > 0`` for perturbations of ``a``,
   of ``b`` and of both (a sign error that keeps the fixed point fails this).
4. With the conditional velocity (training from scratch) the Monte-Carlo gradient at the exact
   map is small against the gradient at a perturbed map.
5. FreeFlow never reads ``batch['x']``.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tangent_oracle as o
from fmdistill import oracle
from fmdistill.objectives import freeflow, imf, tvm

P = o.LINEAR
EXACT = o.exact_params()
PERTURBED = [{"a": jnp.float32(1.3), "b": jnp.zeros(2)},
             {"a": jnp.float32(1.0), "b": jnp.array([0.2, -0.1])},
             {"a": jnp.float32(0.8), "b": jnp.array([-0.15, 0.1])}]
teacher = lambda x, t, s=None, cond=None: o.G.velocity(P, x, t)
NET = o.plug(o.linear_F(o.G))


def _flat(tree):
  return jnp.concatenate([jnp.ravel(a) for a in jax.tree_util.tree_leaves(tree)])


def _pulled_back(grad_fn, params):
  g = grad_fn(params)
  return float(jnp.dot(_flat(g), _flat(params) - _flat(EXACT)))


def _data(n=4096, seed=1):
  return {"x": o.G.sample(jax.random.key(seed), n)}


# ----------------------------------------------------------------------------- improved MeanFlow


def _imf(cfg, batch):
  return lambda p: imf.imf_loss(p, batch, jax.random.key(2), net=NET, teacher=teacher,
                                cfg=cfg)[0]


@pytest.mark.parametrize("tangent_grad", [False, True])
def test_imf_vanishes_at_the_exact_map_and_pulls_back(tangent_grad):
  cfg = imf.defaults()
  cfg.velocity, cfg.tangent_grad, cfg.adaptive_p = "teacher", tangent_grad, 0.0
  f = o.jit(jax.value_and_grad(_imf(cfg, _data())))
  loss, g = f(EXACT)
  assert float(loss) < 1e-10 and float(jnp.max(jnp.abs(_flat(g)))) < 1e-5, (loss, g)
  cfg.adaptive_p = 1.0  # the adaptive weight multiplies the fp32 residual by up to 1/c
  loss, g = f(EXACT)
  assert float(jnp.max(jnp.abs(_flat(g)))) < 1e-5 / cfg.adaptive_c, g
  for p in PERTURBED:
    assert _pulled_back(lambda q: f(q)[1], p) > 0.0, p


def test_imf_compound_velocity_is_the_maps_own_velocity():
  """``V = u + (t - s) du/dt`` with the tangent ``u(x, t, t)``: for any exact map (here another
  Gaussian's) ``V`` is that map's instantaneous velocity, whatever ``s`` is."""
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  n = 256
  t = jax.random.uniform(k1, (n,), minval=0.05, maxval=0.95)
  s = t * jax.random.uniform(k2, (n,), maxval=0.9)
  x = P.sample(o.G.sample(k3, n), jax.random.normal(k1, (n, 2)), t)
  net = o.plug(o.linear_F(o.G_OTHER))
  for tg in (False, True):
    V, u, _, v_hat = imf.compound_velocity(net, EXACT, x, t, s, tangent_grad=tg)
    want = o.G_OTHER.velocity(P, x, t)
    np.testing.assert_allclose(V, want, atol=2e-4 * (1 + float(jnp.max(jnp.abs(want)))))
    np.testing.assert_allclose(v_hat, want, atol=1e-5)
  # and a wrong sign in the identity would not be: u - (t - s) du/dt is far from it
  assert float(jnp.max(jnp.abs(u - (V - u) - want))) > 0.1


def test_imf_conditional_gradient_vanishes_in_expectation():
  cfg = imf.defaults()
  cfg.adaptive_p = 0.0  # the weight 1/(err + c) correlates with e - x and biases the mean
  grad = o.jit(jax.grad(_imf(cfg, _data(65536))))
  g0 = float(jnp.linalg.norm(_flat(grad(EXACT))))
  g1 = float(jnp.linalg.norm(_flat(grad(PERTURBED[0]))))
  assert g0 < 0.05 * g1, (g0, g1)


def test_imf_guidance_targets():
  """Folded CFG ``omega v + kappa v_c + (1 - omega - kappa) v_u`` and the guidance-input form
  ``v + (1 - 1/omega)(v_c - v_u)``: both equal ``v`` at ``omega = 1``; the input form recovers
  ``omega v_c* + (1 - omega) v_u`` when the network predicts the guided field
  ``v_c = omega v_c* + (1 - omega) v_u`` and ``v = v_c*``."""
  k = jax.random.split(jax.random.key(4), 3)
  v, vc, vu = (jax.random.normal(kk, (5, 3)) for kk in k)
  one = jnp.ones(5)
  np.testing.assert_allclose(imf.guided_velocity(v, vc, vu, one), v, atol=1e-6)
  np.testing.assert_allclose(imf.guided_velocity_input(v, vc, vu, one), v, atol=1e-6)
  w = jnp.linspace(1.5, 4.0, 5)
  np.testing.assert_allclose(imf.guided_velocity(v, vc, vu, w, 0.5),
                             w[:, None] * v + 0.5 * vc + (0.5 - w[:, None]) * vu, atol=1e-5)
  guided_net = w[:, None] * v + (1 - w[:, None]) * vu
  np.testing.assert_allclose(imf.guided_velocity_input(v, guided_net, vu, w), guided_net,
                             atol=1e-5)


# ----------------------------------------------------------------------------- TVM


def test_tvm_terminal_residual_is_the_terminal_velocity_error():
  """``d_s f - v(f, s)`` for another Gaussian's exact map against ``G``'s velocity, analytically;
  zero for ``G``'s own map (the loss's target network is then the exact velocity)."""
  k1, k2, k3 = jax.random.split(jax.random.key(5), 3)
  n = 256
  t = jax.random.uniform(k1, (n,), minval=0.1, maxval=1.0)
  s = t * jax.random.uniform(k2, (n,), maxval=0.9)
  x = P.sample(o.G.sample(k3, n), jax.random.normal(k1, (n, 2)), t)
  wrong = o.plug(o.linear_F(o.G_OTHER))
  res, _ = tvm.terminal_residual(wrong, EXACT, EXACT, x, t, s)  # target: the same (wrong) net
  f, _, _, d_s = o.map_derivatives(o.G_OTHER, P, x, t, s)
  np.testing.assert_allclose(res, d_s - o.G_OTHER.velocity(P, f, s), atol=2e-4)
  assert float(jnp.max(jnp.abs(res))) < 2e-4  # a map is consistent with its own diagonal
  # student: G_OTHER's map, target network: G's (the parameter c switches between them)
  F_o, F_g = o.linear_F(o.G_OTHER), o.linear_F(o.G)
  mixed = lambda p, x_, t_, s_, cond=None: F_o(x_, t_, s_) + p["c"] * (F_g(x_, t_, s_)
                                                                       - F_o(x_, t_, s_))
  res, _ = tvm.terminal_residual(mixed, {"c": 0.0}, {"c": 1.0}, x, t, s)
  np.testing.assert_allclose(res, d_s - o.G.velocity(P, f, s), atol=5e-4)
  assert float(jnp.max(jnp.abs(res))) > 0.1
  res, _ = tvm.terminal_residual(NET, EXACT, EXACT, x, t, s)
  assert float(jnp.max(jnp.abs(res))) < 2e-4


def test_tvm_vanishes_at_the_exact_map_and_pulls_back():
  cfg = tvm.defaults()
  terminal_only = cfg.copy_and_resolve_references()
  terminal_only.fm_weight = 0.0
  batch = _data()
  loss = lambda c: lambda p: tvm.tvm_loss(p, batch, jax.random.key(2), net=NET, cfg=c)[0]
  value, g = o.jit(jax.value_and_grad(loss(terminal_only)))(EXACT)
  assert float(value) < 1e-10 and float(jnp.max(jnp.abs(_flat(g)))) < 1e-5, (value, g)
  grad = o.jit(jax.grad(loss(cfg)))
  for p in PERTURBED:
    assert _pulled_back(grad, p) > 0.0, p
  # the terminal term alone, its target network frozen at the exact map: it is positive off the
  # exact map and its gradient (through d_s F) points back
  terminal_only.target_ema = "ema"
  frozen = o.jit(jax.value_and_grad(lambda p: tvm.tvm_loss(
      p, batch, jax.random.key(2), net=NET, ema_params=EXACT, cfg=terminal_only)[0]))
  for p in PERTURBED:
    assert float(frozen(p)[0]) > 1e-3 and _pulled_back(lambda q: frozen(q)[1], p) > 0.0, p
  big = o.jit(jax.grad(lambda p: tvm.tvm_loss(p, _data(65536), jax.random.key(2), net=NET,
                                              cfg=cfg)[0]))
  g0 = float(jnp.linalg.norm(_flat(big(EXACT))))
  g1 = float(jnp.linalg.norm(_flat(big(PERTURBED[0]))))
  assert g0 < 0.05 * g1, (g0, g1)


def test_tvm_times():
  t, s, s2 = tvm.sample_times(jax.random.key(0), 20000, tvm.defaults())
  assert bool(jnp.all((0 <= s) & (s < t) & (t <= 1) & (0 < s2) & (s2 < 1)))
  gap = t - s
  # the gap is sigmoid(N(-0.8, 1)) (median 0.31) and t <= 1 always
  assert abs(float(jnp.median(gap)) - float(jax.nn.sigmoid(-0.8))) < 0.02


# ----------------------------------------------------------------------------- FreeFlow


def _student_critic(b):
  """The one-step map of ``a F_exact + b`` sends ``N(0, I)`` to ``G`` shifted by ``-b``
  (``f = z - (F + b)`` at ``T = 1``): the exact noising velocity is that Gaussian's."""
  return lambda x, r, cond=None: oracle.Gaussian(o.G.mu - b, o.G.scale).velocity(P, x, r)


def _freeflow(cfg, batch, b):
  return lambda p: freeflow.freeflow_loss(p, batch, jax.random.key(2), net=NET, teacher=teacher,
                                          critic=_student_critic(b), cfg=cfg)[0]


def test_freeflow_vanishes_at_the_exact_map_and_pulls_back():
  cfg = freeflow.defaults()
  prior = {"z": jax.random.normal(jax.random.key(1), (8192, 2))}
  value, g = o.jit(jax.value_and_grad(_freeflow(cfg, prior, jnp.zeros(2))))(EXACT)
  assert float(value) < 1e-10 and float(jnp.max(jnp.abs(_flat(g)))) < 1e-5, (value, g)
  p = PERTURBED[1]  # a shift of the samples: the critic stays exact (a shifted Gaussian)
  g = jax.grad(_freeflow(cfg, prior, p["b"]))(p)
  assert _pulled_back(lambda q: g, p) > 0.0
  assert float(jnp.min(g["b"] * p["b"])) > 0  # each coordinate moves back
  pred_only = cfg.copy_and_resolve_references()
  pred_only.corrector_weight = 0.0  # a scaled map: only the predictor's oracle is closed form
  for p in (PERTURBED[0], PERTURBED[2]):
    assert _pulled_back(jax.grad(_freeflow(pred_only, prior, p["b"])), p) > 0.0, p


def test_freeflow_corrector_moves_samples_towards_the_teacher():
  """The corrector alone (exact critic): descending it moves the one-step samples' mean back
  onto the teacher's; with the student on the teacher's distribution it is zero."""
  x = o.G.sample(jax.random.key(3), 8192)
  for shift in (jnp.zeros(2), jnp.array([0.3, -0.2])):
    crit = _student_critic(-shift)
    g = jax.grad(lambda y: freeflow.corrector(y, teacher, crit, jax.random.key(4), None,
                                              freeflow.defaults())[0])(x + shift)
    mean_g = jnp.mean(g, 0) * x.shape[0]
    if not float(jnp.max(jnp.abs(shift))):
      assert float(jnp.max(jnp.abs(mean_g))) < 1e-5
    else:
      assert float(jnp.min(mean_g * shift)) > 0.0, mean_g


def test_predictor_residual_is_the_generating_velocity_mismatch():
  """At ``t = T`` on prior samples: ``d_s f - v(f, s)`` for another Gaussian's map."""
  n = 256
  z = jax.random.normal(jax.random.key(6), (n, 2))
  s = jax.random.uniform(jax.random.key(7), (n,), maxval=0.99)
  wrong = o.plug(o.linear_F(o.G_OTHER))
  _, res, _ = freeflow.predictor(wrong, EXACT, None, teacher, z, 1.0, s, None)
  f, _, _, d_s = o.map_derivatives(o.G_OTHER, P, z, jnp.ones(n), s)
  np.testing.assert_allclose(res, d_s - o.G.velocity(P, f, s), atol=3e-4)


class _Recording(dict):
  """A batch that records which keys are read and refuses ``'x'``."""

  def __init__(self, *a, **k):
    super().__init__(*a, **k)
    self.read = set()

  def __getitem__(self, key):
    self.read.add(key)
    if key == "x":
      raise AssertionError("the data-free loss read batch['x']")
    return super().__getitem__(key)

  def get(self, key, default=None):
    self.read.add(key)
    return self[key] if key in self else default


def test_freeflow_never_reads_data():
  """The student loss and the critic's loss run on a batch with no ``x`` and read only the prior
  sample ``z`` and the labels; the registry declares the method data-free."""
  from fmdistill import objectives
  entry = objectives.entry("freeflow")
  assert entry.batch == "prior" and entry.needs_teacher
  batch = _Recording(z=jax.random.normal(jax.random.key(0), (16, 2)))
  loss, m = freeflow.freeflow_loss(EXACT, batch, jax.random.key(1), net=NET, teacher=teacher,
                                   critic=_student_critic(jnp.zeros(2)),
                                   cfg=freeflow.defaults())
  assert np.isfinite(float(loss))
  critic_params = {"mu": o.G.mu, "log_s": jnp.log(o.G.scale)}
  apply = lambda p, x, r, cond=None: oracle.Gaussian(p["mu"], jnp.exp(p["log_s"])).velocity(
      P, x, r)
  closs, _ = entry.parts["critic"].loss(critic_params, EXACT, batch, jax.random.key(2), net=NET,
                                        apply=apply, cfg=freeflow.defaults())
  assert np.isfinite(float(closs))
  assert batch.read <= {"z", "cond"} and "z" in batch.read, batch.read
