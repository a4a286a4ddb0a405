"""ReFlow rounds and progressive halving as stage chains: builders, flow-map teachers (and the
refusal of nonsense), straightness falling round over round, the pair cache's one writer per
chunk, and SIGKILL in the middle of a chain (a real subprocess) then rerun = uninterrupted."""
import importlib.util
import os
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest

from fmdistill import data, main, runs, train
from fmdistill.data import pairs
from fmdistill.errors import ConfigError
from fmdistill.eval import evaluate, metrics, report
from tests.test_reliability import _assert_identical, _env, _wait_for_checkpoint
from tests.test_train import tiny


def toy2d(arg):
  spec = importlib.util.spec_from_file_location(
      "toy2d", os.path.join(os.path.dirname(os.path.dirname(__file__)), "experiments", "toy2d.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(arg)


def test_builders_name_stages_and_refuse_bad_plans():
  c = toy2d("progressive,start=64,end=4")
  assert c.stage_order == ("teacher", "pd_32", "pd_16", "pd_8", "pd_4")
  assert c.stages.pd_8.objective.student_steps == 8 and 8 in c.stages.pd_8.eval.student_nfe
  c = toy2d("reflow,rounds=3,distill=True,teacher=/runs/fm")
  assert c.stage_order == ("reflow_1", "reflow_2", "reflow_3", "distill")
  assert c.stages.reflow_1.teacher.workdir == "/runs/fm" and not c.stages.reflow_2.teacher.workdir
  assert c.stages.distill.objective.pairs == "endpoints"
  for bad in ("progressive,start=48", "progressive,start=4,end=4", "progressive,end=0",
              "reflow,rounds=0"):
    with pytest.raises(ConfigError):
      toy2d(bad)


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory):
  wd = str(tmp_path_factory.mktemp("chain_teacher") / "fm")
  train.train_and_evaluate(tiny(steps=40), wd, progress=False)
  return wd


def _shrink(c, teacher_which="ema_0.9", steps=6):
  for name in c.stage_order:
    s = c.stages[name]
    s.model.width, s.model.depth = 16, 1
    s.train.update(steps=steps, batch_size=32, log_every=3, ckpt_every=3, warmup_steps=0)
    s.teacher.update(pair_num=64, pair_chunk=32, pair_nfe=4)
  c.stages[c.stage_order[0]].teacher.which = teacher_which
  return c


def test_progressive_chain_uses_flow_map_teachers_and_refuses_nonsense(tmp_path, tiny_teacher):
  c = _shrink(toy2d(f"progressive,start=4,end=1,teacher={tiny_teacher}"))
  wd = str(tmp_path / "pd")
  main.run(c, wd, evaluate=False, progress=False)
  assert runs.read_config(os.path.join(wd, "pd_1")).teacher.workdir == os.path.join(wd, "pd_2")
  assert runs.is_finished(os.path.join(wd, "pd_1"))
  # a method that needs a velocity teacher, pointed at a flow-map stage: refused, nothing written
  for method in ("direct_distill", "meanflow_distill", "reflow"):
    s = tiny(method, steps=2)
    s.teacher.update(workdir=os.path.join(wd, "pd_2"), which="ema_0.999")
    bad = str(tmp_path / method)
    with pytest.raises(ConfigError, match="a flowmap model; method .* needs a teacher of "
                                          "kind velocity"):
      train.train_and_evaluate(s, bad, progress=False)
    assert not os.path.exists(bad)
  s = tiny("progressive", steps=2)
  s.teacher.update(workdir=os.path.join(wd, "pd_2"), which="ema_0.999", guidance=2.0)
  with pytest.raises(ConfigError, match="teacher.guidance=2.0 applies to velocity teachers"):
    train.setup(s, str(tmp_path / "g"))
  s.teacher.guidance, s.objective.path = 1.0, "vp"
  with pytest.raises(ConfigError, match="not converted between paths"):
    train.setup(s, str(tmp_path / "p"))


def test_reflow_chain_straightens_round_over_round(tmp_path):
  """Teacher -> two ReFlow rounds on the moons (width-32 MLPs, 500 / 250 steps). Measured when
  written (1000 samples): straightness S(Z) .77 -> .0076 -> .0016 and 1-step sliced W2
  .90 -> .17 -> .16 (teacher -> round 1 -> round 2)."""
  c = toy2d("reflow,rounds=2,toy=moons")
  for name in c.stage_order:
    s = c.stages[name]
    s.model.width, s.model.depth = 32, 2
    s.train.update(steps=500 if name == "teacher" else 250, ckpt_every=10 ** 6,
                   log_every=10 ** 6, ema_decays=(0.99,))
    s.teacher.update(pair_num=4096, pair_chunk=4096, pair_nfe=32, which="ema_0.99")
    s.eval.which = "ema_0.99"
  wd = str(tmp_path / "rf")
  main.run(c, wd, evaluate=False, progress=False)
  src = data.make_source(c.stages.teacher.data, 0)
  ref = src.reference(1000, 0)
  S, W = {}, {}
  for name in c.stage_order:
    cfg, net, params = runs.load_params(os.path.join(wd, name), "ema_0.99")
    S[name] = report.ode_straightness(cfg, net, params, 0, 1000)
    x = evaluate.generate(cfg, net, params, jax.random.PRNGKey(0), 1000, 1)
    W[name] = metrics.sliced_w2(x, ref)
  assert S["teacher"] > 0.3 and S["reflow_1"] < 0.05 * S["teacher"], S
  assert S["reflow_2"] < S["reflow_1"], S
  assert W["reflow_1"] < 0.4 * W["teacher"], W


def test_pair_cache_has_one_writer_per_chunk(tmp_path):
  calls, lock = [], threading.Lock()

  def gen(c, n):
    with lock:
      calls.append(c)
    time.sleep(0.05)
    return {"traj": np.full((n, 2, 2), c, np.float32)}

  out = [None, None]
  def build(i):
    out[i] = pairs.build_cache(str(tmp_path), gen, 100, 16, {"k": 1}, False, i, 2, wait_s=60)
  threads = [threading.Thread(target=build, args=(i,)) for i in (0, 1)]
  [t.start() for t in threads]
  [t.join() for t in threads]
  assert sorted(calls) == list(range(7))  # ceil(100 / 16) chunks, each generated once
  np.testing.assert_array_equal(out[0]["traj"], out[1]["traj"])
  assert out[0]["traj"].shape == (100, 2, 2) and out[0]["traj"][99, 0, 0] == 6
  with pytest.raises(TimeoutError, match="chunk_00001.npz did not appear"):
    pairs.build_cache(str(tmp_path / "b"), gen, 32, 16, {"k": 1}, False, 0, 2, wait_s=0.2)


# ----------------------------------------------------------------------------- SIGKILL

def _chain_cmd(wd, arg, flags):
  return [sys.executable, "-m", "fmdistill.main", "--config", f"experiments/toy2d.py:{arg}",
          "--workdir", str(wd), "--progress=false", "--noeval", *flags]


def _flags(stages, steps, first_which="ema_0.9"):
  out = []
  for name, n in zip(stages, steps):
    p = f"--config.stages.{name}."
    out += [f"{p}model.width=16", f"{p}model.depth=1", f"{p}train.steps={n}",
            f"{p}train.batch_size=32", f"{p}train.ckpt_every=5", f"{p}train.keep=3",
            f"{p}train.log_every=5", f"{p}train.warmup_steps=0", f"{p}teacher.pair_num=128",
            f"{p}teacher.pair_chunk=32", f"{p}teacher.pair_nfe=4"]
  return out + [f"--config.stages.{stages[0]}.teacher.which={first_which}"]


@pytest.mark.parametrize("arg,stages,steps", [
    pytest.param("reflow,rounds=2", ("reflow_1", "reflow_2"), (30, 60), marks=pytest.mark.slow),
    pytest.param("progressive,start=8,end=1", ("pd_4", "pd_2", "pd_1"), (20, 20, 60),
                 marks=pytest.mark.slow)],
    ids=["reflow_round_2", "progressive_stage_3"])
def test_sigkill_in_the_last_stage_then_rerun_equals_an_uninterrupted_chain(
    root, tmp_path, tiny_teacher, arg, stages, steps):
  arg = f"{arg},teacher={tiny_teacher}"
  flags = _flags(stages, steps)
  ref = subprocess.run(_chain_cmd(tmp_path / "ref", arg, flags), cwd=root, env=_env(root),
                       capture_output=True, text=True, timeout=600)
  assert ref.returncode == 0, ref.stderr[-3000:]
  wd = tmp_path / "killed"
  p = subprocess.Popen(_chain_cmd(wd, arg, flags), cwd=root, env=_env(root),
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  kill_after = int(np.random.default_rng(int(time.time())).integers(10, steps[-1] - 15))
  _wait_for_checkpoint(str(wd / stages[-1]), kill_after, p, timeout=600)
  p.send_signal(signal.SIGKILL)
  p.wait()
  assert p.returncode == -signal.SIGKILL
  assert not runs.is_finished(str(wd / stages[-1]))
  again = subprocess.run(_chain_cmd(wd, arg, flags), cwd=root, env=_env(root),
                         capture_output=True, text=True, timeout=600)
  assert again.returncode == 0, again.stderr[-3000:]
  assert again.stderr.count("already finished") == len(stages) - 1
  for name, n in zip(stages, steps):
    a, b = runs.load_state(str(tmp_path / "ref" / name)), runs.load_state(str(wd / name))
    assert int(a["step"]) == int(b["step"]) == n
    _assert_identical(a, b)  # params, EMA, optimiser state, RNG key, counters
  if arg.startswith("reflow"):
    for name in stages:
      for chunk in sorted(os.listdir(tmp_path / "ref" / name / "pairs")):
        if chunk.endswith(".npz"):
          with np.load(tmp_path / "ref" / name / "pairs" / chunk) as x, \
               np.load(wd / name / "pairs" / chunk) as y:
            np.testing.assert_array_equal(x["traj"], y["traj"])
