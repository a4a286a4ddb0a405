"""Bad objective fields of the distribution-matching family, rCM, TVM and FreeFlow are refused by
``config.validate`` -- one line naming ``config.objective.<field>`` and what it accepts -- before
a workdir exists, instead of training on a silently wrong distribution (a negative shift or a GAN
time beyond ``T`` used to train; rCM's ``r = k u / (1 + (k - 1) u)`` with ``k < 0`` has a pole
in ``(0, 1)``). Every shipped config of these methods validates."""
import os
import sys

import jax
import pytest

from fmdistill import config as config_lib, models, objectives
from fmdistill.errors import ConfigError
from fmdistill.objectives import _score

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "experiments"))
import digits  # noqa: E402
import imagenet  # noqa: E402
import toy2d  # noqa: E402

METHODS = ("dmd", "dmd_v1", "dmd2", "vsd", "sid", "rcm", "tvm", "freeflow", "fmm_forward",
           "fmm_backward", "fmm_forward_self", "fmm_backward_self")


@pytest.mark.parametrize("method", METHODS)
def test_every_shipped_config_of_the_method_validates(method):
  configs = [toy2d.get_config(method), digits.get_config(method)]
  if method == "rcm":  # the one of these methods the paper-scale files carry
    configs.append(imagenet.get_config(method))
  for c in configs:
    config_lib.validate(c)
  assert objectives.entry(method).check is not None


BAD = [
    ("dmd2", "rollout_steps", 0, "an integer >= 1"),
    ("dmd2", "rollout_times", "bogus", "['uniform', 'random']"),
    ("dmd2", "gan_t_max", 2.0, "(0, 1]"),
    ("dmd2", "gan_weight", -1.0, ">= 0"),
    ("dmd", "noise_time", "edm", "['uniform', 'karras', 'shift']"),
    ("sid", "noise_max", 1.5, "(noise_min, 1]"),
    ("vsd", "noise_min", 0.99, "[0, noise_max)"),
    ("rcm", "noise_shift", -1.0, "> 0"),
    ("rcm", "rollout_gamma", 2.0, "[0, 1]"),
    ("tvm", "gap_std", -1.0, ">= 0"),
    ("freeflow", "balance", "equal", "['adaptive', 'fixed']"),
    ("freeflow", "r_max", 1.5, "(r_min, 1]"),
    ("fmm_forward", "velocity", "conditional", "'teacher'"),  # the forward loss ignored it
    ("fmm_backward", "order", 2, "1 (the second order needs"),
    ("fmm_forward_self", "order", 2, "1 (the second order needs"),
]


@pytest.mark.parametrize("method,field,value,accepted", BAD)
def test_a_bad_field_is_one_line_naming_it(method, field, value, accepted):
  c = toy2d.get_config(method)
  c.objective[field] = value
  with pytest.raises(ConfigError) as e:
    config_lib.validate(c)
  msg = str(e.value)
  assert msg.startswith(f"config.objective.{field}={value!r} is invalid; accepted: "), msg
  assert accepted in msg and "\n" not in msg


def test_a_loss_called_directly_checks_the_same_fields():
  cfg = objectives.default_config("dmd2")
  cfg.noise_shift = 0.0
  with pytest.raises(ValueError, match=r"objective\.noise_shift=0\.0 is invalid"):
    _score.check(cfg)


SHARED = [  # fields that mean the same in every method that has them (_common.FIELD_RULES)
    ("flow_matching", "num_classes", -1, "an integer >= 0"),
    ("meanflow", "equal_ratio", 1.5, "a fraction in [0, 1]"),
    ("fmm_forward", "order", 3, "[1, 2]"),
    ("ctm", "sigma_max", 0.001, "> sigma_min"),
    ("cm_ct", "s1", 1, "an integer >= s0"),
    ("fmm_forward_self", "fm_weight", -1.0, ">= 0"),
    ("scm_cd", "tangent_warmup", -5, "an integer >= 0"),
    ("imm", "t_max", 0.0, "> t_min"),
    ("imm", "group_size", 0, "an integer >= 1"),
    ("ctm", "num_scales", 1, "an integer >= 2"),
]


@pytest.mark.parametrize("method,field,value,accepted", SHARED)
def test_a_bad_shared_field_is_one_line_naming_it(method, field, value, accepted):
  test_a_bad_field_is_one_line_naming_it(method, field, value, accepted)


OTHER = [  # the method-specific checks and the model's, all built by errors.invalid
    ("progressive", "objective.weighting", "bogus", "['"),
    ("progressive", "objective.student_steps", 0, "a positive integer"),
    ("meanflow", "objective.adaptive_reduce", "median", "['"),
    ("shortcut", "objective.finest", "bogus", "'flow' or 'map'"),
    ("tri_consistency", "objective.split", "bogus", "['"),
    ("splitmeanflow", "objective.sc_ratio", 1.5, "a fraction in [0, 1]"),
    ("reflow", "objective.pair_steps", 0, "a positive integer"),
    ("flow_matching", "objective.path", "bogus", "['"),
    ("flow_matching", "model.modulation", "bogus", "['"),
    ("flow_matching", "model.time_embedding", "bogus", "['"),
]


@pytest.mark.parametrize("method,field,value,accepted", OTHER)
def test_every_other_check_gives_the_same_one_line_form(method, field, value, accepted):
  c = toy2d.get_config(method)
  if "stage_order" in c:
    c = c.stages[c.stage_order[-1]]
  section, name = field.split(".")
  c[section][name] = value
  with pytest.raises(ConfigError) as e:
    config_lib.validate(c)
    models.build(c.model, tuple(c.data_shape), 0, jax.random.PRNGKey(0))  # the model's own
  msg = str(e.value)
  assert msg.startswith(f"config.{field}={value!r} is invalid; accepted: "), msg
  assert accepted in msg and "\n" not in msg


def test_every_shipped_config_validates():
  """Every variant of every experiment file (the rules above refuse none of them)."""
  import cifar10  # noqa: E402
  n = 0
  for module in (toy2d, digits, cifar10, imagenet):
    for method in objectives.names():
      try:
        c = module.get_config(method)
      except ConfigError as e:  # a file without that method says so
        assert "has no" in str(e), e
        continue
      for stage in ([c.stages[s] for s in c.stage_order] if "stage_order" in c else [c]):
        config_lib.validate(stage)
        n += 1
  assert n > 60, n
