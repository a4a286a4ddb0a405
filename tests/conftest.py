"""Shared fixtures. Tests run on CPU in float32 unless a test enables x64 locally."""
import os
import sys

import pytest

# Tests compile many tiny programs whose run time is negligible: skip LLVM's optimisation passes
# (about 13% less CPU for the suite, measured; subprocesses inherit it). Set before jax loads.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + " --xla_backend_optimization_level=0").strip()

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)


@pytest.fixture(scope="session")
def root() -> str:
  return ROOT
