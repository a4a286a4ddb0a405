"""Shared fixtures. Tests run on CPU in float32 unless a test enables x64 locally."""
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)


@pytest.fixture(scope="session")
def root() -> str:
  return ROOT
