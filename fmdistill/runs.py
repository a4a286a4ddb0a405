"""Reading finished (or running) runs: their config, stored state and parameters.

The one place that ``teacher``, ``eval`` and ``main`` go through to read a workdir written by
``fmdistill.train``. Checkpoints are read by their own metadata, so a run's parts (critics,
discriminators, learned weightings) and any mesh it was saved from load the same way.
"""
from __future__ import annotations

import json
import os
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp

from fmdistill import checkpoint, objectives, state as state_lib


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
  return checkpoint.manager(workdir, read_only=True).latest_step()


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
  ``opt_state``, ``key``, ``parts``, ...), read by its own metadata onto one device."""
  mngr = checkpoint.manager(workdir, read_only=True)
  step = mngr.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"run {workdir!r} has no checkpoint under {workdir}/checkpoints")
  one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = jax.tree_util.tree_map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one),
                                  mngr.item_metadata(step)["state"])
  return mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(target)))["state"]


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
  """A run's network and parameters: ``(config, net, params)``.

  ``which`` is ``'params'`` (the raw weights) or an EMA name such as ``'ema_0.999'``.
  ``part`` names one of the run's trainable parts (e.g. ``'critic'``) instead of the student:
  its raw weights (``which='params'``) or its EMA (``which='ema'``); ``net`` is then the
  student's network for parts that share its architecture (``init='student'``), else ``None``.
  """
  config = read_config(workdir)
  stored = load_state(workdir)
  if part is not None:
    parts = stored.get("parts") or {}
    if part not in parts:
      raise ValueError(f"run {workdir!r} has no part {part!r}; it has {sorted(parts)}")
    entry = objectives.entry(config.method)
    net = network(config) if entry.parts[part].network == "student" else None
    if which == "params":
      return config, net, parts[part]["params"]
    if which == "ema" and parts[part].get("ema") is not None:
      return config, net, parts[part]["ema"]
    raise ValueError(f"part {part!r} of run {workdir!r} has no {which!r} weights; use "
                     "'params'" + (" or 'ema'" if parts[part].get("ema") is not None else ""))
  net = network(config)
  params = stored["params"]
  if isinstance(params, dict) and "loss_weight" in params:  # checkpoints before parts existed
    params = {k: v for k, v in params.items() if k != "loss_weight"}
  if which == "params":
    return config, net, params
  if which not in stored["ema"]:
    raise ValueError(f"run {workdir!r} has no EMA {which!r}; it has {sorted(stored['ema'])} "
                     "and 'params'")
  ema = stored["ema"][which]
  if isinstance(ema, dict) and "loss_weight" in ema:
    ema = {k: v for k, v in ema.items() if k != "loss_weight"}
  return config, net, ema
