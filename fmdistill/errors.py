"""Errors that reach the user as one line (``python -m fmdistill.main`` prints them and exits 2)."""


class ConfigError(ValueError):
  """A config field has a value the library cannot run with; the message names the field and
  the accepted values."""


class CheckpointMismatchError(ValueError):
  """A checkpoint in the workdir does not fit the config (different parameter shapes)."""


class WorkdirError(ValueError):
  """The workdir holds a different experiment."""


class Preempted(Exception):
  """SIGTERM arrived; the loop saved a checkpoint at ``step`` and stopped."""

  def __init__(self, step: int):
    super().__init__(f"preempted: saved a checkpoint at step {step}; rerun the same command "
                     "to resume")
    self.step = step
