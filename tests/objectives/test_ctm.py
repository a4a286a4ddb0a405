"""CTM against the Gaussian oracle, and CTM training with gamma-sampling.

1. Exact flow map as the network, exact teacher velocity, RK4 solver: the soft-consistency loss
   and the DSM term (on the teacher's velocity) vanish with their gradient, compared in a
   common time (``compare='zero'``) or at ``s``; with the paper's DSM on data the gradient
   vanishes in expectation.
2. The teacher solve goes from grid index ``i`` to ``i + k`` (it reproduces the exact map
   between those times); the index sampler keeps ``t > u >= s`` and ``p(k) ∝ k``.
3. A perturbed map is pulled back. 4. A teacher-initialised tiny MLP reaches the exact one- and
   two-jump maps, and its gamma = 1 (consistency multistep) samples have the data's moments.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import family_train as ft
import tangent_oracle as o
from fmdistill import objectives, paths
from fmdistill.objectives import ctm


def _grad_fn(cfg, n=4096, seed=1):
  batch = {"x": o.G.sample(jax.random.key(seed), n)}
  return o.jit(jax.value_and_grad(lambda q, k: ctm.ctm_loss(
      q, batch, k, net=o.plug(o.linear_F(o.G)), teacher=ft.exact_teacher(), ema_params=None,
      step=0, cfg=cfg)[0]))


def _norm(g):
  return float(jnp.sqrt(g["a"] ** 2 + jnp.sum(g["b"] ** 2)))


@pytest.mark.parametrize("compare", ["zero", "s"])
def test_loss_and_gradient_vanish_at_the_exact_map(compare):
  cfg = ctm.defaults()
  cfg.update(solver="rk4", dsm_target="teacher", compare=compare)
  fn = _grad_fn(cfg)
  for seed in range(3):  # three batches: different solver-step counts k
    loss, g = fn(o.exact_params(), jax.random.key(seed))
    _, g_off = fn({"a": jnp.float32(1.01), "b": jnp.zeros(2)}, jax.random.key(seed))
    assert float(loss) < 1e-8, float(loss)
    assert _norm(g) < 1e-3 * _norm(g_off), (g, g_off)
    assert float(g_off["a"]) > 0


def test_dsm_on_data_vanishes_in_expectation():
  cfg = ctm.defaults()
  cfg.update(solver="rk4", dsm_target="data")
  fn = _grad_fn(cfg, n=200_000, seed=4)
  _, g = fn(o.exact_params(), jax.random.key(5))
  _, g_a = fn({"a": jnp.float32(1.3), "b": jnp.zeros(2)}, jax.random.key(5))
  _, g_b = fn({"a": jnp.float32(1.0), "b": jnp.array([0.3, -0.3])}, jax.random.key(5))
  assert abs(float(g["a"])) < 0.03 * abs(float(g_a["a"])), (g, g_a)
  assert float(jnp.max(jnp.abs(g["b"]))) < 0.03 * float(jnp.min(jnp.abs(g_b["b"]))), (g, g_b)


def test_a_perturbed_map_is_pulled_back():
  fn = _grad_fn(ctm.defaults(), n=8192)
  for seed in range(2):
    _, g_a = fn({"a": jnp.float32(1.2), "b": jnp.zeros(2)}, jax.random.key(seed))
    _, g_b = fn({"a": jnp.float32(1.0), "b": jnp.array([0.3, -0.3])}, jax.random.key(seed))
    assert float(g_a["a"]) > 0, g_a
    assert float(g_b["b"][0]) > 0 > float(g_b["b"][1]), g_b


def test_teacher_solve_runs_k_steps_along_the_grid():
  cfg, path = ctm.defaults(), paths.linear()
  cfg.solver = "rk4"  # so that an off-by-one step (>= 5e-3 here) is above the solver error
  n = 512
  x0 = o.G.sample(jax.random.key(0), n)
  i = jax.random.randint(jax.random.key(1), (n,), 0, 8)
  solve = jax.jit(lambda x, i_, k_: ctm.teacher_solve(ft.exact_teacher(), x, i_, k_, cfg, path))
  for k in (1, 5, 9):  # one compiled loop, k traced
    t, u = ctm.grid_time(i, cfg, path), ctm.grid_time(i + k, cfg, path)
    x_t = path.sample(x0, jax.random.normal(jax.random.key(2), x0.shape), t)
    got = solve(x_t, i, jnp.int32(k))
    np.testing.assert_allclose(got, o.G.flow_map(path, x_t, t, u), atol=2e-3)


def test_index_sampler():
  cfg = ctm.defaults()
  cfg.max_solver_steps = 17  # CTM's code
  draw = o.jit(jax.vmap(lambda key: ctm.sample_indices(key, 64, cfg)))
  ks, i, j = draw(jax.random.split(jax.random.key(0), 3000))
  assert bool(jnp.all(i >= 0)) and bool(jnp.all(i + ks[:, None] <= j)) and bool(jnp.all(j <= 17))
  freq = np.bincount(np.asarray(ks), minlength=18)[1:] / ks.shape[0]
  np.testing.assert_allclose(freq, np.arange(1, 18) / np.arange(1, 18).sum(), atol=0.02)
  assert int(jnp.max(ks)) == 17
  capped = ctm.defaults()  # the library's default: a short solve, k <= 4
  ks4 = jax.vmap(lambda key: ctm.sample_indices(key, 8, capped)[0])(
      jax.random.split(jax.random.key(1), 200))
  assert int(jnp.max(ks4)) == 4 and int(jnp.min(ks4)) == 1
  path = paths.linear()
  g = ctm.grid_time(jnp.arange(18), cfg, path)
  assert abs(float(g[0]) - 80 / 81) < 1e-6 and abs(float(g[-1]) - 0.002 / 1.002) < 1e-6
  assert bool(jnp.all(jnp.diff(g) < 0))


@pytest.fixture(scope="module")
def trained():
  return ft.train("ctm")


def test_student_reaches_the_exact_jumps(trained):
  """Measured at 400 steps from the tiny teacher (1-step 0.85, 2-jump 0.48 off): 1-step
  0.08 RMSE to the exact map."""
  net, params, cfg = trained
  assert ft.jump_rmse(net, params, cfg, 1) < 0.15
  assert ft.jump_rmse(net, params, cfg, 2) < 0.15


def test_trained_student_with_gamma_sampling(trained):
  """gamma = 0 (deterministic jumps) and gamma = 1 (consistency multistep) from one trained
  CTM: moments of 4-step samples against the data's. Measured: 0.03 (gamma = 0) and 0.05
  (gamma = 1); the teacher-initialised student: 0.31 with gamma = 1."""
  net, params, cfg = trained
  for gamma in (0.0, 0.5, 1.0):
    err = ft.moment_error(ft.samples(net, params, cfg, 4, gamma))
    assert err < 0.1, (gamma, err)
