"""``fmdistill.errors.one_line``: the one line ``main`` and the benchmark scripts print."""
import errno

from fmdistill.errors import ConfigError, one_line


def test_a_multiline_message_becomes_one_line():
  e = ConfigError("config.train.lr must be > 0\n  got: -1\n\tfix the field")
  assert one_line(e) == "config.train.lr must be > 0 got: -1 fix the field"


def test_an_os_error_names_its_file_once():
  e = FileNotFoundError(errno.ENOENT, "No such file or directory", "/data/x.npz")
  # str(e) already holds the path: it is not repeated
  assert one_line(e).count("/data/x.npz") == 1


class _Unwritable(OSError):
  """An OSError whose message does not carry its file (as some libraries raise them)."""

  def __str__(self) -> str:
    return "cannot write the checkpoint"


def test_an_os_error_without_its_file_in_the_message_gets_it_appended():
  e = _Unwritable()
  e.filename = "/runs/out"
  assert one_line(e) == "cannot write the checkpoint: /runs/out"


def test_a_long_message_is_cut_at_600_characters():
  text = one_line(ValueError("x" * 5000))
  assert text == "x" * 600 + "..."
  assert one_line(ValueError("y" * 600)) == "y" * 600
