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


def test_a_half_declared_sampling_trait_is_refused():
  """``samples_with_teacher`` without ``sampling_net`` (or the reverse) would sample a raw
  network or never ask for the teacher: refused at registration, before anything runs."""
  base = objectives.entry("flow_matching")
  for kw in ({"samples_with_teacher": lambda cfg: True}, {"sampling_net": lambda n, t, c: n}):
    bad = objectives.Objective(name="half_declared", loss=base.loss, defaults=base.defaults,
                               **kw)
    with pytest.raises(ValueError, match="come together"):
      objectives.register(bad)
  assert "half_declared" not in objectives.names()
