"""Classifier-free-guidance distillation: per-example guided teachers, the guidance interval,
the scale embedding, students started from their teacher, and one student serving many
scales."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fmdistill import config as config_lib, flowmap, models, objectives, oracle, paths, state
from fmdistill.config import base
from fmdistill.errors import ConfigError

P = paths.linear()
G0 = oracle.Gaussian(jnp.array([-1.0, 0.0]), jnp.array([0.4, 0.4]))
G1 = oracle.Gaussian(jnp.array([1.0, 0.5]), jnp.array([0.4, 0.4]))
MIX = oracle.GaussianMixture(jnp.array([0.5, 0.5]), jnp.stack([G0.mu, G1.mu]),
                             jnp.array([0.4, 0.4]))


def exact_net(params, x, t, s, cond=None):
  """The exact velocities of a two-class Gaussian toy: class 0, class 1, null label 2 (the
  unconditional mixture), as a displacement network at ``s = t``."""
  del params, s
  lab = cond[:, None]
  return jnp.where(lab == 0, G0.velocity(P, x, t),
                   jnp.where(lab == 1, G1.velocity(P, x, t), MIX.velocity(P, x, t)))


def _teacher(**kw):
  return flowmap.teacher_network(exact_net, None, flowmap.Parameterization(), P, P,
                                 null_label=2, **kw)


def test_per_example_guidance_and_interval():
  n = 64
  k1, k2 = jax.random.split(jax.random.key(0))
  x = jax.random.normal(k1, (n, 2))
  t = jax.random.uniform(k2, (n,))
  lab = jnp.arange(n) % 2
  w = jnp.linspace(1.0, 4.0, n)
  got = jax.jit(_teacher())(x, t, t, {"label": lab, "w": w})
  for i in (0, 17, 63):
    want = jax.jit(_teacher(guidance=float(w[i])))(x[i:i + 1], t[i:i + 1], None, lab[i:i + 1])
    np.testing.assert_allclose(got[i:i + 1], want, rtol=1e-5, atol=1e-6)
  # guidance only inside the interval [0.2 T, 0.6 T]; outside, the conditional velocity (w = 1)
  got = jax.jit(_teacher(guidance=3.0, interval=(0.2, 0.6)))(x, t, t, lab)
  inside = (t >= 0.2) & (t <= 0.6)
  want = jnp.where(inside[:, None], jax.jit(_teacher(guidance=3.0))(x, t, t, lab),
                   exact_net(None, x, t, t, lab))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  assert bool(jnp.any(inside)) and bool(jnp.any(~inside))


def test_scale_embedding_starts_as_the_teacher_and_then_depends_on_w():
  mcfg = base("flow_matching").model
  mcfg.update(width=32, depth=1)
  tnet, tparams = models.build(mcfg, (2,), 2, jax.random.key(0))
  tparams = jax.tree_util.tree_map(  # a trained-looking teacher (no zero layers)
      lambda p: p + 0.3 * jax.random.normal(jax.random.key(3), p.shape), tparams)
  mcfg.guidance_embed = True
  net, params = models.build(mcfg, (2,), 2, jax.random.key(1))
  params = state.from_teacher(params, tparams)
  net, tnet = jax.jit(net), jax.jit(tnet)
  x = jax.random.normal(jax.random.key(2), (8, 2))
  t = jnp.full((8,), 0.5)
  lab = jnp.arange(8) % 2
  for w in (1.0, 3.0):
    np.testing.assert_array_equal(net(params, x, t, t, {"label": lab, "w": jnp.full(8, w)}),
                                  tnet(tparams, x, t, t, lab))
  params["guidance"]["w2"]["kernel"] = jax.random.normal(jax.random.key(4), (32, 32))
  out = lambda w: net(params, x, t, t, {"label": lab, "w": jnp.full(8, w)})
  np.testing.assert_array_equal(out(1.0), tnet(tparams, x, t, t, lab))  # zero at w = 1
  assert float(jnp.max(jnp.abs(out(3.0) - out(1.0)))) > 1e-3
  with pytest.raises(ConfigError, match="do not fit"):
    state.from_teacher(params, {**tparams, "out": {"kernel": jnp.zeros((3, 2))}})


def test_guidance_input_needs_the_embedding():
  c = config_lib.base("scm_cd")
  c.objective.guidance_input = True
  with pytest.raises(ConfigError, match="model.guidance_embed"):
    config_lib.validate(c)
  c.model.guidance_embed = True
  config_lib.validate(c)


def test_one_student_serves_many_scales():
  """MeanFlow distillation with ``w ~ U[1, 3]`` as a student input, 1000 steps on the
  two-class toy: the student's instantaneous velocity matches the teacher guided at each scale
  (measured RMSE 0.13 / 0.14 / 0.37 at w = 1 / 2 / 3, against the teacher's own change of 2.0
  from w = 1 to 3), and its 1-step samples move with w as the teacher's ODE samples do
  (class-0 mean -1.01 -> -1.27; teacher -1.00 -> -1.40)."""
  method = "meanflow_distill"
  teacher = _teacher()
  cfg = objectives.default_config(method)
  cfg.update(guidance_input=True, guidance_range=(1.0, 3.0), num_classes=2)
  mcfg = base(method).model
  mcfg.update(width=64, depth=2, guidance_embed=True)
  net, params = models.build(mcfg, (2,), 2, jax.random.key(0))
  opt = optax.adam(2e-3)
  st = opt.init(params)
  loss = objectives.get(method)

  @jax.jit
  def step(params, st, i):
    kl, kx, kb = jax.random.split(jax.random.fold_in(jax.random.key(1), i), 3)
    lab = jax.random.bernoulli(kl, 0.5, (256,)).astype(jnp.int32)
    x = jnp.where(lab[:, None] == 0, G0.sample(kx, 256),
                  G1.sample(jax.random.fold_in(kx, 1), 256))
    g = jax.grad(lambda p: loss(p, {"x": x, "cond": lab}, kb, net=net, teacher=teacher,
                                cfg=cfg)[0])(params)
    upd, st = opt.update(g, st, params)
    return optax.apply_updates(params, upd), st
  for i in range(1000):
    params, st = step(params, st, i)
  n = 4000
  kt, kx, ke, kz = jax.random.split(jax.random.key(11), 4)
  t = jax.random.uniform(kt, (n,), minval=0.05, maxval=0.95)
  x = (1 - t[:, None]) * G0.sample(kx, n) + t[:, None] * jax.random.normal(ke, (n, 2))
  cond = lambda w: {"label": jnp.zeros((n,), jnp.int32), "w": jnp.full((n,), w)}
  rms = lambda a: float(jnp.sqrt(jnp.mean(jnp.sum(a ** 2, -1))))
  change = rms(teacher(x, t, t, cond(3.0)) - teacher(x, t, t, cond(1.0)))
  for w in (1.0, 2.0, 3.0):
    assert rms(net(params, x, t, t, cond(w)) - teacher(x, t, t, cond(w))) < 0.25 * change, w
  z = jax.random.normal(kz, (n, 2))
  one_step = lambda w: flowmap.Parameterization().apply(net, params, z, jnp.ones(n),
                                                         jnp.zeros(n), cond(w))
  shift = float(one_step(3.0)[:, 0].mean() - one_step(1.0)[:, 0].mean())
  assert shift < -0.15, shift  # the teacher's ODE samples: -0.41


@pytest.fixture(scope="module")
def digits_teacher(tmp_path_factory):
  """A tiny class-conditional DiT flow-matching teacher on digits (label dropout for CFG)."""
  from fmdistill import train
  from tests.test_train import tiny
  wd = str(tmp_path_factory.mktemp("cfg") / "fm")
  c = tiny("flow_matching", steps=4)
  c.data.update(name="digits", conditional=True)
  c.model.update(name="dit", width=16, depth=1, heads=2, patch=4)
  c.objective.label_dropout = 0.2
  train.train_and_evaluate(c, wd, progress=False)
  return wd


@pytest.mark.slow  # the loss-level guidance tests above run by default
def test_guidance_input_through_the_train_loop(digits_teacher, tmp_path, method="dmd"):
  """A student that takes the scale as an input, from a guided teacher, through the real train
  loop: its critic carries the scale embedding too (the fake score of a w-dependent generator
  must be w-conditional), and sampling with another ``guidance`` changes the samples. (DMD
  only: rCM's critic is the same part, and a DiT rCM step takes minutes to compile here.)"""
  from fmdistill import runs, train
  from fmdistill.eval import evaluate
  from tests.test_train import tiny
  c = tiny(method, steps=3)
  c.data.update(name="digits", conditional=True)
  c.model.update(name="dit", width=16, depth=1, heads=2, patch=4, guidance_embed=True)
  c.objective.update(guidance_input=True, guidance_range=(1.0, 3.0))
  c.teacher.update(workdir=digits_teacher, which="ema_0.9")
  _, st = train.train_and_evaluate(c, str(tmp_path), progress=False)
  assert "guidance" in st.params and "guidance" in st.parts["critic"].params
  assert int(st.parts["critic"].count) > 0
  cfg, net, params = runs.load_params(str(tmp_path), "params")
  params["guidance"]["w2"]["kernel"] = jax.random.normal(jax.random.key(0), (16, 16))
  x1, x3 = (evaluate.generate(cfg, net, params, jax.random.key(1), 8, 1, guidance=g)
            for g in (1.0, 3.0))
  assert np.max(np.abs(x1 - x3)) > 1e-4
