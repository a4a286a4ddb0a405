"""The consistency / CTM / IMM family in the experiment configs and the real train loop."""
import os
import sys

import jax.numpy as jnp
import pytest

from fmdistill import config as config_lib
from fmdistill import objectives, train
from fmdistill.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "experiments"))
import digits  # noqa: E402
import toy2d  # noqa: E402

FAMILY = {"cm_cd": True, "cm_ct": False, "ict": False, "ect": True, "ctm": True, "imm": False}


@pytest.mark.parametrize("name", sorted(FAMILY))
def test_configs_validate_with_the_registry_traits(name):
  entry = objectives.entry(name)
  assert entry.needs_teacher == FAMILY[name]  # CD, ECT and CTM start from (and need) a teacher
  for c in (toy2d.get_config(name), digits.get_config(name)):
    config_lib.validate(c)
    assert c.objective.path == "linear" and c.objective.param == "displacement"
    assert c.eval.gamma == (1.0 if entry.consistency else 0.0)
    if c.objective.target_ema:  # an EMA target is kept by the run
      assert c.objective.target_ema == f"ema_{c.train.ema_decays[0]:g}"
  assert entry.consistency == (name not in ("ctm", "imm"))


def test_a_target_ema_the_run_does_not_keep_is_refused():
  c = toy2d.get_config("cm_cd")
  c.objective.target_ema = "ema_0.9"
  with pytest.raises(ConfigError, match="objective.target_ema"):
    config_lib.validate(c)


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
  wd = str(tmp_path_factory.mktemp("family") / "fm")
  c = toy2d.get_config("flow_matching")
  c.model.width, c.model.depth, c.train.batch_size = 16, 1, 32
  c.train.steps, c.train.log_every, c.train.warmup_steps = 5, 5, 0
  train.train_and_evaluate(c, wd, progress=False)
  return wd


@pytest.mark.parametrize("name", ["cm_cd", "ctm"])
def test_trains_in_the_train_loop_from_the_teacher(name, teacher_run, tmp_path):
  """Five steps through the real (sharded, checkpointed) loop, the student initialised from
  the teacher's weights; CD's theta^- is the run's EMA 0.95 and its ``curriculum_steps`` (the
  papers' K) is filled in with ``train.steps``; CTM's teacher solve runs inside the jitted
  step."""
  c = toy2d.get_config(name)
  c.model.width, c.model.depth, c.train.batch_size = 16, 1, 32
  c.train.steps, c.train.log_every, c.train.warmup_steps = 5, 5, 0
  c.teacher.workdir = teacher_run
  net, state = train.train_and_evaluate(c, str(tmp_path / name), progress=False)
  assert int(state.step) == 5 and int(state.skipped) == 0
  if name == "cm_cd":
    assert set(state.ema) == {"ema_0.95", "ema_0.999"}
    assert c.objective.curriculum_steps == 5
  out = net(state.params, jnp.zeros((4, 2)), jnp.ones((4,)), jnp.zeros((4,)))
  assert bool(jnp.all(jnp.isfinite(out)))
