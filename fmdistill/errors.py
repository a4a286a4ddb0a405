"""Errors that reach the user as one line (``python -m fmdistill.main`` prints them and exits 2)."""
from __future__ import annotations

_MAX_CHARS = 600  # a message longer than this (a dumped pytree, a long path list) is cut


def one_line(e: BaseException) -> str:
  """``e``'s message as the one line a user sees after ``error:``: whitespace (newlines
  included) collapsed, the file name of an ``OSError`` appended when its message lacks it, cut
  to 600 characters. Used by ``python -m fmdistill.main`` and the benchmark scripts."""
  text = " ".join(str(e).split())
  if isinstance(e, OSError) and e.filename and str(e.filename) not in text:
    text = f"{text}: {e.filename}"
  return text if len(text) <= _MAX_CHARS else text[:_MAX_CHARS] + "..."


class ConfigError(ValueError):
  """A config field has a value the library cannot run with; the message names the field and
  the accepted values."""


def invalid(field: str, value, accepted) -> "ConfigError":
  """The one line every config check gives for a bad value, as a ``ConfigError``:
  ``config.<field>=<value!r> is invalid; accepted: <accepted>`` (``field`` dotted from the
  config's root, e.g. ``'objective.path'``; ``accepted`` a list of values or a phrase)."""
  return ConfigError(f"config.{field}={value!r} is invalid; accepted: {accepted}")


class DataError(ValueError):
  """A data or weights file the user supplied is missing, unreadable or of the wrong layout; the
  message names the file."""


class CheckpointMismatchError(ValueError):
  """A checkpoint in the workdir does not fit the config (different parameter shapes)."""


class CheckpointError(ValueError):
  """A checkpoint cannot be read or written (permissions, a full disk, a failed checksum of a
  checkpoint that has no older fallback)."""


class WorkdirError(ValueError):
  """The workdir holds a different experiment, cannot be used (a file, not writable), or is in
  use by another process."""


class ConfigDriftError(WorkdirError):
  """A resumed run's config differs from the one it was started with."""


class TeacherError(ConfigError):
  """The teacher run cannot serve as a teacher (unfinished, not a velocity model, or not the
  teacher this student started from)."""


class Preempted(Exception):
  """SIGTERM arrived; the loop saved a checkpoint at ``step`` (``None``: before training
  started, nothing new to save) and stopped."""

  def __init__(self, step: int | None, where: str = ""):
    if step is None:
      msg = (f"preempted {where or 'before training started'}: nothing new to save; rerun the "
             "same command to continue")
    else:
      msg = (f"preempted: saved a checkpoint at step {step}; rerun the same command to resume")
    super().__init__(msg)
    self.step = step
