"""Workdir safety and provenance.

A workdir belongs to one experiment: the fields in ``IDENTITY`` (method, objective, model,
data, teacher, seed) must match the ``config.json`` already there, or the run refuses to start
(``--overwrite`` moves the old workdir aside, it never deletes it). Every run records its
config and ``provenance.json`` (git commit, command line, versions, host, time).
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import shutil
import subprocess
import sys

import jax
import ml_collections

from fmdistill.errors import WorkdirError

IDENTITY = ("method", "objective", "model", "data", "teacher", "seed", "data_shape")


def _flat(d, prefix=""):
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = list(v) if isinstance(v, (list, tuple)) else v
  return out


def differences(old: dict, new: dict) -> list[str]:
  """``'field: old != new'`` for every identity field that differs."""
  a = _flat({k: old.get(k) for k in IDENTITY if k in old or k in new})
  b = _flat({k: new.get(k) for k in IDENTITY if k in old or k in new})
  return [f"{k}: {a.get(k)!r} != {b.get(k)!r}" for k in sorted(set(a) | set(b))
          if a.get(k) != b.get(k)]


FILLED_IN = ("data_shape", "objective.num_classes", "model.native_param", "model.native_path",
             "model.native_sigma_d")  # set by train.setup from the data and the teacher


def same_experiment(workdir: str, config: ml_collections.ConfigDict) -> bool:
  """Whether ``workdir`` holds the experiment ``config`` describes, before ``train.setup``
  fills in the fields it derives (``FILLED_IN``)."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    return False
  with open(path) as f:
    old = json.load(f)
  new = json.loads(config.to_json_best_effort())
  return not [d for d in differences(old, new) if d.split(":")[0] not in FILLED_IN]


def check(workdir: str, config: ml_collections.ConfigDict, overwrite: bool = False) -> None:
  """Refuse a workdir that holds a different experiment; with ``overwrite``, move it aside."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    return
  with open(path) as f:
    old = json.load(f)
  new = json.loads(config.to_json_best_effort())
  diff = differences(old, new)
  if not diff:
    return
  if not overwrite:
    shown = "; ".join(diff[:4]) + (f"; and {len(diff) - 4} more" if len(diff) > 4 else "")
    raise WorkdirError(f"workdir {workdir!r} holds a different experiment ({shown}); pass "
                       "--overwrite to move it aside, or choose a new --workdir")
  stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
  dest = f"{workdir.rstrip(os.sep)}.replaced-{stamp}"
  shutil.move(workdir, dest)
  print(f"moved the previous experiment in {workdir} to {dest}", file=sys.stderr)


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


def write_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  """``workdir/config.json`` (written through a temporary file and an atomic rename)."""
  os.makedirs(workdir, exist_ok=True)
  tmp = os.path.join(workdir, "config.json.tmp")
  with open(tmp, "w") as f:
    f.write(config.to_json_best_effort(indent=1, sort_keys=True))
  os.replace(tmp, os.path.join(workdir, "config.json"))


def record(workdir: str, config: ml_collections.ConfigDict) -> None:
  """Write ``config.json`` and append to ``provenance.json`` (one entry per start)."""
  write_config(workdir, config)
  path = os.path.join(workdir, "provenance.json")
  entries = []
  if os.path.exists(path):
    with open(path) as f:
      entries = json.load(f)
  entries.append(dict(_git_commit(), argv=sys.argv, python=platform.python_version(),
                      jax=jax.__version__, host=platform.node(),
                      devices=[str(d) for d in jax.devices()],
                      time=datetime.datetime.now().isoformat(timespec="seconds")))
  with open(path + ".tmp", "w") as f:
    json.dump(entries, f, indent=1)
  os.replace(path + ".tmp", path)
