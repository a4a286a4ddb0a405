"""Second-order flow-map matching is sampled as ``f = x + (s - t) (v + (s - t) NN)`` (seed
``004_*`` "Boundary conditions"), with the run's own frozen teacher velocity ``v``, everywhere a
run is read back to sample (``teacher.load_sampling_run``: the report, ``--mode=sample``, the
benchmarks) and in the train loop's evaluation -- not as the first-order ``x + (s - t) NN`` of
the raw network, which the sampler now refuses for such a run."""
import json
import os
import re
import shutil
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fmdistill import config as config_lib, data, objectives, runs, teacher, train
from fmdistill.errors import ConfigError
from fmdistill.eval import evaluate, report

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "experiments"))
import toy2d  # noqa: E402


def _small(c, steps):
  c.model.width, c.model.depth, c.train.batch_size = 16, 1, 32
  c.train.steps, c.train.log_every, c.train.warmup_steps = steps, steps, 0
  return c


@pytest.fixture(scope="module")
def runs_pair(tmp_path_factory):
  """A 20-step flow-matching teacher and a 3-step second-order ``fmm_forward`` student of it
  (teacher-initialised), the student's loop evaluating at its last step."""
  root = tmp_path_factory.mktemp("fmm2")
  teacher = str(root / "fm")
  train.train_and_evaluate(_small(toy2d.get_config("flow_matching"), 20), teacher,
                           progress=False)
  c = _small(toy2d.get_config("fmm_forward"), 3)
  c.objective.order = 2
  c.teacher.workdir = teacher
  c.train.eval_every = 3
  student = str(root / "fmm2")
  train.train_and_evaluate(c, student, progress=False)
  return teacher, student


def _teacher_velocity(teacher_wd, which, x, t):
  tr = runs.load_run(teacher_wd, which)  # the weights the student distils
  # a flow-matching teacher's network is its velocity at s = t (displacement, linear path)
  assert tr.config.objective.param == "displacement" and tr.config.objective.path == "linear"
  return tr.net(tr.params, x, t, t)


def test_the_sampling_run_is_the_second_order_map_with_the_runs_teacher(runs_pair):
  teacher_wd, student_wd = runs_pair
  run = teacher.load_sampling_run(student_wd)
  raw = runs.network(run.config)
  x = jax.random.normal(jax.random.PRNGKey(1), (64, 2))
  t = jax.random.uniform(jax.random.PRNGKey(2), (64,), minval=0.2, maxval=1.0)
  s = t * jax.random.uniform(jax.random.PRNGKey(3), (64,))
  v = _teacher_velocity(teacher_wd, run.config.teacher.which, x, t)
  student = runs.load_run(student_wd).params
  assert set(run.params) == {"student", "teacher"}
  expected = v + (s - t)[:, None] * raw(student, x, t, s)
  np.testing.assert_allclose(run.net(run.params, x, t, s), expected, rtol=1e-5, atol=1e-5)
  # the raw network alone is a different map (the first-order reading the report used to make)
  assert float(jnp.max(jnp.abs(raw(student, x, t, s) - expected))) > 1e-2


def test_the_teachers_weights_are_an_argument_of_the_sampler_not_compiled_in(runs_pair):
  """A closed-over teacher would be embedded in every sampling program as constants (all of a
  large teacher's weights, per program); its weights are an argument like the student's."""
  _, student_wd = runs_pair
  run = teacher.load_sampling_run(student_wd)
  fn = evaluate.sampler_fn(run.config, run.net, 8, 2)
  hlo = fn.lower(run.params, jax.random.PRNGKey(0)).as_text()
  main = next(line for line in hlo.splitlines() if "func.func public @main(" in line)
  n_args = len(jax.tree_util.tree_leaves(run.params)) + 1  # the weights and the key
  assert len(re.findall(r"%arg\d+:", main)) == n_args
  shapes = {tuple(x.shape) for x in jax.tree_util.tree_leaves(run.params["teacher"])
            if x.ndim == 2}
  dense = re.findall(r'stablehlo\.constant dense<(?:"0x|\[\[)[^>]*> : tensor<(\d+)x(\d+)xf32>',
                     hlo)  # matrices of distinct values compiled in as constants
  assert not [d for d in dense if tuple(map(int, d)) in shapes], dense


def test_a_zero_correction_samples_exactly_the_teachers_euler_step(runs_pair):
  """With ``NN = 0`` the map is ``x + (s - t) v(x, t)``: one jump from noise is the teacher's
  one Euler step from the same noise (same key), so the report's samples go through ``v``."""
  teacher_wd, student_wd = runs_pair
  run = teacher.load_sampling_run(student_wd)
  zeros = jax.tree_util.tree_map(jnp.zeros_like, run.params["student"])
  raw = runs.network(run.config)
  x = jnp.ones((3, 2))
  assert float(jnp.max(jnp.abs(raw(zeros, x, jnp.ones(3), jnp.zeros(3))))) == 0.0
  key = jax.random.PRNGKey(7)
  got = evaluate.generate(run.config, run.net, run.net.params_for(zeros), key, 256, 1)
  tr = runs.load_run(teacher_wd, run.config.teacher.which)
  euler = evaluate.generate(tr.config, tr.net, tr.params, key, 256, 1, sampler="ode")
  assert tr.config.eval.solver == "euler"
  np.testing.assert_allclose(got, euler, rtol=1e-5, atol=1e-5)
  # the teacher's step moves the noise: a map ignoring v would return the noise itself
  first = run.config.copy_and_resolve_references()
  first.objective.order = 1  # the raw network read as a first-order map
  noise = evaluate.generate(first, runs.network(run.config), zeros, key, 256, 1)
  assert float(np.max(np.abs(got - noise))) > 0.1


def test_the_samplers_cache_keeps_no_teacher_weights(runs_pair):
  """The sampler's cache (keyed by the network) reuses its program for the same network and,
  once a loaded run is dropped, its teacher weights are freed: the cache holds none (before,
  each load's key held a full teacher, up to 64 of them)."""
  import gc
  import weakref
  _, student_wd = runs_pair
  first = teacher.load_sampling_run(student_wd)
  leaf = weakref.ref(jax.tree_util.tree_leaves(first.params["teacher"])[0])
  fn = evaluate.sampler_fn(first.config, first.net, 8, 2)
  fn(first.params, jax.random.PRNGKey(0))
  assert evaluate.sampler_fn(first.config, first.net, 8, 2) is fn
  del first
  gc.collect()
  assert leaf() is None


def test_sampling_the_raw_network_of_such_a_run_is_refused(runs_pair):
  _, student_wd = runs_pair
  raw = runs.load_run(student_wd)  # the trained network alone
  with pytest.raises(ValueError, match="samples through its teacher"):
    evaluate.generate(raw.config, raw.net, raw.params, jax.random.PRNGKey(0), 8, 1)


def test_a_missing_teacher_is_named_when_such_a_run_is_sampled(runs_pair, tmp_path):
  _, student_wd = runs_pair
  moved = str(tmp_path / "student")
  shutil.copytree(student_wd, moved)
  with open(os.path.join(moved, "config.json")) as f:
    c = json.load(f)
  c["teacher"]["workdir"] = str(tmp_path / "gone")
  with open(os.path.join(moved, "config.json"), "w") as f:
    json.dump(c, f)
  with pytest.raises(teacher.TeacherError, match=r"config\.teacher\.workdir: no finished run at"):
    teacher.load_sampling_run(moved)


def test_a_student_of_such_a_run_is_told_it_cannot_start_from_its_weights(runs_pair, tmp_path):
  """A progressive stage distilling the second-order map: its weights (``student`` and
  ``teacher``) are not one network, so ``init_student`` is refused by name; without it the
  stage trains, jumping with the second-order map."""
  _, student_wd = runs_pair
  c = _small(config_lib.base("progressive"), 2)
  c.teacher.workdir = student_wd
  with pytest.raises(ConfigError, match=r"samples through its own frozen teacher.*"
                                        r"config\.teacher\.init_student=False"):
    train.train_and_evaluate(c, str(tmp_path / "pd"), progress=False)
  assert not os.path.exists(tmp_path / "pd" / "checkpoints")
  c.teacher.init_student = False
  train.train_and_evaluate(c, str(tmp_path / "pd2"), progress=False)
  assert runs.load_run(str(tmp_path / "pd2")).finished


def test_the_train_loops_evaluation_uses_the_second_order_map(runs_pair):
  """The loop's logged ``eval/sliced_w2_nfe1`` at the last step is the figure of the
  second-order map for the same weights, not the raw network's."""
  _, student_wd = runs_pair
  with open(os.path.join(student_wd, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  logged = [r["eval/sliced_w2_nfe1"] for r in rows if "eval/sliced_w2_nfe1" in r][-1]
  run = teacher.load_sampling_run(student_wd, runs.read_config(student_wd).eval.which)
  fn = evaluate.periodic_eval_fn(run.config, data.make_source(run.config.data, run.config.seed))
  state = types.SimpleNamespace(ema={}, params=run.params["student"])  # the evaluated weights
  assert fn(run.net, state)["sliced_w2_nfe1"] == pytest.approx(logged, rel=1e-4)
  first = run.config.copy_and_resolve_references()
  first.objective.order = 1  # the raw network read as a first-order map
  raw = evaluate.periodic_eval_fn(first, data.make_source(first.data, first.seed))(
      runs.network(run.config), state)["sliced_w2_nfe1"]
  assert abs(raw - logged) > 0.05 * logged


def test_only_second_order_maps_sample_through_the_teacher_and_count_two_evaluations():
  for method, order, expected in (("fmm_forward", 2, 2), ("fmm_forward", 1, 1),
                                  ("fmm_backward", 1, 1), ("fmm_forward_self", 1, 1),
                                  ("meanflow", None, 1)):
    c = toy2d.get_config(method)
    if order is not None:
      c.objective.order = order
    assert objectives.samples_with_teacher(c) == (expected == 2), (method, order)
    assert objectives.evals_per_jump(c) == expected, (method, order)


def test_the_report_counts_two_network_evaluations_per_step(runs_pair, tmp_path):
  """``report.md`` and ``metrics.json`` say what a second-order step costs: "1 (2 evaluations)"."""
  teacher_wd, student_wd = runs_pair
  res = report.evaluate_runs({"t": teacher_wd, "s": student_wd}, str(tmp_path))
  assert res["runs"]["s"]["evals_per_jump"] == 2 and res["runs"]["t"]["evals_per_jump"] == 1
  text = report.markdown(res, "second order")
  assert "| s | fmm_forward | 1 (2 evaluations) |" in text
  assert "| t | flow_matching | 1 |" in text
