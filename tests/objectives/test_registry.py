"""The registry: names, defaults, clear errors."""
import pytest

from fmdistill import objectives


def test_names_and_defaults():
  names = objectives.names()
  assert "flow_matching" in names and "direct_distill" in names
  for n in names:
    cfg = objectives.default_config(n)
    assert {"path", "param", "sigma_d", "num_classes"} <= set(cfg.keys())
    assert callable(objectives.get(n))
  # a fresh copy each time
  a = objectives.default_config("flow_matching")
  a.label_dropout = 0.5
  assert objectives.default_config("flow_matching").label_dropout != 0.5


def test_unknown_name_lists_known():
  with pytest.raises(ValueError, match="flow_matching"):
    objectives.get("meanflw")
