"""The train loop: exact resume, NaN guard, EMA, and config validation."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fmdistill import config as config_lib, runs, state as state_lib, train


def tiny(method="flow_matching", steps=30):
  c = config_lib.base(method)
  c.model.width, c.model.depth = 16, 1
  c.train.update(steps=steps, batch_size=32, log_every=5, ckpt_every=10, warmup_steps=3)
  c.train.ema_decays = (0.9,)
  c.train.ema_power = (6.94,)
  c.eval.which = "ema_0.9"
  return c


def _leaves(tree):
  return [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]


@pytest.mark.slow  # test_reliability: SIGKILL then rerun is bit-identical (by default for FM)
def test_resume_gives_the_same_state_as_an_uninterrupted_run(tmp_path):
  _, full = train.train_and_evaluate(tiny(), str(tmp_path / "a"), progress=False)
  _, part = train.train_and_evaluate(tiny(), str(tmp_path / "b"), progress=False, stop_after=20)
  assert int(part.step) == 20
  _, resumed = train.train_and_evaluate(tiny(), str(tmp_path / "b"), progress=False)
  assert int(resumed.step) == 30
  for a, b in zip(_leaves(full), _leaves(resumed)):
    np.testing.assert_array_equal(a, b)


def test_non_finite_batch_skips_the_update(tmp_path):
  c = tiny()
  source, teacher, net, state = train.setup(c, str(tmp_path))
  step = train.make_train_step(c, net, teacher)
  before = _leaves(state.params)
  ema_before = _leaves(state.ema)
  bad = {"x": jnp.full((32, 2), jnp.nan)}
  state, metrics = step(state, bad, None)
  assert int(state.skipped) == 1 and int(state.consecutive_skips) == 1
  assert float(metrics["finite"]) == 0.0
  for a, b in zip(before, _leaves(state.params)):
    np.testing.assert_array_equal(a, b)
  for a, b in zip(ema_before, _leaves(state.ema)):
    np.testing.assert_array_equal(a, b)
  good = jax.tree_util.tree_map(jnp.asarray, source.batch(0, 32))
  state, metrics = step(state, good, None)
  assert int(state.consecutive_skips) == 0 and int(state.skipped) == 1


def test_power_ema_matches_edm2_definition():
  """With gamma, beta_n = (1 - 1/n)^(gamma + 1): after n updates of constant params c from
  p0, the power EMA equals c exactly from the first update on (beta_1 = 0)."""
  t = tiny().train
  t.ema_rampup = 0.0
  ema = {"ema_0.9": jnp.zeros(3), "power_6.94": jnp.zeros(3)}
  ema = state_lib.update_ema(ema, jnp.ones(3), jnp.int32(0), t)
  np.testing.assert_allclose(ema["power_6.94"], 1.0)
  np.testing.assert_allclose(ema["ema_0.9"], 0.1, rtol=1e-6)


def _ema_share_of_init(t, n, plain=()):
  """The weight an EMA keeps on its initial value (0) after ``n`` updates towards 1."""
  def body(i, e):
    return state_lib.update_ema(e, jnp.ones(()), i, t, plain=plain)
  ema = jax.lax.fori_loop(0, n, body, {"ema_0.999": jnp.zeros(())})
  return 1.0 - float(ema["ema_0.999"])


def test_ema_rampup_forgets_the_initial_weights_as_edm_does():
  """A teacher-initialised student's 0.999 EMA kept 0.999^2000 = 13.5% of the teacher after the
  quickstart's 2000 steps (its one-jump map: the teacher's Euler step, 0.238 sliced W2 vs 0.091
  for the raw weights). With EDM's rampup the half-life after n updates is at most 0.05 n
  steps: the initial share is (product of the per-step betas) below 1e-6, and after the
  rampup the EMA is the plain one again; a consistency target named in ``plain`` never ramps."""
  t = tiny().train
  t.ema_decays, t.ema_power = (0.999,), ()
  assert t.ema_rampup == 0.05                                     # the library default
  np.testing.assert_allclose(_ema_share_of_init(t, 2000, plain=("ema_0.999",)), 0.999 ** 2000,
                             rtol=1e-3)
  assert _ema_share_of_init(t, 2000) < 1e-6
  t.ema_rampup = 0.0
  np.testing.assert_allclose(_ema_share_of_init(t, 2000), 0.999 ** 2000, rtol=1e-3)
  t.ema_rampup = 0.05                # past n = 693 / 0.05 the step's beta is the plain decay
  e = {"ema_0.999": jnp.zeros(())}
  e = state_lib.update_ema(e, jnp.ones(()), jnp.int32(20000), t)
  np.testing.assert_allclose(float(e["ema_0.999"]), 1e-3, rtol=1e-4)
  e = state_lib.update_ema({"ema_0.999": jnp.zeros(())}, jnp.ones(()), jnp.int32(99), t)
  np.testing.assert_allclose(float(e["ema_0.999"]), 1 - 0.5 ** (1 / 5.0), rtol=1e-5)  # h = 5


@pytest.mark.parametrize("field,value,match", [
    ("method", "meanflw", "config.method"),
    ("model.dtype", "float16", "model.dtype"),
    ("train.lr", -1.0, "train.lr"),
    ("objective.path", "cosine", "objective.path"),
    ("eval.solver", "dopri", "eval.solver"),
])
def test_validation_names_the_field(field, value, match):
  c = tiny()
  section, _, name = field.rpartition(".")
  (c[section] if section else c)[name] = value
  with pytest.raises(ValueError, match=match):
    config_lib.validate(c)


def test_distillation_needs_a_teacher(tmp_path):
  with pytest.raises(ValueError, match="teacher.workdir"):
    train.setup(tiny("direct_distill"), str(tmp_path))


def test_teacher_loading_and_pair_cache_resume(tmp_path):
  train.train_and_evaluate(tiny(steps=10), str(tmp_path / "t"), progress=False)
  c = tiny("direct_distill", steps=5)
  c.teacher.update(workdir=str(tmp_path / "t"), which="ema_0.9", pair_num=96, pair_chunk=32,
                   pair_nfe=8)
  _, state = train.train_and_evaluate(c, str(tmp_path / "s"), progress=False)
  chunks = sorted(p.name for p in (tmp_path / "s" / "pairs").glob("*/chunk_*.npz"))
  assert chunks == ["chunk_00000.npz", "chunk_00001.npz", "chunk_00002.npz"]
  assert int(state.step) == 5
  # setup() starts the student from the teacher's EMA weights (cache reused as is)
  _, _, _, s0 = train.setup(c, str(tmp_path / "s"))
  _, _, tparams = runs.load_params(str(tmp_path / "t"), "ema_0.9")
  for a, b in zip(_leaves(tparams), _leaves(s0.params)):
    np.testing.assert_array_equal(a, b)
  # the workdir now belongs to this experiment: other teacher settings are refused there
  c.teacher.pair_nfe = 16
  with pytest.raises(ValueError, match="holds a different experiment"):
    train.setup(c, str(tmp_path / "s"))
  # and a shared cache is keyed by the teacher's identity and the settings: other settings
  # get their own directory, never mixed into this one
  c.teacher.pair_cache = str(tmp_path / "s" / "pairs")
  train.setup(c, str(tmp_path / "s2"))
  keys = sorted(p.name for p in (tmp_path / "s" / "pairs").iterdir())
  assert len(keys) == 2
  for k in keys:
    assert len(list((tmp_path / "s" / "pairs" / k).glob("chunk_*.npz"))) == 3


def test_periodic_evaluation_is_logged(tmp_path):
  import json
  c = tiny(steps=10)
  c.train.eval_every = 5
  c.eval.which = "ema_0.9"
  c.eval.teacher_nfe = (2, 4)
  c.train.tensorboard = False
  train.train_and_evaluate(c, str(tmp_path), progress=False)
  lines = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  evals = [l for l in lines if "eval/sliced_w2_nfe4" in l]
  assert [l["step"] for l in evals] == [5, 10]
  assert all(0 < l["eval/sliced_w2_nfe4"] < 10 for l in evals)
  assert not any("samples" in k for l in lines for k in l)  # the samples go to TensorBoard
  assert not (tmp_path / "tensorboard").exists()  # train.tensorboard=False: no event files
