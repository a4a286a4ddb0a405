"""Workdir safety, ownership and provenance.

A workdir belongs to one experiment: the fields in ``IDENTITY`` (method, objective, model,
data, teacher, seed) must match the ``config.json`` already there, or the run refuses to start
(``--overwrite`` moves the old workdir aside, it never deletes it). Any other field that differs
from the stored config (learning rate, batch size, steps, ...) is listed in one line and
refused unless ``--allow_config_change``; the change is then recorded in ``provenance.json``.
Fields that do not change what is trained (``FREE``: evaluation, mesh, logging cadence) may
change freely and are recorded too.

One process owns a workdir at a time (``lock``): an exclusive advisory lock on
``<workdir>/lock`` (``flock``; the kernel releases it on any exit, SIGKILL included), holding
the owner's pid, host and start time for the refusal message. On file systems without
``flock`` the lock file itself is the lock, and a lock left by a dead process on the same host
is detected by its pid and taken over. In a multi-process job process 0 holds it.
"""
from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import platform
import shutil
import subprocess
import sys

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from fmdistill.errors import ConfigDriftError, WorkdirError

IDENTITY = ("method", "objective", "model", "data", "teacher", "seed", "data_shape")
# fields that may change on resume without --allow_config_change (still recorded)
FREE = ("eval.", "mesh.", "description", "stage_order", "train.log_every", "train.eval_every",
        "train.ckpt_every", "train.keep", "train.max_consecutive_skips", "train.tensorboard",
        "teacher.allow_unfinished", "teacher.pair_cache")
LOCK = "lock"


def _flat(d, prefix=""):
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = list(v) if isinstance(v, (list, tuple)) else v
  return out


def _free(field: str) -> bool:
  return any(field == f or (f.endswith(".") and field.startswith(f)) for f in FREE)


def _compared(old: dict, new: dict) -> tuple[dict, dict]:
  """Flattened ``old`` and ``new`` on the fields both have (a field the library added or
  removed since ``old`` was written is not a change of the experiment)."""
  a, b = _flat(old), _flat(json.loads(json.dumps(new)))
  common = set(a) & set(b)
  return {k: a[k] for k in common}, {k: b[k] for k in common}


def differences(old: dict, new: dict) -> list[str]:
  """``'field: old != new'`` for every identity field that differs."""
  a, b = _compared({k: old[k] for k in IDENTITY if k in old},
                   {k: new[k] for k in IDENTITY if k in new})
  return [f"{k}: {a[k]!r} != {b[k]!r}" for k in sorted(a) if a[k] != b[k] and not _free(k)]


def changes(old: dict, new: dict) -> list[str]:
  """``'field: old -> new'`` for every other field that differs (free ones included)."""
  a, b = _compared(old, new)
  ident = lambda k: k.split(".")[0] in IDENTITY and not _free(k)
  return [f"{k}: {a[k]!r} -> {b[k]!r}" for k in sorted(a) if a[k] != b[k] and not ident(k)]


FILLED_IN = ("data_shape", "objective.num_classes", "model.native_param", "model.native_path",
             "model.native_sigma_d")  # set by train.setup from the data and the teacher


def _stored(workdir: str) -> dict | None:
  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    return json.load(f)


def same_experiment(workdir: str, config: ml_collections.ConfigDict) -> bool:
  """Whether ``workdir`` holds the experiment ``config`` describes, before ``train.setup``
  fills in the fields it derives (``FILLED_IN``)."""
  old = _stored(workdir)
  if old is None:
    return False
  new = json.loads(config.to_json_best_effort())
  return not [d for d in differences(old, new) if d.split(":")[0] not in FILLED_IN]


def _shown(items: list[str], n: int = 4) -> str:
  return "; ".join(items[:n]) + (f"; and {len(items) - n} more" if len(items) > n else "")


def check_path(workdir: str) -> None:
  """Refuse a workdir that is a file, lies under a file, or cannot be written (one line)."""
  path = os.path.abspath(workdir)
  if os.path.exists(path) and not os.path.isdir(path):
    raise WorkdirError(f"--workdir {workdir!r} is a file, not a directory")
  parent = path
  while not os.path.exists(parent):
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent):
    raise WorkdirError(f"--workdir {workdir!r} cannot be created: {parent!r} is a file")
  if not os.access(parent, os.W_OK | os.X_OK):
    raise WorkdirError(f"--workdir {workdir!r} is not writable ({parent!r}: permission "
                       "denied)")


def check(workdir: str, config: ml_collections.ConfigDict, overwrite: bool = False,
          allow_change: bool = False) -> None:
  """Refuse a workdir that holds a different experiment (with ``overwrite``, move it aside),
  or whose run was started with other settings (unless ``allow_change``)."""
  old = _stored(workdir)
  if old is None:
    return
  new = json.loads(config.to_json_best_effort())
  diff = differences(old, new)
  if diff:
    if not overwrite:
      raise WorkdirError(f"workdir {workdir!r} holds a different experiment ({_shown(diff)}); "
                         "pass --overwrite to move it aside, or choose a new --workdir")
    _move_aside(workdir)
    return
  drift = [c for c in changes(old, new) if not _free(c.split(":")[0])]
  if drift and not allow_change:
    raise ConfigDriftError(
        f"workdir {workdir!r} was started with other settings ({_shown(drift)}); rerun with "
        "the stored values, or pass --allow_config_change to resume with these (recorded in "
        "provenance.json)")


def _move_aside(workdir: str) -> None:
  """Move everything in ``workdir`` but the lock to ``<workdir>.replaced-<time>``."""
  stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
  dest = f"{workdir.rstrip(os.sep)}.replaced-{stamp}"
  os.makedirs(dest)
  for name in os.listdir(workdir):
    if name != LOCK:
      shutil.move(os.path.join(workdir, name), os.path.join(dest, name))
  print(f"moved the previous experiment in {workdir} to {dest}", file=sys.stderr)


class Lock:
  """An exclusive advisory lock on ``<workdir>/lock`` (see the module docstring)."""

  def __init__(self, workdir: str):
    self.workdir, self.path = workdir, os.path.join(workdir, LOCK)
    self.fd, self.created, self.flock = None, False, True

  def _holder(self) -> dict:
    try:
      with open(self.path) as f:
        return json.loads(f.read() or "{}")
    except (OSError, ValueError):
      return {}

  def _refuse(self, holder: dict):
    who = (f"pid {holder.get('pid', '?')} on {holder.get('host', '?')} since "
           f"{holder.get('since', '?')}")
    raise WorkdirError(f"workdir {self.workdir!r} is in use by another process ({who}; lock "
                       f"{self.path}); wait for it to finish, or stop it first")

  def acquire(self) -> "Lock":
    if not os.path.isdir(self.workdir):
      os.makedirs(self.workdir)
      self.created = True
    try:
      while self.fd is None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
          fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
          os.close(fd)
          self._refuse(self._holder())
        except OSError as e:  # no flock on this file system: the file is the lock
          os.close(fd)
          if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            raise
          self.flock = False
          self._acquire_file()
          return self
        try:
          same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
        except FileNotFoundError:  # released (and unlinked) between open and flock
          same = False
        if same:
          self.fd = fd
        else:
          os.close(fd)
      self._write()
    except BaseException:
      self._cleanup()
      raise
    return self

  def _acquire_file(self) -> None:
    """The lock file is the lock: created complete (a hard link of a written temporary file,
    which fails if it exists); a holder that is not running on this host is stale."""
    with contextlib.suppress(OSError):
      if os.path.getsize(self.path) == 0:  # left by the flock probe: never a holder's file
        os.unlink(self.path)
    tmp = f"{self.path}.{platform.node()}.{os.getpid()}"
    self.fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    self._write()
    try:
      for _ in range(3):
        try:
          os.link(tmp, self.path)
          return
        except FileExistsError:
          holder = self._holder()
          if holder.get("host") == platform.node() and not _alive(holder.get("pid")):
            print(f"note: removing a stale lock of pid {holder.get('pid')} (no longer "
                  f"running) in {self.workdir}", file=sys.stderr)
            with contextlib.suppress(FileNotFoundError):
              os.unlink(self.path)
            continue
          os.close(self.fd)
          self.fd = None
          self._refuse(holder)
      os.close(self.fd)
      self.fd = None
      self._refuse(self._holder())
    finally:
      os.unlink(tmp)

  def _write(self) -> None:
    info = dict(pid=os.getpid(), host=platform.node(),
                since=datetime.datetime.now().isoformat(timespec="seconds"))
    os.ftruncate(self.fd, 0)
    os.pwrite(self.fd, json.dumps(info).encode(), 0)

  def release(self) -> None:
    if self.fd is not None:
      with contextlib.suppress(OSError):
        if os.fstat(self.fd).st_ino == os.stat(self.path).st_ino:
          os.unlink(self.path)  # while still locked: a waiting opener re-checks the inode
      os.close(self.fd)
      self.fd = None
    self._cleanup()

  def _cleanup(self) -> None:
    """Remove the workdir again if this lock created it and nothing else was written."""
    if self.created:
      with contextlib.suppress(OSError):
        if not os.listdir(self.workdir) or os.listdir(self.workdir) == [LOCK]:
          with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
          os.rmdir(self.workdir)


def _alive(pid) -> bool:
  if not isinstance(pid, int) or pid <= 0:
    return False
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


@contextlib.contextmanager
def lock(workdir: str):
  """Hold ``workdir`` for this job: process 0 takes the lock and every process learns whether
  it got it. A refusal is a ``WorkdirError`` (one line). If the block fails before anything
  but the lock was written into a workdir the lock created, the workdir is removed again."""
  held, err = None, ""
  if jax.process_index() == 0:
    try:
      held = Lock(workdir).acquire()
    except WorkdirError as e:
      err = str(e)
  ok = held is not None
  if jax.process_count() > 1:
    ok = bool(multihost_utils.broadcast_one_to_all(np.int32(ok)))
  if not ok:
    raise WorkdirError(err or f"workdir {workdir!r} is in use by another job (process 0 "
                       "could not lock it)")
  try:
    yield held
  finally:
    if held is not None:
      held.release()


def _git_commit() -> dict:
  here = os.path.dirname(os.path.abspath(__file__))
  try:
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True,
                            text=True, timeout=10).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                           capture_output=True, text=True, timeout=10).stdout.strip()
    return {"git_commit": commit or "unknown", "git_dirty": bool(dirty)}
  except (OSError, subprocess.SubprocessError):
    return {"git_commit": "unknown", "git_dirty": None}


def _write_json(path: str, obj) -> None:
  with open(path + ".tmp", "w") as f:
    json.dump(obj, f, indent=1, sort_keys=True)
  os.replace(path + ".tmp", path)


def write_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  """``workdir/config.json`` (written through a temporary file and an atomic rename)."""
  os.makedirs(workdir, exist_ok=True)
  tmp = os.path.join(workdir, "config.json.tmp")
  with open(tmp, "w") as f:
    f.write(config.to_json_best_effort(indent=1, sort_keys=True))
  os.replace(tmp, os.path.join(workdir, "config.json"))


def read_teacher(workdir: str) -> dict | None:
  """The teacher identity a student recorded at its start (``teacher.json``), or ``None``."""
  path = os.path.join(workdir, "teacher.json")
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    return json.load(f)


def record(workdir: str, config: ml_collections.ConfigDict, teacher: dict | None = None
           ) -> None:
  """Write ``config.json``, the teacher's identity (``teacher.json``, once: at the student's
  first start) and append to ``provenance.json`` (one entry per start, with the fields that
  changed since the previous start)."""
  old = _stored(workdir)
  moved = changes(old, json.loads(config.to_json_best_effort())) if old else []
  write_config(workdir, config)
  if teacher is not None and read_teacher(workdir) is None:
    _write_json(os.path.join(workdir, "teacher.json"), teacher)
  path = os.path.join(workdir, "provenance.json")
  entries = []
  if os.path.exists(path):
    with open(path) as f:
      entries = json.load(f)
  entry = dict(_git_commit(), argv=sys.argv, python=platform.python_version(),
               jax=jax.__version__, host=platform.node(),
               devices=[str(d) for d in jax.devices()],
               time=datetime.datetime.now().isoformat(timespec="seconds"))
  if moved:
    entry["config_changes"] = moved
  entries.append(entry)
  _write_json(path, entries)
