"""Every tangent method has a valid toy and digits config, and trains through the real loop."""
import os
import sys

import jax
import jax.numpy as jnp
import pytest

from fmdistill import config as config_lib
from fmdistill import objectives, train
from fmdistill.objectives import _common

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "experiments"))
import digits  # noqa: E402
import toy2d  # noqa: E402

NO_TEACHER = {"scm_ct", "meanflow", "fmm_forward_self", "fmm_backward_self"}


@pytest.mark.parametrize("name", toy2d.TANGENT)
def test_configs_validate_and_declare_teachers(name):
  assert objectives.entry(name).needs_teacher == (name not in NO_TEACHER)
  for c in (toy2d.get_config(name), digits.get_config(name)):
    config_lib.validate(c)
    assert c.method == name and c.model.time_scale == 1.0


def test_scm_trains_its_learned_weighting_in_the_train_loop(tmp_path):
  """The loop adds ``w_phi`` to the params, updates it, and samples with the plain network."""
  c = toy2d.get_config("scm_ct")
  c.model.width, c.model.depth, c.train.batch_size = 16, 1, 32
  c.train.steps, c.train.log_every, c.train.warmup_steps = 5, 5, 0
  net, state = train.train_and_evaluate(c, str(tmp_path / "scm"), progress=False)
  w = state.params[_common.AUX_KEY]["w"]
  assert float(jnp.max(jnp.abs(w))) > 0  # w_phi moved from its zero init
  x = jnp.zeros((4, 2))
  out = net(state.params, x, jnp.full((4,), 1.0), jnp.zeros((4,)))  # StripAux ignores w_phi
  assert out.shape == (4, 2) and bool(jnp.all(jnp.isfinite(out)))
