"""benchmarks/_common.py: every benchmark script ends the way ``fmdistill.main`` does — SIGTERM
during a training is one line and exit 0 (the run saved its checkpoint), a user's error one
``error:`` line and exit 2, and a bug keeps its traceback."""
import os
import subprocess
import sys

import pytest

from conftest import ROOT
from fmdistill.errors import ConfigError, Preempted

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import _common  # noqa: E402  (benchmarks/_common.py)


def _raise(e):
  def main():
    raise e
  return main


def test_preempted_is_one_line_and_exit_0(capsys):
  with pytest.raises(SystemExit) as ex:
    _common.entry(_raise(Preempted(4529)))
  assert ex.value.code == 0
  err = capsys.readouterr().err
  assert err.strip().splitlines() == [
      "preempted: saved a checkpoint at step 4529; rerun the same command to resume"]


@pytest.mark.parametrize("error", [ConfigError("config.teacher.workdir: no finished run at 'x'"),
                                   FileNotFoundError("x/config.json does not exist")])
def test_a_users_error_is_one_line_and_exit_2(error, capsys):
  with pytest.raises(SystemExit) as ex:
    _common.entry(_raise(error))
  assert ex.value.code == 2
  (line,) = capsys.readouterr().err.strip().splitlines()
  assert line.startswith("error: ") and str(error).split(":")[0] in line


def test_a_bug_is_not_swallowed():
  with pytest.raises(ZeroDivisionError):
    _common.entry(_raise(ZeroDivisionError("bug")))


@pytest.mark.parametrize("script,args", [("health.py", ["{}"]),
                                         ("metric_noise.py", ["--teacher", "moons={}"])])
def test_the_scripts_use_it(script, args, tmp_path):
  """A run directory that holds no finished run: one line naming it, exit 2, no traceback."""
  missing = str(tmp_path / "no_run")
  r = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", script),
                      *[a.format(missing) for a in args]],
                     capture_output=True, text=True, timeout=300, cwd=str(tmp_path))
  assert r.returncode == 2, r.stderr
  (line,) = r.stderr.strip().splitlines()
  assert line.startswith("error: ") and missing in line
