"""Shared fixtures. Tests run on CPU in float32 unless a test enables x64 locally."""
import getpass
import os
import sys
import tempfile

import pytest

# One persistent XLA compilation cache for the test session, its subprocesses and the xdist
# workers (set before jax is imported; subprocesses inherit the environment): the same tiny
# train steps are compiled by many tests and by every rerun of a killed run. Keys are hashes
# of the compiled program and its flags, so a stale entry is never used for changed code.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), f"fmdistill-tests-xla-{getpass.getuser()}"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)


@pytest.fixture(scope="session")
def root() -> str:
  return ROOT
