"""Reading finished (or running) runs: their config, stored state and parameters.

The one place that ``teacher``, ``eval`` and ``main`` go through to read a workdir written by
``fmdistill.train``. Checkpoints are read by their own metadata, so a run's parts (critics,
discriminators, learned weightings) and any mesh it was saved from load the same way.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
from typing import Any

import jax
import ml_collections
import numpy as np

from fmdistill import checkpoint, objectives, parallel, state as state_lib
from fmdistill.errors import CheckpointError


def read_config(workdir: str) -> ml_collections.ConfigDict:
  """The ``config.json`` of a run (``FileNotFoundError`` naming the path if absent)."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"no finished run at {workdir!r}: {path} does not exist")
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


def latest_step(workdir: str) -> int | None:
  """The newest checkpoint step of a run, or ``None``."""
  if not os.path.isdir(os.path.join(workdir, "checkpoints")):
    return None
  mngr = checkpoint.manager(workdir, read_only=True)
  with checkpoint.quiet(None):
    return mngr.latest_step()


def is_finished(workdir: str, steps: int | None = None) -> bool:
  """Whether ``workdir`` holds a run whose newest checkpoint reached ``steps`` (default: the
  ``train.steps`` it was started with)."""
  if not os.path.exists(os.path.join(workdir, "config.json")):
    return False
  step = latest_step(workdir)
  steps = int(read_config(workdir).train.steps) if steps is None else steps
  return step is not None and step >= steps


def load_state(workdir: str, step: int | None = None) -> dict:
  """A run's stored train state as a nested dict (``step``, ``params``, ``ema``,
  ``opt_state``, ``key``, ``parts``, ...), read by its own metadata onto one device and
  checked against its checksums. Without ``step``, the newest step that passes; a corrupt
  newer one is skipped with a one-line warning (nothing is moved: readers do not modify a
  run). A corrupt ``step`` asked for by number is a ``CheckpointError``."""
  if not os.path.isdir(workdir):
    raise FileNotFoundError(f"no run at {workdir!r}: it is not a directory")
  mngr = checkpoint.manager(workdir, read_only=True)
  with checkpoint.quiet(None):
    have = sorted(mngr.all_steps(), reverse=True)
  if not have:
    raise FileNotFoundError(f"run {workdir!r} has no checkpoint under {workdir}/checkpoints")
  if step is not None and step not in have:
    raise FileNotFoundError(f"run {workdir!r} has no checkpoint step {step} (it has "
                            f"{sorted(have)})")
  one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  for s in [step] if step is not None else have:
    with checkpoint.quiet(None) as cap:
      try:
        meta = checkpoint.stored_shapes(mngr, s)
        target = jax.tree_util.tree_map(
            lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one), meta)
        return checkpoint.restore(mngr, s, target)
      except checkpoint.Corrupt as e:
        err, cap.failed = e, True
    details = f" (details in {cap.path})" if cap.path else ""
    if step is not None:
      raise CheckpointError(f"checkpoint step {s} of run {workdir!r} is corrupt ({err})"
                            f"{details}")
    print(f"warning: checkpoint step {s} of run {workdir} is corrupt ({err}); reading an "
          f"older one{details}", file=sys.stderr)
  raise CheckpointError(f"run {workdir!r} has no readable checkpoint (all of {sorted(have)} "
                        "are corrupt)")


def digest(tree: Any) -> str:
  """sha256 of a parameter tree's contents (paths, dtypes, shapes and bytes of every array):
  the identity of a teacher's weights."""
  h = hashlib.sha256()
  for path, x in sorted((parallel.path_str(p), x) for p, x in
                        jax.tree_util.tree_flatten_with_path(tree)[0]):
    a = np.asarray(x)
    h.update(f"{path}|{a.dtype}|{a.shape}|".encode())
    h.update(np.ascontiguousarray(a).tobytes())
  return h.hexdigest()


@dataclasses.dataclass(frozen=True)
class Run:
  """A run's network and weights as read from one checkpoint (``load_run``)."""
  workdir: str
  config: ml_collections.ConfigDict
  net: Any
  params: Any
  step: int          # the checkpoint step the weights come from
  which: str

  @property
  def steps(self) -> int:
    return int(self.config.train.steps)

  @property
  def finished(self) -> bool:
    return self.step >= self.steps

  def describe(self) -> str:
    """``'step 250 of 300 (unfinished)'``."""
    return (f"step {self.step} of {self.steps} "
            f"({'finished' if self.finished else 'unfinished'})")


def network(config: ml_collections.ConfigDict) -> Any:
  """The student network of a run's config (built abstractly: no weights are computed)."""
  out = {}

  def build():
    net, params = state_lib.build_network(config, tuple(config.data_shape),
                                          config.objective.num_classes, jax.random.PRNGKey(0))
    out["net"] = net
    return params
  jax.eval_shape(build)
  return out["net"]


def load_params(workdir: str, which: str = "params", part: str | None = None
                ) -> tuple[ml_collections.ConfigDict, Any, Any]:
  """A run's network and parameters: ``(config, net, params)`` (``load_run`` also says which
  checkpoint step they come from)."""
  r = load_run(workdir, which, part)
  return r.config, r.net, r.params


def load_run(workdir: str, which: str = "params", part: str | None = None,
             step: int | None = None) -> Run:
  """A run's network and parameters at its newest good checkpoint (or ``step``).

  ``which`` is ``'params'`` (the raw weights) or an EMA name such as ``'ema_0.999'``.
  ``part`` names one of the run's trainable parts (e.g. ``'critic'``) instead of the student:
  its raw weights (``which='params'``) or its EMA (``which='ema'``); ``net`` is then the
  student's network for parts that share its architecture (``init='student'``), else ``None``.
  """
  config = read_config(workdir)
  stored = load_state(workdir, step)
  at = int(np.asarray(stored["step"]))
  make = lambda net, params: Run(workdir, config, net, params, at, which)
  if part is not None:
    parts = stored.get("parts") or {}
    if part not in parts:
      raise ValueError(f"run {workdir!r} has no part {part!r}; it has {sorted(parts)}")
    entry = objectives.entry(config.method)
    net = network(config) if entry.parts[part].network == "student" else None
    if which == "params":
      return make(net, parts[part]["params"])
    if which == "ema" and parts[part].get("ema") is not None:
      return make(net, parts[part]["ema"])
    raise ValueError(f"part {part!r} of run {workdir!r} has no {which!r} weights; use "
                     "'params'" + (" or 'ema'" if parts[part].get("ema") is not None else ""))
  net = network(config)
  params = stored["params"]
  if isinstance(params, dict) and "loss_weight" in params:  # checkpoints before parts existed
    params = {k: v for k, v in params.items() if k != "loss_weight"}
  if which == "params":
    return make(net, params)
  if which not in stored["ema"]:
    raise ValueError(f"run {workdir!r} has no EMA {which!r}; it has {sorted(stored['ema'])} "
                     "and 'params'")
  ema = stored["ema"][which]
  if isinstance(ema, dict) and "loss_weight" in ema:
    ema = {k: v for k, v in ema.items() if k != "loss_weight"}
  return make(net, ema)
