"""Orbax checkpoints of the train state and loading of finished runs (teachers).

Layout of a workdir::

    workdir/config.json          the full config of the run
    workdir/checkpoints/<step>/  orbax CheckpointManager steps (item 'state')
    workdir/metrics.jsonl        one JSON object per logged step
"""
from __future__ import annotations

import json
import os
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp


def manager(workdir: str, keep: int = 3, every: int = 1, read_only: bool = False
            ) -> ocp.CheckpointManager:
  """A CheckpointManager over ``workdir/checkpoints`` keeping the ``keep`` newest steps."""
  if read_only:
    options = ocp.CheckpointManagerOptions(read_only=True, create=False,
                                           save_interval_steps=0, max_to_keep=None,
                                           enable_async_checkpointing=False)
  else:
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=every,
                                           enable_async_checkpointing=False)
  return ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, "checkpoints")),
                               options=options, item_names=("state",))


def save(mngr: ocp.CheckpointManager, step: int, state: Any, force: bool = False) -> bool:
  return mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state)),
                   force=force)


def restore(mngr: ocp.CheckpointManager, step: int, target: Any) -> Any:
  """Restore ``step`` into the structure, shapes, dtypes and shardings of ``target``."""
  abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, target)
  out = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
  return out["state"]


def write_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  os.makedirs(workdir, exist_ok=True)
  tmp = os.path.join(workdir, "config.json.tmp")
  with open(tmp, "w") as f:
    f.write(config.to_json_best_effort(indent=1, sort_keys=True))
  os.replace(tmp, os.path.join(workdir, "config.json"))


def read_config(workdir: str) -> ml_collections.ConfigDict:
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"no finished run at {workdir!r}: {path} does not exist")
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


def load_params(workdir: str, which: str = "params") -> tuple[ml_collections.ConfigDict, Any, Any]:
  """Load a run's network and parameters: ``(config, net, params)``.

  ``which`` is ``'params'`` (the raw weights) or an EMA name such as ``'ema_0.999'``.
  """
  from fmdistill import train  # local import: train imports this module
  config = read_config(workdir)
  mngr = manager(workdir, read_only=True)
  step = mngr.latest_step()
  if step is None:
    raise FileNotFoundError(f"run {workdir!r} has no checkpoint under {workdir}/checkpoints")
  net, state = train.abstract_state(config)
  state = restore(mngr, step, state)
  if which == "params":
    return config, net, state.params
  if which not in state.ema:
    raise ValueError(f"run {workdir!r} has no EMA {which!r}; it has {sorted(state.ema)} "
                     "and 'params'")
  return config, net, state.ema[which]
