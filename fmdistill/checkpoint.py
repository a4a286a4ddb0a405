"""Orbax checkpoints of the train state (``fmdistill.state.TrainState``).

Layout of a workdir::

    workdir/config.json          the full config of the run
    workdir/checkpoints/<step>/  orbax CheckpointManager steps (item 'state')
    workdir/metrics.jsonl        one JSON object per logged step

Reading finished runs (teachers, evaluation) is ``fmdistill.runs``.
"""
from __future__ import annotations

import os
import shutil
import sys
from typing import Any

import jax
import orbax.checkpoint as ocp

from fmdistill import parallel
from fmdistill.errors import CheckpointMismatchError


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
