"""Orbax checkpoints of the train state (``fmdistill.state.TrainState``), integrity-checked.

Layout of a workdir::

    workdir/config.json             the full config of the run
    workdir/checkpoints/<step>/     orbax CheckpointManager steps: item 'state' (the arrays) and
                                    item 'checksums' ({array path: fingerprint})
    workdir/metrics.jsonl           one JSON object per logged step
    workdir/library.log             what orbax/TensorStore/asyncio printed while a checkpoint
                                    failed to read or write (the user sees one line)

Orbax's own integrity metadata covers only the shard index of zarr3 arrays (a ``crc32c``
index codec), not the array data, so every step also stores a fingerprint of each array:
two 32-bit sums of its raw bits (one of a mixed hash of each word and its position, one
position-weighted), computed on the devices in wrapping integer arithmetic, so the figure is
exact and independent of the sharding or reduction order. It is checked on every restore; a
step that fails it, or that cannot be read (truncated files, missing ``state/_METADATA``) is
set aside to ``workdir/corrupt_checkpoints/<step>`` and the next older one is used. A
checkpoint whose arrays do not fit the config is refused (``CheckpointMismatchError``), and one
that cannot be read for lack of permission stops with ``CheckpointError``; neither is moved.

Reading finished runs (teachers, evaluation) is ``fmdistill.runs``.
"""
from __future__ import annotations

import contextlib
import gc
import glob
import logging
import os
import shutil
import sys
import tempfile
import time
import traceback
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from fmdistill import parallel
from fmdistill.errors import CheckpointError, CheckpointMismatchError

LOG = "library.log"


class Corrupt(Exception):
  """A checkpoint step that cannot be used as it is on disk (set aside, never deleted)."""


# ------------------------------------------------------------------ library output

class _Capture:
  path: str | None = None
  failed: bool = False  # set by the caller when the operation failed: wait for the stragglers


def _settle(path: str, quiet_for: float = 0.3, limit: float = 5.0) -> None:
  """Wait until nothing has been written to ``path`` for ``quiet_for`` seconds (at most
  ``limit``): TensorStore callbacks of a failed operation keep reporting from their threads
  after the Python call returned."""
  t0, size, still = time.time(), -1, time.time()
  while time.time() - t0 < limit:
    now = os.path.getsize(path)
    if now != size:
      size, still = now, time.time()
    elif time.time() - still >= quiet_for:
      return
    time.sleep(0.05)


@contextlib.contextmanager
def quiet(log_dir: str | None):
  """Send what libraries print during the block to a log file instead of the terminal:
  Python logging (absl, orbax, asyncio), exceptions of abandoned coroutines
  (``sys.unraisablehook``) and anything TensorStore's C++ code writes to file descriptor 2.
  If anything was written it is appended to ``log_dir/library.log`` (or, without a writable
  ``log_dir``, kept in a temporary file); ``capture.path`` then names it."""
  cap = _Capture()
  after_failure = _stragglers(None)
  tmp = tempfile.NamedTemporaryFile("w+b", prefix="fmdistill-", suffix=".log", delete=False)
  text = _Sink(tmp.fileno())
  root = logging.getLogger()
  handlers, level = root.handlers[:], root.level
  root.handlers = [logging.StreamHandler(text)]
  hook = sys.unraisablehook

  def unraisable(u):
    text.write(f"{u.err_msg or 'Exception ignored in'}: {u.object!r}\n")
    text.write("".join(traceback.format_exception(u.exc_type, u.exc_value, u.exc_traceback)))
  sys.unraisablehook = unraisable
  sys.stderr.flush()
  saved = os.dup(2)
  os.dup2(tmp.fileno(), 2)
  try:
    yield cap
  except BaseException:
    cap.failed = True
    raise
  finally:
    # Abandoned coroutines (of a failed operation: this one or the one before) report when
    # collected: here, not later on the terminal. Only then: a full collection costs ~0.15 s.
    if cap.failed or after_failure:
      gc.collect()
    if cap.failed:
      _settle(tmp.name)
    with contextlib.suppress(OSError):
      sys.stderr.flush()
    os.dup2(saved, 2)
    os.close(saved)
    sys.unraisablehook = hook
    root.handlers, root.level = handlers, level
    tmp.close()
    cap.path = _keep(tmp.name, log_dir)
    if cap.failed:
      _stragglers(cap.path or (os.path.join(log_dir, LOG) if log_dir and os.path.isdir(log_dir)
                               and os.access(log_dir, os.W_OK) else os.devnull))


def _stragglers(path: str | None) -> bool:
  """After a failed operation, send what its abandoned asyncio tasks report later (asyncio logs
  "Task exception was never retrieved" whenever the task is collected, possibly only at exit)
  to ``path`` instead of the terminal, until the next ``quiet`` block; ``None`` undoes it.
  Returns whether a failed operation's redirection was in place (undone now)."""
  log = logging.getLogger("asyncio")
  ours = [h for h in log.handlers if getattr(h, "_fmdistill", False)]
  for h in ours:
    log.removeHandler(h)
    with contextlib.suppress(OSError):
      os.close(h.stream.fd)
  log.propagate = True
  if path is None:
    return bool(ours)
  try:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
  except OSError:
    fd = os.open(os.devnull, os.O_WRONLY)
  h = logging.StreamHandler(_Sink(fd))
  h._fmdistill = True
  log.addHandler(h)
  log.propagate = False
  return False


class _Sink:
  """A text stream onto a file descriptor that drops what cannot be written (a full disk must
  not turn the one-line message into a traceback)."""

  def __init__(self, fd: int):
    self.fd = fd

  def write(self, s: str) -> int:
    with contextlib.suppress(OSError):
      os.write(self.fd, s.encode(errors="replace"))
    return len(s)

  def flush(self) -> None:
    pass


def _keep(tmp: str, log_dir: str | None) -> str | None:
  if os.path.getsize(tmp) == 0:
    os.unlink(tmp)
    return None
  if log_dir and os.path.isdir(log_dir) and os.access(log_dir, os.W_OK):
    dest = os.path.join(log_dir, LOG)
    try:
      with open(dest, "ab") as out, open(tmp, "rb") as src:
        shutil.copyfileobj(src, out)
    except OSError:  # a full disk: the details stay in the temporary file
      return tmp
    os.unlink(tmp)
    return dest
  return tmp


def first_line(err: BaseException, n: int = 200) -> str:
  text = str(err).strip()
  line = text.splitlines()[0] if text else ""
  return f"{type(err).__name__}: {line[:n]}" + ("..." if len(line) > n else "")


# ------------------------------------------------------------------ checksums

def _words(x: jax.Array) -> jax.Array:
  """The raw bits of ``x`` as a flat uint32 vector (one word per element of <= 4 bytes)."""
  if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if x.dtype == jnp.bool_:
    x = x.astype(jnp.uint8)
  unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize]
  return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32).reshape(-1)


def _fingerprint_leaf(x: jax.Array) -> jax.Array:
  w = _words(x)
  i = jnp.arange(w.size, dtype=jnp.uint32)
  h = (w ^ (i * jnp.uint32(0x9E3779B9))) * jnp.uint32(0x85EBCA6B)
  h = (h ^ (h >> 13)) * jnp.uint32(0xC2B2AE35)
  h = h ^ (h >> 16)
  return jnp.stack([jnp.sum(h, dtype=jnp.uint32),
                    jnp.sum(w * (2 * i + 1), dtype=jnp.uint32)])


_fingerprints = jax.jit(lambda tree: jax.tree_util.tree_map(_fingerprint_leaf, tree))


def checksums(tree: Any) -> dict[str, str]:
  """``{array path: 16 hex digits}`` for every array leaf of ``tree`` (sharded or not)."""
  leaves = jax.tree_util.tree_flatten_with_path(_fingerprints(tree))[0]
  out = {}
  for path, v in leaves:
    v = np.asarray(v.addressable_data(0)) if isinstance(v, jax.Array) else np.asarray(v)
    out[parallel.path_str(path)] = f"{int(v[0]):08x}{int(v[1]):08x}"
  return out


# ------------------------------------------------------------------ the manager

def _check_readable(directory: str, write: bool) -> None:
  if not os.path.exists(directory):
    return
  if not os.path.isdir(directory):
    raise CheckpointError(f"{directory} is not a directory (it should hold the checkpoints)")
  mode = os.R_OK | os.X_OK | (os.W_OK if write else 0)
  if not os.access(directory, mode):
    raise CheckpointError(f"checkpoint directory {directory} is not "
                          f"{'readable and writable' if write else 'readable'} (permission "
                          "denied); fix its permissions, nothing was changed")


def manager(workdir: str, keep: int = 3, every: int = 1, read_only: bool = False
            ) -> ocp.CheckpointManager:
  """A CheckpointManager over ``workdir/checkpoints`` keeping the ``keep`` newest steps."""
  directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
  _check_readable(directory, write=not read_only)
  if read_only:
    options = ocp.CheckpointManagerOptions(read_only=True, create=False,
                                           save_interval_steps=0, max_to_keep=None,
                                           enable_async_checkpointing=False)
  else:
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=every,
                                           enable_async_checkpointing=False,
                                           cleanup_tmp_directories=True)
  with quiet(None if read_only else workdir):  # it reads every step's metadata, maybe corrupt
    return ocp.CheckpointManager(directory, options=options,
                                 item_handlers={"state": ocp.StandardCheckpointHandler(),
                                                "checksums": ocp.JsonCheckpointHandler()})


def save(mngr: ocp.CheckpointManager, step: int, state: Any, force: bool = False,
         log_dir: str | None = None) -> bool:
  """Save ``state`` (with its checksums) at ``step``; a failed write (full disk, permissions)
  is one ``CheckpointError`` line and leaves the older checkpoints as they were."""
  if not force and not mngr.should_save(step):
    return False
  sums = checksums(state)
  with quiet(log_dir) as cap:
    try:
      saved = mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                      checksums=ocp.args.JsonSave(sums)),
                        force=force)
      err = None
    except Exception as e:  # noqa: BLE001  reported below, in one line
      err, cap.failed = e, True
  if err is None:
    return saved
  for tmp in glob.glob(os.path.join(str(mngr.directory), f"{step}.orbax-checkpoint-tmp*")):
    shutil.rmtree(tmp, ignore_errors=True)
  with contextlib.suppress(Exception):
    mngr.reload()
  latest = mngr.latest_step()
  raise CheckpointError(
      f"could not write checkpoint step {step} to {mngr.directory} ({first_line(err)})"
      + (f"; details in {cap.path}" if cap.path else "")
      + (f"; the newest checkpoint on disk is step {latest}" if latest is not None else
         "; there is no checkpoint on disk yet")) from None


def _abstract(target: Any) -> Any:
  return jax.tree_util.tree_map(
      lambda x: x if isinstance(x, jax.ShapeDtypeStruct) else ocp.utils.to_shape_dtype_struct(x),
      target)


def _unreadable(step_dir: str) -> str | None:
  """The first file or directory of a step that this process may not read."""
  for d, dirs, files in os.walk(step_dir):
    if not os.access(d, os.R_OK | os.X_OK):
      return d
    for f in files:
      if not os.access(os.path.join(d, f), os.R_OK):
        return os.path.join(d, f)
  return None


def stored_shapes(mngr: ocp.CheckpointManager, step: int) -> Any:
  """The stored state's metadata tree; ``Corrupt`` if it is missing or unreadable."""
  try:
    meta = mngr.item_metadata(step)
  except Exception as e:  # noqa: BLE001
    raise Corrupt(f"unreadable metadata ({first_line(e)})") from None
  state = meta.get("state") if hasattr(meta, "get") else None
  if state is None or not jax.tree_util.tree_leaves(state):
    raise Corrupt("state/_METADATA is missing or empty")
  return state


def restore(mngr: ocp.CheckpointManager, step: int, target: Any) -> Any:
  """Restore ``step`` into the structure, shapes, dtypes and shardings of ``target`` (arrays
  or ``ShapeDtypeStruct``s) and check its checksums (``Corrupt`` if they fail; checkpoints
  written before checksums existed are restored unchecked)."""
  step_dir = os.path.join(str(mngr.directory), str(step))
  bad = _unreadable(step_dir)
  if bad:
    raise CheckpointError(f"cannot read checkpoint step {step}: {bad} is not readable "
                          "(permission denied); fix its permissions, nothing was moved")
  has_sums = os.path.isdir(os.path.join(step_dir, "checksums"))
  args = dict(state=ocp.args.StandardRestore(_abstract(target)))
  if has_sums:
    args["checksums"] = ocp.args.JsonRestore()
  try:
    out = mngr.restore(step, args=ocp.args.Composite(**args))
  except Exception as e:  # noqa: BLE001  unreadable arrays
    raise Corrupt(first_line(e)) from None
  if has_sums:
    stored, got = dict(out["checksums"] or {}), checksums(out["state"])
    wrong = sorted(k for k in set(stored) | set(got) if stored.get(k) != got.get(k))
    if wrong:
      raise Corrupt(f"checksum mismatch in {len(wrong)} array(s): {', '.join(wrong[:3])}"
                    + (", ..." if len(wrong) > 3 else ""))
  return out["state"]


def _shapes(tree: Any) -> dict[str, tuple]:
  """``{'params/fc0a/kernel': shape}`` for every array leaf (dataclass or dict nodes alike)."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {parallel.path_str(path): tuple(getattr(v, "shape", ())) for path, v in leaves}


def mismatches(mngr: ocp.CheckpointManager, step: int, target: Any) -> list[str]:
  """Parameter paths whose stored shape differs from ``target`` (or that exist on one side
  only). Raises ``Corrupt`` if the checkpoint's metadata cannot be read."""
  stored = _shapes(stored_shapes(mngr, step))
  wanted = _shapes(target)
  out = [f"{k}: checkpoint {stored.get(k)} vs config {wanted.get(k)}"
         for k in sorted(set(stored) | set(wanted)) if stored.get(k) != wanted.get(k)]
  return out


def restore_latest(mngr: ocp.CheckpointManager, target: Any, workdir: str
                   ) -> tuple[Any, int | None]:
  """Restore the newest good checkpoint into ``target``: ``(state, step or None)``.

  A corrupt step (unreadable, truncated, missing metadata, failed checksums) is moved to
  ``workdir/corrupt_checkpoints/<step>`` (never deleted) with a one-line warning, and the next
  older one is tried. A checkpoint whose parameter shapes do not match the config stops with
  ``CheckpointMismatchError`` naming the paths, and nothing is moved or overwritten.
  """
  with quiet(workdir):
    steps = sorted(mngr.all_steps(), reverse=True)
  for step in steps:
    with quiet(workdir) as cap:
      try:
        bad, err = mismatches(mngr, step, target), None
        state = None if bad else restore(mngr, step, target)
      except Corrupt as e:
        err, cap.failed = e, True
    if err is not None:
      _set_aside(mngr, step, workdir, err, cap.path)
      continue
    if bad:
      raise CheckpointMismatchError(
          f"checkpoint step {step} in {workdir} does not match this config "
          f"({'; '.join(bad[:5])}{f'; and {len(bad) - 5} more' if len(bad) > 5 else ''}); use "
          "another --workdir, or --overwrite to move the old run aside")
    return state, step
  return target, None


def _set_aside(mngr: ocp.CheckpointManager, step: int, workdir: str, err: Exception,
               log: str | None = None) -> None:
  src = os.path.join(str(mngr.directory), str(step))
  dest_dir = os.path.join(workdir, "corrupt_checkpoints")
  dest = os.path.join(dest_dir, str(step))
  if jax.process_index() == 0:
    os.makedirs(dest_dir, exist_ok=True)
    n = 1
    while os.path.exists(dest):
      dest, n = os.path.join(dest_dir, f"{step}.{n}"), n + 1
    try:
      shutil.move(src, dest)
    except OSError as e:
      raise CheckpointError(f"checkpoint step {step} in {workdir} is corrupt ({err}) and "
                            f"could not be moved aside ({first_line(e)})") from None
  mngr.reload()
  print(f"warning: checkpoint step {step} is unreadable ({err}); moved to {dest}, restoring "
        "an older one" + (f" (details in {log})" if log else ""), file=sys.stderr)
