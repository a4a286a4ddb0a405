"""Reliability: real SIGKILL/SIGTERM, corrupt and mismatched checkpoints, non-finite losses,
bad input (one clear line, nothing written), workdir safety, and fuzzed config overrides."""
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fmdistill import checkpoint, runs, train
from fmdistill.errors import CheckpointMismatchError
from tests.test_train import tiny

CLI_TINY = ["--config.model.width=16", "--config.model.depth=1", "--config.train.batch_size=32",
            "--config.train.ckpt_every=5", "--config.train.keep=3", "--config.train.log_every=5",
            "--progress=false", "--noeval"]


def _cmd(wd, *extra, method="flow_matching"):
  return [sys.executable, "-m", "fmdistill.main", "--config",
          f"experiments/toy2d.py:{method}", "--workdir", str(wd), *CLI_TINY, *extra]


def _env(root):
  return dict(os.environ, PYTHONPATH=root, JAX_PLATFORMS="cpu")


def _final_state(wd):
  return runs.load_state(str(wd))


def _assert_identical(a, b):
  la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
  assert len(la) == len(lb)
  for x, y in zip(la, lb):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _wait_for_checkpoint(wd, at_least, proc, timeout=120):
  ck = os.path.join(wd, "checkpoints")
  t0 = time.time()
  while time.time() - t0 < timeout:
    steps = [int(d) for d in os.listdir(ck) if d.isdigit()] if os.path.isdir(ck) else []
    if steps and max(steps) >= at_least:
      return max(steps)
    assert proc.poll() is None, proc.communicate()[1][-2000:]
    time.sleep(0.02)
  raise TimeoutError("no checkpoint appeared")


@pytest.fixture(scope="module")
def tiny_teacher(root, tmp_path_factory):
  """A finished (tiny) flow-matching run for the distillation methods."""
  wd = tmp_path_factory.mktemp("teacher") / "fm"
  r = subprocess.run(_cmd(wd, "--config.train.steps=10"), cwd=root, env=_env(root),
                     capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-2000:]
  return str(wd)


@pytest.mark.parametrize("method", ["flow_matching", "scm_ct", "dmd"])
def test_sigkill_then_rerun_is_bit_identical(root, tmp_path, method, request):
  """FM, a tangent-family method with a jointly trained part (sCM: one jvp per step, learned
  weighting) and a method with a critic part (alternating updates, two optimisers): killed at
  a random step, rerun, identical to an uninterrupted run."""
  steps = ["--config.train.steps=60"]
  if method == "dmd":
    steps.append(f"--config.teacher.workdir={request.getfixturevalue('tiny_teacher')}")
  ref = subprocess.run(_cmd(tmp_path / "ref", *steps, method=method), cwd=root, env=_env(root),
                       capture_output=True, text=True, timeout=300)
  assert ref.returncode == 0, ref.stderr[-2000:]
  wd = tmp_path / "killed"
  rng = np.random.default_rng(int(time.time()))
  kill_after = int(rng.integers(10, 45))
  p = subprocess.Popen(_cmd(wd, *steps, method=method), cwd=root, env=_env(root),
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  _wait_for_checkpoint(str(wd), kill_after, p)
  p.send_signal(signal.SIGKILL)
  p.wait()
  assert p.returncode == -signal.SIGKILL
  again = subprocess.run(_cmd(wd, *steps, method=method), cwd=root, env=_env(root),
                         capture_output=True, text=True, timeout=300)
  assert again.returncode == 0, again.stderr[-2000:]
  a, b = _final_state(tmp_path / "ref"), _final_state(wd)
  assert int(a["step"]) == int(b["step"]) == 60
  _assert_identical(a, b)  # params, EMA, optimiser states (critic too), RNG key, counters
  if method == "scm_ct":
    assert int(a["parts"]["weighting"]["count"]) == 60
  if method == "dmd":
    assert set(a["parts"]["critic"]) >= {"params", "opt_state", "count", "skipped"}
    assert int(a["parts"]["critic"]["count"]) == 60 * 5  # 5 critic updates per student step


def test_sigterm_saves_and_exits_zero(root, tmp_path):
  wd = tmp_path / "term"
  p = subprocess.Popen(_cmd(wd, "--config.train.steps=100000"), cwd=root, env=_env(root),
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  _wait_for_checkpoint(str(wd), 10, p)
  p.send_signal(signal.SIGTERM)
  _, err = p.communicate(timeout=60)
  assert p.returncode == 0, err[-2000:]
  assert "preempted: saved a checkpoint at step" in err
  step = int(err.split("at step ")[1].split(";")[0])
  assert checkpoint.manager(str(wd), read_only=True).latest_step() == step


def test_truncated_latest_checkpoint_falls_back(tmp_path, capsys):
  wd = str(tmp_path / "c")
  c = tiny(steps=40)
  c.train.keep = 3
  train.train_and_evaluate(c, wd, progress=False, stop_after=30)
  latest = os.path.join(wd, "checkpoints", "30")
  for dirpath, _, files in os.walk(latest):
    for f in files:
      path = os.path.join(dirpath, f)
      with open(path, "r+b") as fh:
        fh.truncate(os.path.getsize(path) // 2)
  _, resumed = train.train_and_evaluate(c, wd, progress=False)
  err = capsys.readouterr().err
  assert "warning: checkpoint step 30 is unreadable" in err
  assert os.path.isdir(os.path.join(wd, "corrupt_checkpoints", "30"))  # kept, not deleted
  _, straight = train.train_and_evaluate(tiny(steps=40), str(tmp_path / "s"), progress=False)
  # resuming from step 20 is exact, so the end state equals the uninterrupted run's
  _assert_identical(straight.params, resumed.params)


def test_mismatched_checkpoint_is_refused_without_touching_anything(tmp_path):
  wd = str(tmp_path / "m")
  train.train_and_evaluate(tiny(steps=10), wd, progress=False)
  before = {os.path.join(d, f): os.path.getmtime(os.path.join(d, f))
            for d, _, fs in os.walk(wd) for f in fs}
  c = tiny(steps=20)
  c.train.ema_decays = (0.99,)   # not part of the experiment's identity, but changes the state
  with pytest.raises(CheckpointMismatchError, match=r"ema/ema_0\.9/fc0a/bias: checkpoint \(16,\) vs config None"):
    train.train_and_evaluate(c, wd, progress=False)
  after = {os.path.join(d, f): os.path.getmtime(os.path.join(d, f))
           for d, _, fs in os.walk(wd) for f in fs}
  assert before == after


def test_consecutive_non_finite_steps_stop_with_a_saved_checkpoint(tmp_path, monkeypatch):
  c = tiny(steps=50)
  c.train.max_consecutive_skips = 4
  real = train.make_source

  class Poisoned:
    def __init__(self, src):
      self.src, self.shape, self.num_classes = src, src.shape, src.num_classes
    def batch(self, step, n, *a):
      b = self.src.batch(step, n, *a)
      return {"x": b["x"] * np.nan} if step >= 12 else b

  monkeypatch.setattr(train, "make_source", lambda cfg: Poisoned(real(cfg)))
  wd = str(tmp_path / "nan")
  with pytest.raises(FloatingPointError, match="4 consecutive non-finite"):
    train.train_and_evaluate(c, wd, progress=False)
  monkeypatch.setattr(train, "make_source", real)
  mngr = checkpoint.manager(wd, read_only=True)
  assert mngr.latest_step() == 16
  saved = _final_state(wd)
  assert int(saved["skipped"]) == 4
  _, good = train.train_and_evaluate(tiny(steps=50), str(tmp_path / "g"), progress=False,
                                     stop_after=12)
  _assert_identical(good.params, saved["params"])  # the last good parameters, untouched
  assert bool(jnp.all(jnp.isfinite(jax.flatten_util.ravel_pytree(saved["params"])[0])))


BAD_INPUTS = [
    (["--config.train.stepz=5"], "unknown config field 'stepz'"),
    (["--config.train.steps=ten"], "invalid literal"),
    (["--config.method=meanflw"], "config.method='meanflw' is invalid"),
    (["--config.data.name=digits"], "config.model.name='mlp' is invalid"),
    (["--config.model.dtype=float16"], "config.model.dtype"),
    (["--config.data.toy=swissroll"], "config.data.toy"),
    (["--config.train.batch_size=0"], "config.train.batch_size"),
    (["--config.data.name=tfds", "--config.model.name=dit",
      "--config.data.tfds_name=mnist"], "data.data_dir is empty"),
    (["--config.data.name=tfds", "--config.model.name=dit", "--config.data.tfds_name=mnist",
      "--config.data.data_dir=/nonexistent"], "not found under"),
]


@pytest.mark.parametrize("args,match", BAD_INPUTS, ids=[a[0][0] for a in BAD_INPUTS])
def test_bad_input_is_one_line_and_writes_nothing(root, tmp_path, args, match):
  wd = tmp_path / "w"
  r = subprocess.run(_cmd(wd, *args), cwd=root, env=_env(root), capture_output=True,
                     text=True, timeout=120)
  assert r.returncode != 0
  lines = [l for l in r.stderr.splitlines() if l.strip()]
  assert len(lines) == 1 and match in lines[0], r.stderr[-2000:]
  assert not wd.exists()


def test_missing_teacher_is_one_line_and_writes_nothing(root, tmp_path):
  wd = tmp_path / "student"
  r = subprocess.run(_cmd(wd, f"--config.teacher.workdir={tmp_path / 'nope'}",
                          method="direct_distill"), cwd=root, env=_env(root),
                     capture_output=True, text=True, timeout=120)
  assert r.returncode != 0
  lines = [l for l in r.stderr.splitlines() if l.strip()]
  assert len(lines) == 1 and "no finished run at" in lines[0], r.stderr
  assert not wd.exists()


def test_workdir_holding_another_experiment_is_refused(root, tmp_path):
  wd = tmp_path / "exp"
  ok = subprocess.run(_cmd(wd, "--config.train.steps=5"), cwd=root, env=_env(root),
                      capture_output=True, text=True, timeout=120)
  assert ok.returncode == 0, ok.stderr
  prov = (wd / "provenance.json").read_text()
  assert "git_commit" in prov and "argv" in prov
  other = subprocess.run(_cmd(wd, "--config.train.steps=5", "--config.data.toy=moons"),
                         cwd=root, env=_env(root), capture_output=True, text=True, timeout=120)
  assert other.returncode != 0 and "holds a different experiment" in other.stderr
  assert "data.toy: 'checkerboard' != 'moons'" in other.stderr
  forced = subprocess.run(_cmd(wd, "--config.train.steps=5", "--config.data.toy=moons",
                               "--overwrite"), cwd=root, env=_env(root), capture_output=True,
                          text=True, timeout=120)
  assert forced.returncode == 0, forced.stderr
  moved = [p for p in tmp_path.iterdir() if p.name.startswith("exp.replaced-")]
  assert len(moved) == 1 and (moved[0] / "checkpoints").is_dir()   # the old run is kept
  assert runs.read_config(str(wd)).data.toy == "moons"
