"""Reliability in-process: integrity-checked checkpoints, the non-finite guard and
metrics.jsonl. (Config drift, teachers, the workdir lock and library output:
``tests/test_reliability_workdir.py``; process-level faults: ``tests/test_reliability.py``.)"""
import glob
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from fmdistill import checkpoint, metrics_log, runs, state as state_lib, step as step_lib
from fmdistill import train
from fmdistill.errors import CheckpointMismatchError
from tests.test_train import tiny


def _assert_identical(a, b):
  la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
  assert len(la) == len(lb)
  for x, y in zip(la, lb):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _files(wd):
  return {os.path.join(d, f): os.path.getmtime(os.path.join(d, f))
          for d, _, fs in os.walk(wd) for f in fs}


def _all_finite(tree):
  return all(bool(np.all(np.isfinite(np.asarray(x)))) for x in jax.tree_util.tree_leaves(tree)
             if np.issubdtype(np.asarray(x).dtype, np.floating))


def _strict(path):
  """metrics.jsonl parsed as strict JSON (a bare NaN/Infinity raises)."""
  bad = lambda c: (_ for _ in ()).throw(ValueError(f"non-JSON constant {c}"))
  return [json.loads(l, parse_constant=bad) for l in open(path)]


# ------------------------------------------------------------------ checkpoints

def _flip(step_dir, n_files=2):
  """Flip three bytes in each of the ``n_files`` largest array data files of a step."""
  files = sorted(glob.glob(os.path.join(step_dir, "state", "ocdbt.process_0", "d", "*")),
                 key=os.path.getsize)[-n_files:]
  for f in files:
    b = bytearray(open(f, "rb").read())
    for i in (len(b) // 3, len(b) // 2, 2 * len(b) // 3):
      b[i] ^= 0xFF
    open(f, "wb").write(bytes(b))


def _tamper(c, wd, step):
  """Rewrite ``step`` with one changed number in every parameter array but the checksums of
  the original: what bit rot that orbax reads without complaint looks like."""
  _, _, _, target = train.setup(c, wd)
  mngr = checkpoint.manager(wd, keep=10)
  good = checkpoint.restore(mngr, step, target)
  sums = checkpoint.checksums(good)
  bad = good.replace(params=jax.tree_util.tree_map(lambda x: x.at[(0,) * x.ndim].add(1.0),
                                                   good.params))
  mngr.delete(step)
  mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(bad),
                                          checksums=ocp.args.JsonSave(sums)), force=True)
  mngr.close()


def test_corrupt_checkpoints_fall_back_to_the_newest_good_one(tmp_path, capsys):
  """Flipped bytes, numbers changed behind orbax's back (failed checksums), a missing
  state/_METADATA and truncated files: readers skip them (moving nothing), a resumed run sets
  each aside and resumes exactly from the newest good one."""
  wd = str(tmp_path / "c")
  c = tiny(steps=60)
  c.train.keep = 6
  train.train_and_evaluate(c, wd, progress=False, stop_after=50)
  ck = os.path.join(wd, "checkpoints")
  _flip(os.path.join(ck, "50"))
  _tamper(c, wd, 40)
  os.remove(os.path.join(ck, "30", "state", "_METADATA"))
  for d, _, fs in os.walk(os.path.join(ck, "20")):
    for f in fs:
      with open(os.path.join(d, f), "r+b") as fh:
        fh.truncate(os.path.getsize(os.path.join(d, f)) // 2)
  capsys.readouterr()
  read = runs.load_run(wd, "params")                   # a reader: skips, moves nothing
  err = capsys.readouterr().err.splitlines()
  assert read.step == 10 and len(err) == 4, err
  assert all(f"checkpoint step {s} of run" in l for s, l in zip((50, 40, 30, 20), err)), err
  n_params = len(jax.tree_util.tree_leaves(read.params))
  assert f"checksum mismatch in {n_params} array(s): params/fc0a/bias" in err[1], err[1]  # all
  assert "state/_METADATA is missing" in err[2]
  assert sorted(os.listdir(ck), key=int) == ["1", "10", "20", "30", "40", "50"]
  _, resumed = train.train_and_evaluate(c, wd, progress=False)
  err = capsys.readouterr().err
  for s in (50, 40, 30, 20):
    assert f"warning: checkpoint step {s} is unreadable" in err
    assert os.path.isdir(os.path.join(wd, "corrupt_checkpoints", str(s)))  # kept, not deleted
  _, straight = train.train_and_evaluate(c, str(tmp_path / "s"), progress=False)
  _assert_identical(straight, resumed)   # resumed from step 10, exactly


def test_checksums_see_every_flipped_bit_and_every_swap():
  tree = {"f": jnp.linspace(-1, 1, 12, dtype=jnp.float32).reshape(3, 4),
          "h": jnp.arange(5, dtype=jnp.bfloat16), "i": jnp.arange(7, dtype=jnp.int32),
          "k": jax.random.PRNGKey(3), "b": jnp.array([True, False]),
          "typed": jax.random.key(1)}
  ref = checkpoint.checksums(tree)
  assert set(ref) == {"f", "h", "i", "k", "b", "typed"}
  f = np.asarray(tree["f"]).copy()
  for bit in range(32):
    g = f.copy().view(np.uint32)
    g[1, 2] ^= np.uint32(1 << bit)
    assert checkpoint.checksums(dict(tree, f=jnp.asarray(g.view(np.float32))))["f"] != ref["f"]
  swapped = f.copy()
  swapped[0, [0, 1]] = swapped[0, [1, 0]]
  assert checkpoint.checksums(dict(tree, f=jnp.asarray(swapped)))["f"] != ref["f"]
  assert checkpoint.checksums(tree) == ref   # deterministic


def test_mismatched_checkpoint_is_refused_without_touching_anything(tmp_path):
  wd = str(tmp_path / "m")
  train.train_and_evaluate(tiny(steps=10), wd, progress=False)
  before = _files(wd)
  c = tiny(steps=10)
  c.train.ema_decays = (0.99,)   # changes the state's structure
  c.eval.which = "ema_0.99"
  with pytest.raises(CheckpointMismatchError,
                     match=r"ema/ema_0\.9/fc0a/bias: checkpoint \(16,\) vs config None"):
    train.train_and_evaluate(c, wd, progress=False, allow_config_change=True)
  assert _files(wd) == before


# ------------------------------------------------------------------ non-finite values

def test_guard_checks_the_updated_parameters():
  """A finite loss and gradient whose update overflows is skipped like a NaN loss."""
  import optax
  params = {"w": jnp.ones(3)}
  opt = optax.sgd(3e38)
  new, _, ok = step_lib.guarded_update(opt, jnp.float32(1.0), {"w": jnp.full(3, -10.0)},
                                       params, opt.init(params))
  assert not bool(ok)
  _assert_identical(new, params)


def test_exploding_run_stops_with_a_finite_last_good_state(tmp_path):
  """lr = 3e38 (finite, so valid) for the student and sCM's jointly trained weighting: the
  guard skips every update that leaves a non-finite value, the run stops, and the state it
  saves (params, EMAs, optimiser states, the part) is finite; metrics.jsonl stays strict
  JSON, the non-finite figures written as null and named."""
  c = tiny("scm_ct", steps=40)
  c.train.update(lr=3e38, warmup_steps=0, max_consecutive_skips=3, log_every=1)
  c.parts.weighting.lr = 3e38
  wd = str(tmp_path / "boom")
  with pytest.raises(FloatingPointError, match="last good parameters are saved in"):
    train.train_and_evaluate(c, wd, progress=False)
  saved = runs.load_state(wd)
  assert int(saved["skipped"]) >= 3
  for name in ("params", "ema", "opt_state", "parts"):
    assert _all_finite(saved[name]), name
  lines = _strict(os.path.join(wd, "metrics.jsonl"))
  flagged = [l for l in lines if l.get("nonfinite")]
  assert flagged and all(l[k] is None for l in flagged for k in l["nonfinite"])
  assert "loss" in flagged[-1]["nonfinite"]


def test_a_non_finite_state_is_not_saved_as_the_last_good_one(tmp_path, monkeypatch):
  c = tiny(steps=50)
  c.train.max_consecutive_skips = 4
  real_init, real_source = state_lib.init_state, train.make_source

  def nan_ema(config, params, parts, key):
    s = real_init(config, params, parts, key)
    return s.replace(ema={k: jax.tree_util.tree_map(lambda x: x * jnp.nan, v)
                          for k, v in s.ema.items()})

  class Poisoned:
    def __init__(self, src):
      self.src, self.shape, self.num_classes = src, src.shape, src.num_classes

    def batch(self, step, n, *a):
      b = self.src.batch(step, n, *a)
      return {"x": b["x"] * np.nan} if step >= 12 else b

  monkeypatch.setattr(state_lib, "init_state", nan_ema)
  monkeypatch.setattr(train, "make_source", lambda cfg: Poisoned(real_source(cfg)))
  wd = str(tmp_path / "nan")
  with pytest.raises(FloatingPointError, match=r"state itself is not finite \(ema/ema_0\.9, ema/power_6\.94\); "
                     r"stopped without saving it, the newest checkpoint is step 10"):
    train.train_and_evaluate(c, wd, progress=False)
  assert checkpoint.manager(wd, read_only=True).latest_step() == 10


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
  assert checkpoint.manager(wd, read_only=True).latest_step() == 16
  saved = runs.load_state(wd)
  assert int(saved["skipped"]) == 4
  _, good = train.train_and_evaluate(tiny(steps=50), str(tmp_path / "g"), progress=False,
                                     stop_after=12)
  _assert_identical(good.params, saved["params"])  # the last good parameters, untouched
  assert _all_finite(saved)
  logged = _strict(os.path.join(wd, "metrics.jsonl"))
  assert logged[-1]["step"] == 15 and logged[-1]["loss"] is None
  assert set(logged[-1]["nonfinite"]) >= {"loss", "grad_norm"}


# ------------------------------------------------------------------ metrics.jsonl

def test_metrics_log_is_repaired_and_time_continues_across_resumes(tmp_path, capsys):
  wd = str(tmp_path / "log")
  train.train_and_evaluate(tiny(steps=20), wd, progress=False, stop_after=10)
  path = os.path.join(wd, "metrics.jsonl")
  with open(path, "a") as f:
    f.write('{"loss": 1.0, "st')          # a write cut short
  capsys.readouterr()
  train.train_and_evaluate(tiny(steps=20), wd, progress=False)
  err = capsys.readouterr().err
  assert f"note: {path}: dropped 1 unreadable line(s) (line 3" in err and "kept 2" in err
  lines = _strict(path)
  assert [l["step"] for l in lines] == [5, 10, 15, 20]
  times = [l["time"] for l in lines]
  assert times == sorted(times) and times[2] > times[1] > 0   # continued, not restarted
  assert metrics_log.clean({"a": float("nan"), "b": 1.0}) == {"a": None, "b": 1.0,
                                                              "nonfinite": ["a"]}
