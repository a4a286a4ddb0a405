"""Reliability in-process, the workdir side: config drift, checked and pinned teachers, the
workdir lock (flock, stale locks, multi-host), and library output during checkpointing.
(Checkpoint integrity and the non-finite guard: ``tests/test_reliability_state.py``;
process-level faults: ``tests/test_reliability.py``.)"""
import errno
import glob
import json
import logging
import os

import numpy as np
import pytest

from fmdistill import checkpoint, runs, teacher as teacher_lib, train, workdir as workdir_lib
from fmdistill.errors import ConfigDriftError, TeacherError, WorkdirError
from tests.test_reliability_state import _files
from tests.test_train import tiny


def test_config_drift_is_listed_and_refused_unless_allowed(tmp_path):
  wd = str(tmp_path / "d")
  train.train_and_evaluate(tiny(steps=10), wd, progress=False)
  before = _files(wd)
  c = tiny(steps=10)
  c.train.lr, c.train.batch_size = 3e-4, 64
  with pytest.raises(ConfigDriftError, match=r"\(train\.batch_size: 32 -> 64; train\.lr: "
                     r"0\.001 -> 0\.0003\); rerun with the stored values, or pass "
                     r"--allow_config_change"):
    train.train_and_evaluate(c, wd, progress=False)
  assert _files(wd) == before     # nothing written, config.json not overwritten
  c.train.steps = 15
  train.train_and_evaluate(c, wd, progress=False, allow_config_change=True)
  prov = json.load(open(os.path.join(wd, "provenance.json")))
  assert prov[-1]["config_changes"] == ["train.batch_size: 32 -> 64", "train.lr: 0.001 -> 0.0003",
                                        "train.steps: 10 -> 15"]
  assert runs.read_config(wd).train.lr == 3e-4
  # evaluation, mesh and logging settings may change freely (recorded)
  c.eval.num_samples, c.train.log_every = 500, 3
  train.train_and_evaluate(c, wd, progress=False)
  assert "eval.num_samples: 2000 -> 500" in json.load(
      open(os.path.join(wd, "provenance.json")))[-1]["config_changes"]
  # the network's shape or the method never change in place, allowed or not
  c.model.width = 32
  with pytest.raises(WorkdirError, match="holds a different experiment"):
    train.train_and_evaluate(c, wd, progress=False, allow_config_change=True)


# ------------------------------------------------------------------ teachers

@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
  base = tmp_path_factory.mktemp("teachers")
  done, half, mf = str(base / "fm"), str(base / "half"), str(base / "mf")
  c = tiny(steps=10)
  c.train.keep = 3
  train.train_and_evaluate(c, done, progress=False)
  train.train_and_evaluate(tiny(steps=10), half, progress=False, stop_after=5)
  train.train_and_evaluate(tiny("meanflow", steps=2), mf, progress=False)
  return done, half, mf


def _student(teacher_wd, steps=4):
  c = tiny("direct_distill", steps=steps)
  c.train.ckpt_every = 2
  c.teacher.update(workdir=teacher_wd, which="ema_0.9", pair_num=64, pair_chunk=32, pair_nfe=8)
  return c


def test_unfinished_and_non_velocity_teachers_are_refused(teachers, tmp_path):
  _, half, mf = teachers
  with pytest.raises(TeacherError, match=r"teacher run .* is unfinished \(checkpoint step 5 of "
                     r"10\); let it finish, or set config\.teacher\.allow_unfinished=True"):
    train.setup(_student(half), str(tmp_path / "a"))
  assert not (tmp_path / "a").exists()
  c = _student(half)
  c.teacher.allow_unfinished = True
  _, t, _, _ = train.setup(c, str(tmp_path / "b"))
  assert t.ident["step"] == 5
  with pytest.raises(TeacherError, match=r"is a 'meanflow' run, a flowmap model; method .* needs "
                     r"a teacher of kind velocity \(velocity models: runs of \['flow_matching'"):
    train.setup(_student(mf), str(tmp_path / "c"))


def test_student_pins_its_teachers_identity(teachers, tmp_path):
  """A student records (run, step, weights' sha256) at its start; a restart reads the teacher
  at that step even after the teacher trained on, and refuses a teacher whose weights
  changed. The pair cache is keyed by the identity."""
  done, _, _ = teachers
  wd = str(tmp_path / "student")
  train.train_and_evaluate(_student(done), wd, progress=False, stop_after=2)
  pin = json.load(open(os.path.join(wd, "teacher.json")))
  assert pin["step"] == 10 and pin["workdir"] == os.path.abspath(done)
  meta = json.load(open(glob.glob(os.path.join(wd, "pairs", "*", "meta.json"))[0]))
  assert meta["teacher"]["params_sha256"] == pin["params_sha256"]
  key = teacher_lib.pair_cache_key({k: v for k, v in meta.items() if k not in ("num", "chunk")})
  assert os.path.isdir(os.path.join(wd, "pairs", key))
  # the teacher trains on (steps 10 -> 20): the student still reads step 10
  c = tiny(steps=20)
  c.train.keep = 3
  train.train_and_evaluate(c, done, progress=False, allow_config_change=True)
  _, t, _, _ = train.setup(_student(done), wd)
  assert t.ident["step"] == 10 and t.ident["params_sha256"] == pin["params_sha256"]
  # the teacher is replaced by another run with the same steps: refused, nothing written
  other = tiny(steps=20)
  other.seed, other.train.keep = 1, 3
  train.train_and_evaluate(other, done, progress=False, overwrite=True)
  before = _files(wd)
  with pytest.raises(TeacherError, match=r"is not the one this student started from "
                     r"\(params_sha256: "):
    train.train_and_evaluate(_student(done), wd, progress=False)
  assert _files(wd) == before


# ------------------------------------------------------------------ the workdir lock

def test_one_process_per_workdir(tmp_path):
  wd = str(tmp_path / "w")
  with workdir_lib.lock(wd):
    holder = json.load(open(os.path.join(wd, "lock")))
    assert holder["pid"] == os.getpid()
    with pytest.raises(WorkdirError, match=rf"is in use by another process \(pid "
                       rf"{os.getpid()} on "):
      train.train_and_evaluate(tiny(steps=2), wd, progress=False)
    assert os.listdir(wd) == ["lock"]          # the refused run wrote nothing
  assert not os.path.exists(wd)                # created by the lock, empty: removed again
  # a run that fails after taking the lock leaves no trace in a workdir it created
  with pytest.raises(RuntimeError):
    with workdir_lib.lock(wd):
      raise RuntimeError("boom")
  assert not os.path.exists(wd)


def test_lock_without_flock_detects_stale_locks(tmp_path, monkeypatch, capsys):
  """On file systems without flock the lock file itself is the lock: a live holder refuses,
  a dead holder on this host is taken over, a holder on another host refuses."""
  def no_flock(fd, op):
    raise OSError(errno.ENOLCK, "no locks available")
  monkeypatch.setattr(workdir_lib.fcntl, "flock", no_flock)
  wd = str(tmp_path / "w")
  os.makedirs(wd)
  with workdir_lib.lock(wd):
    with pytest.raises(WorkdirError, match="in use by another process"):
      workdir_lib.Lock(wd).acquire()
  assert not os.path.exists(os.path.join(wd, "lock"))
  host = workdir_lib.platform.node()
  for holder, refused in (({"pid": 2 ** 22 + 12345, "host": host}, False),
                          ({"pid": 1, "host": "elsewhere"}, True)):
    with open(os.path.join(wd, "lock"), "w") as f:
      json.dump(holder, f)
    if refused:
      with pytest.raises(WorkdirError, match="on elsewhere"):
        workdir_lib.Lock(wd).acquire()
    else:
      workdir_lib.Lock(wd).acquire().release()
      assert "removing a stale lock of pid" in capsys.readouterr().err


def test_multi_host_lock_is_held_by_process_zero(tmp_path, monkeypatch):
  from fmdistill import workdir as w
  wd = str(tmp_path / "w")
  os.makedirs(wd)
  monkeypatch.setattr(w.jax, "process_count", lambda: 2)
  monkeypatch.setattr(w.jax, "process_index", lambda: 1)
  said = []
  monkeypatch.setattr(w.multihost_utils, "broadcast_one_to_all",
                      lambda x: said.append(int(x)) or np.int32(1))
  with w.lock(wd) as held:       # process 1: follows process 0, holds nothing itself
    assert held is None and not os.path.exists(os.path.join(wd, "lock"))
  monkeypatch.setattr(w.multihost_utils, "broadcast_one_to_all", lambda x: np.int32(0))
  with pytest.raises(WorkdirError, match="process 0 could not lock it"):
    with w.lock(wd):
      pass
  monkeypatch.setattr(w.jax, "process_index", lambda: 0)
  monkeypatch.setattr(w.multihost_utils, "broadcast_one_to_all",
                      lambda x: said.append(int(x)) or x)
  with w.lock(wd) as held:       # process 0 takes it and tells the others
    assert held is not None and os.path.exists(os.path.join(wd, "lock"))
  assert said == [0, 1]


# ------------------------------------------------------------------ library output

def test_library_output_during_checkpointing_goes_to_the_log(tmp_path, capfd):
  class Raises:
    def __del__(self):
      raise RuntimeError("from a finaliser")

  with checkpoint.quiet(str(tmp_path)) as cap:
    logging.getLogger("asyncio").error("an asyncio complaint")
    os.write(2, b"native TensorStore noise\n")
    Raises()
  out = capfd.readouterr()
  assert out.err == "" and out.out == ""
  text = open(cap.path).read()
  assert cap.path == str(tmp_path / "library.log")
  for s in ("an asyncio complaint", "native TensorStore noise", "from a finaliser"):
    assert s in text
  with checkpoint.quiet(str(tmp_path / "x")) as cap:
    pass
  assert cap.path is None                       # nothing said, no file


def test_stragglers_of_a_failed_write_go_to_the_log_until_the_next_operation(tmp_path, capfd, caplog):
  """Abandoned orbax tasks report "Task exception was never retrieved" when collected, which
  may be after the failing block (a CI run printed them under the one-line error)."""
  with pytest.raises(OSError):
    with checkpoint.quiet(str(tmp_path)) as cap:
      raise OSError("disk full")
  logging.getLogger("asyncio").error("Task exception was never retrieved (late)")
  assert capfd.readouterr().err == "" and "(late)" not in caplog.text
  assert "(late)" in open(tmp_path / "library.log").read()
  with checkpoint.quiet(str(tmp_path / "x")):   # the next operation takes the logger back
    pass
  logging.getLogger("asyncio").error("a later complaint")
  assert "a later complaint" in caplog.text     # back to the usual handlers
