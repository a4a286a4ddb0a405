"""SIGTERM as a flag that long operations poll (preemption of a scheduled job).

``python -m fmdistill.main`` installs the handler before it imports anything heavy, so a
SIGTERM that arrives while jax loads, while a teacher or a checkpoint is read, or between
stages is noticed at the next ``check`` and ends the process with a one-line message (exit 0)
instead of the default kill (rc 143). The train loop polls it after every step and saves a
checkpoint first. Library use (``train.train_and_evaluate`` in a notebook or test) installs it
for the duration of a run (``watch``) and restores the previous handler afterwards.
"""
from __future__ import annotations

import contextlib
import signal
import threading

from fmdistill.errors import Preempted

_state = {"requested": False}


def _handle(signum, frame) -> None:
  del signum, frame
  _state["requested"] = True


def install() -> None:
  """Turn SIGTERM into the flag for the rest of the process (main thread only)."""
  if threading.current_thread() is threading.main_thread():
    signal.signal(signal.SIGTERM, _handle)


def requested() -> bool:
  return _state["requested"]


def check(where: str = "") -> None:
  """Raise ``Preempted(None, where)`` if SIGTERM arrived (nothing new to save)."""
  if _state["requested"]:
    raise Preempted(None, where)


@contextlib.contextmanager
def watch():
  """SIGTERM sets the flag inside the block; the previous handler comes back after it (unless
  it already was this one, as under ``python -m fmdistill.main``)."""
  if threading.current_thread() is not threading.main_thread():
    yield
    return
  old = signal.signal(signal.SIGTERM, _handle)
  try:
    yield
  finally:
    if old is not _handle:
      signal.signal(signal.SIGTERM, old)
      _state["requested"] = False
