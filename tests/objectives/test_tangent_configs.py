"""Every tangent method has a valid toy and digits config, and trains through the real loop."""
import os
import sys

import jax
import jax.numpy as jnp
import pytest

from fmdistill import config as config_lib
from fmdistill import objectives, train

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "experiments"))
import digits  # noqa: E402
import toy2d  # noqa: E402

NO_TEACHER = {"scm_ct", "meanflow", "fmm_forward_self", "fmm_backward_self", "imf", "tvm"}


TANGENT = [n for n in objectives.names() if objectives.entry(n).tangent]


def test_tangent_traits_cover_the_family():
  assert {"scm_ct", "scm_cd", "meanflow", "meanflow_distill", "ayf_emd", "ayf_lmd", "facm",
          "fmm_forward", "fmm_backward", "rcm"} <= set(TANGENT)
  assert not objectives.entry("flow_matching").tangent


@pytest.mark.parametrize("name", TANGENT)
def test_configs_validate_and_declare_teachers(name):
  """Every tangent config validates, uses the one smooth time embedding (the teacher's), and
  distillation configs start the student from the teacher."""
  assert objectives.entry(name).needs_teacher == (name not in NO_TEACHER)
  for c in (toy2d.get_config(name), digits.get_config(name)):
    config_lib.validate(c)
    assert c.method == name and c.model.time_scale == 1.0
    assert c.model.time_embedding == "positional" and c.teacher.init_student
    assert c.eval.gamma == (1.0 if objectives.entry(name).consistency else 0.0)


def test_scm_trains_its_learned_weighting_in_the_train_loop(tmp_path):
  """``w_phi`` is a part (``parts['weighting']``) updated with the student by the same loss;
  the network's own parameters hold nothing else."""
  c = toy2d.get_config("scm_ct")
  c.model.width, c.model.depth, c.train.batch_size = 16, 1, 32
  c.train.steps, c.train.log_every, c.train.warmup_steps = 5, 5, 0
  net, state = train.train_and_evaluate(c, str(tmp_path / "scm"), progress=False)
  w = state.parts["weighting"].params["w"]
  assert float(jnp.max(jnp.abs(w))) > 0  # w_phi moved from its zero init
  assert int(state.parts["weighting"].count) == 5
  assert "loss_weight" not in state.params and "weighting" not in state.params
  x = jnp.zeros((4, 2))
  out = net(state.params, x, jnp.full((4,), 1.0), jnp.zeros((4,)))
  assert out.shape == (4, 2) and bool(jnp.all(jnp.isfinite(out)))
