"""Trainable parts: schedules counted step by step, a non-finite part loss skips only that
part, jointly trained parts get the student loss's gradient."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fmdistill import config as config_lib, objectives, state as state_lib, step as step_lib
from fmdistill.objectives import _common, _score

NAME = "_test_two_parts"


def _student_loss(params, batch, key, *, net, teacher, ema_params, step, cfg, a, b, c):
  """Pulls ``w`` to the batch mean; reads the frozen parts ``a``, ``b`` and the live ``c``."""
  del net, teacher, ema_params, step, cfg
  target = jnp.mean(batch["x"], 0) + 0.0 * (a["v"] + b["v"])
  loss = jnp.sum((params["w"] - target) ** 2) + jnp.sum((c["v"] - 2.0) ** 2)
  return loss, {"loss": loss}


def _part_loss(target):
  def loss(p, student, batch, key, *, net, apply, teacher, parts, step, cfg):
    del student, key, net, apply, teacher, parts, step, cfg
    poison = jnp.where(jnp.any(batch.get("poison", jnp.zeros(1)) > 0), jnp.nan, 0.0)
    value = jnp.sum((p["v"] - target) ** 2) + poison
    return value, {"gap": jnp.sum(jnp.abs(p["v"] - target))}
  return loss


def _init(value):
  return lambda key, ctx: {"v": jnp.full((2,), value, jnp.float32)}


@pytest.fixture
def two_parts():
  """A registered toy objective: part ``a`` 3 updates every 2nd step before the student,
  part ``b`` once every 3rd step from step 4 after the student, part ``c`` joint."""
  entry = objectives.Objective(
      name=NAME, loss=_student_loss, defaults=_common.base_config,
      parts={"a": objectives.Part(init=_init(0.0), loss=_part_loss(1.0), every=2, updates=3),
             "b": objectives.Part(init=_init(0.0), loss=_part_loss(-1.0), every=3, start=4,
                                  order="after"),
             "c": objectives.Part(init=_init(0.0))})
  objectives.register(entry)
  try:
    yield entry
  finally:
    del objectives._REGISTRY[NAME]


def _setup(entry):
  c = config_lib.base(NAME)
  c.train.update(steps=20, warmup_steps=0, schedule="constant", lr=0.1)
  c.parts.a.lr = c.parts.b.lr = c.parts.c.lr = 0.1
  params = {"w": jnp.zeros((2,), jnp.float32)}
  ctx = objectives.PartContext(config=c, net=None, params=params)
  parts = state_lib.init_parts(c, ctx, jax.random.PRNGKey(0))
  state = state_lib.init_state(c, params, parts, jax.random.PRNGKey(1))
  return c, state, step_lib.make_train_step(c, None, None)


def test_each_part_updates_exactly_on_its_steps(two_parts):
  c, state, step = _setup(two_parts)
  batch = {"x": jnp.ones((4, 2)), "poison": jnp.zeros((4,))}
  seen = {"a": [], "b": [], "c": []}
  for k in range(12):
    before = {n: np.asarray(state.parts[n].params["v"]) for n in seen}
    state, m = step(state, batch, None)
    for n in seen:
      if not np.array_equal(before[n], np.asarray(state.parts[n].params["v"])):
        seen[n].append(k)
  assert seen["a"] == [0, 2, 4, 6, 8, 10]
  assert seen["b"] == [6, 9]
  assert seen["c"] == list(range(12))
  assert int(state.parts["a"].count) == 18 and int(state.parts["b"].count) == 2
  assert int(state.parts["c"].count) == 12
  assert np.isnan(float(m["b_loss"])) or k not in (6, 9)  # b idle at the last step (11)
  # the joint part got the student loss's gradient: it moves towards 2
  assert float(jnp.min(state.parts["c"].params["v"])) > 0.5


def test_a_non_finite_part_loss_skips_that_part_only(two_parts):
  c, state, step = _setup(two_parts)
  good = {"x": jnp.ones((4, 2)), "poison": jnp.zeros((4,))}
  bad = {"x": jnp.ones((4, 2)), "poison": jnp.ones((4,))}
  for _ in range(6):
    state, _ = step(state, good, None)
  b_before = np.asarray(state.parts["b"].params["v"])
  a_before = np.asarray(state.parts["a"].params["v"])
  w_before = np.asarray(state.params["w"])
  state, m = step(state, bad, None)  # step 6: b (poisoned) and a (poisoned too) are due
  np.testing.assert_array_equal(b_before, np.asarray(state.parts["b"].params["v"]))
  np.testing.assert_array_equal(a_before, np.asarray(state.parts["a"].params["v"]))
  assert int(state.parts["b"].skipped) == 1 and int(state.parts["a"].skipped) == 3
  assert not np.array_equal(w_before, np.asarray(state.params["w"]))  # the student moved
  assert int(state.skipped) == 0 and float(m["finite"]) == 1.0
  assert bool(jnp.all(jnp.isfinite(state.parts["b"].params["v"])))


def test_config_sections_and_validation(two_parts):
  c = config_lib.base(NAME)
  assert set(c.parts) == {"a", "b", "c"}
  assert (c.parts.a.every, c.parts.a.updates, c.parts.b.start) == (2, 3, 4)
  c.parts.c.updates = 2  # a joint part follows the student's steps
  with pytest.raises(ValueError, match="parts.c"):
    config_lib.validate(c)


def test_dmd_and_rcm_declare_their_parts():
  dmd, rcm, scm = (objectives.entry(n) for n in ("dmd", "rcm", "scm_ct"))
  # the critic starts as a copy of the teacher (plus a guidance-scale embedding if the student
  # takes the scale as an input): _score.init_critic
  assert dmd.parts["critic"].init is _score.init_critic and dmd.parts["critic"].updates == 5
  assert set(rcm.parts) == {"critic", "weighting"}
  assert (rcm.parts["critic"].updates, rcm.parts["critic"].start) == (4, 1000)
  assert scm.parts["weighting"].joint
  cfg = objectives.default_config("scm_ct")
  cfg.adaptive_weight = False
  assert scm.parts_for(cfg) == {}


def test_each_parts_schedule_spans_the_updates_it_makes(two_parts):
  """A part's learning-rate schedule is as long as its real update count: 21 steps with
  ``every=2`` run part ``a`` at 11 steps (33 updates), not 21 // 2 = 10 (a cosine schedule
  would have ended early and run the last updates at its final rate)."""
  c, state, step = _setup(two_parts)
  c.train.steps = 21
  batch = {"x": jnp.ones((4, 2)), "poison": jnp.zeros((4,))}
  for _ in range(21):
    state, _ = step(state, batch, None)
  for n in ("a", "b", "c"):
    assert int(state.parts[n].count) == state_lib.part_updates(c, n), n
  assert state_lib.part_updates(c, "a") == 33


def test_a_parts_own_metrics_are_logged_under_its_name(two_parts):
  """The part loss's metrics reach the step's metrics as ``<part>/<name>``, averaged over its
  updates at a step where it runs and NaN (logged as null) where it is idle -- before, they were
  dropped (DMD2's ``disc_margin`` and the critic's flow-matching loss never reached the logs)."""
  c, state, step = _setup(two_parts)
  batch = {"x": jnp.ones((4, 2)), "poison": jnp.zeros((4,))}
  state, m = step(state, batch, None)  # step 0: part a runs (3 updates), part b is idle
  assert np.isfinite(float(m["a/gap"])) and np.isnan(float(m["b/gap"]))
  # a's three updates from v = 0 towards 1 with lr 0.1 (plain Adam): gaps 2, then smaller
  assert 1.0 < float(m["a/gap"]) < 2.0


def test_an_idle_parts_latest_figures_reach_the_logged_steps(tmp_path):
  """A part updated every 2nd step (k = 0, 2, ...) is idle at every logged step when
  ``log_every`` is even (the line for ``done = k + 1`` comes from an odd ``k``): the log shows
  its latest update's figures, where it used to show null at every line."""
  import json

  from fmdistill import train

  t = config_lib.base("flow_matching")
  t.model.width, t.model.depth = 16, 1
  t.train.update(steps=4, batch_size=16, log_every=4, ckpt_every=4, warmup_steps=0,
                 tensorboard=False)
  train.train_and_evaluate(t, str(tmp_path / "t"), progress=False)
  c = config_lib.base("dmd")
  c.model.width, c.model.depth = 16, 1
  c.train.update(steps=6, batch_size=16, log_every=2, ckpt_every=6, warmup_steps=0,
                 tensorboard=False)
  c.teacher.workdir = str(tmp_path / "t")
  c.parts.critic.update(every=2, start=2, updates=1)
  train.train_and_evaluate(c, str(tmp_path / "s"), progress=False)
  lines = [json.loads(l) for l in open(tmp_path / "s" / "metrics.jsonl")]
  by_step = {l["step"]: l for l in lines if "critic_loss" in l}
  assert sorted(by_step) == [2, 4, 6]
  assert by_step[2]["critic_loss"] is None  # before its first update (k = 2): nothing to show
  for done in (4, 6):  # held from k = 2 and k = 4
    assert isinstance(by_step[done]["critic_loss"], float), by_step[done]
    assert any(k.startswith("critic/") and isinstance(v, float)
               for k, v in by_step[done].items()), by_step[done]
  assert by_step[4]["critic_loss"] != by_step[6]["critic_loss"]
