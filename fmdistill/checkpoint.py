"""Orbax checkpoints of the train state and loading of finished runs (teachers).

Layout of a workdir::

    workdir/config.json          the full config of the run
    workdir/checkpoints/<step>/  orbax CheckpointManager steps (item 'state')
    workdir/metrics.jsonl        one JSON object per logged step
"""
from __future__ import annotations

import json
import os
import shutil
import sys
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp

from fmdistill import parallel


def manager(workdir: str, keep: int = 3, every: int = 1, read_only: bool = False
            ) -> ocp.CheckpointManager:
  """A CheckpointManager over ``workdir/checkpoints`` keeping the ``keep`` newest steps."""
  if read_only:
    options = ocp.CheckpointManagerOptions(read_only=True, create=False,
                                           save_interval_steps=0, max_to_keep=None,
                                           enable_async_checkpointing=False)
  else:
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=every,
                                           enable_async_checkpointing=False,
                                           cleanup_tmp_directories=True)
  return ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, "checkpoints")),
                               options=options,
                               item_handlers={"state": ocp.StandardCheckpointHandler()})


def save(mngr: ocp.CheckpointManager, step: int, state: Any, force: bool = False) -> bool:
  return mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state)),
                   force=force)


def restore(mngr: ocp.CheckpointManager, step: int, target: Any) -> Any:
  """Restore ``step`` into the structure, shapes, dtypes and shardings of ``target``."""
  abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, target)
  out = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
  return out["state"]


def _shapes(tree: Any) -> dict[str, tuple]:
  """``{'params/fc0a/kernel': shape}`` for every array leaf (dataclass or dict nodes alike)."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {parallel.path_str(path): tuple(getattr(v, "shape", ())) for path, v in leaves}


def mismatches(mngr: ocp.CheckpointManager, step: int, target: Any) -> list[str]:
  """Parameter paths whose stored shape differs from ``target`` (or that exist on one side
  only). Raises if the checkpoint's metadata cannot be read."""
  stored = _shapes(mngr.item_metadata(step)["state"])
  wanted = _shapes(target)
  out = [f"{k}: checkpoint {stored.get(k)} vs config {wanted.get(k)}"
         for k in sorted(set(stored) | set(wanted)) if stored.get(k) != wanted.get(k)]
  return out


def restore_latest(mngr: ocp.CheckpointManager, target: Any, workdir: str
                   ) -> tuple[Any, int | None]:
  """Restore the newest readable checkpoint into ``target``: ``(state, step or None)``.

  An unreadable or truncated step is moved to ``workdir/corrupt_checkpoints/<step>`` (never
  deleted) with a one-line warning, and the next older one is tried. A checkpoint whose
  parameter shapes do not match the config stops with ``CheckpointMismatchError`` naming the
  paths, and nothing is moved or overwritten.
  """
  from fmdistill.errors import CheckpointMismatchError
  for step in sorted(mngr.all_steps(), reverse=True):
    try:
      bad = mismatches(mngr, step, target)
    except Exception as e:  # noqa: BLE001  unreadable metadata: a corrupt checkpoint
      _set_aside(mngr, step, workdir, e)
      continue
    if bad:
      shown = "; ".join(bad[:5]) + (f"; and {len(bad) - 5} more" if len(bad) > 5 else "")
      raise CheckpointMismatchError(
          f"checkpoint step {step} in {workdir} does not match this config ({shown}); use "
          "another --workdir, or --overwrite to move the old run aside")
    try:
      return restore(mngr, step, target), step
    except Exception as e:  # noqa: BLE001  unreadable arrays: a corrupt checkpoint
      _set_aside(mngr, step, workdir, e)
  return target, None


def _set_aside(mngr: ocp.CheckpointManager, step: int, workdir: str, err: Exception) -> None:
  src = os.path.join(str(mngr.directory), str(step))
  dest_dir = os.path.join(workdir, "corrupt_checkpoints")
  os.makedirs(dest_dir, exist_ok=True)
  dest = os.path.join(dest_dir, str(step))
  n = 1
  while os.path.exists(dest):
    dest, n = os.path.join(dest_dir, f"{step}.{n}"), n + 1
  shutil.move(src, dest)
  mngr.reload()
  first = str(err).strip().splitlines()[0][:160] if str(err).strip() else ""
  print(f"warning: checkpoint step {step} is unreadable ({type(err).__name__}: {first}); "
        f"moved to {dest}, restoring an older one", file=sys.stderr)


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


def load_state(workdir: str, step: int | None = None) -> dict:
  """A run's stored train state as a nested dict (``step``, ``params``, ``ema``,
  ``opt_state``, ``key``, critic fields, ...), read by its own metadata onto one device."""
  mngr = manager(workdir, read_only=True)
  step = mngr.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"run {workdir!r} has no checkpoint under {workdir}/checkpoints")
  one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = jax.tree_util.tree_map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one),
                                  mngr.item_metadata(step)["state"])
  return mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(target)))["state"]


def load_params(workdir: str, which: str = "params") -> tuple[ml_collections.ConfigDict, Any, Any]:
  """Load a run's network and parameters: ``(config, net, params)``.

  ``which`` is ``'params'`` (the raw weights) or an EMA name such as ``'ema_0.999'``. Runs with
  critics or other auxiliary state load the same way (``load_state``).
  """
  from fmdistill import train  # local import: train imports this module
  config = read_config(workdir)
  state = load_state(workdir)
  net, _ = train.abstract_state(config)
  if which == "params":
    return config, net, state["params"]
  if which not in state["ema"]:
    raise ValueError(f"run {workdir!r} has no EMA {which!r}; it has {sorted(state['ema'])} "
                     "and 'params'")
  return config, net, state["ema"][which]
