"""A data-free method (registry trait ``batch='prior'``) trains through the real loop without a
data source: its batches are prior samples shaped like its teacher's data."""
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fmdistill import train
from fmdistill.data import prior
from fmdistill.errors import ConfigError

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "experiments"))
import toy2d  # noqa: E402


def _small(c, steps):
  c.model.width, c.model.depth = 16, 1
  c.train.update(batch_size=32, steps=steps, log_every=steps, warmup_steps=0, ckpt_every=steps)
  return c


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
  wd = str(tmp_path_factory.mktemp("fm") / "teacher")
  train.train_and_evaluate(_small(toy2d.get_config("flow_matching"), 2), wd, progress=False)
  return wd


def test_freeflow_trains_without_opening_the_data(tmp_path, teacher_dir, monkeypatch):
  def no_data(config):
    raise AssertionError("a data-free method opened its data source")
  monkeypatch.setattr(train, "make_source", no_data)
  c = _small(toy2d.get_config("freeflow"), 5)
  c.teacher.workdir = teacher_dir
  net, state = train.train_and_evaluate(c, str(tmp_path / "ff"), progress=False)
  assert int(state.step) == 5 and int(state.parts["critic"].count) == 5
  assert c.data_shape == [2]
  line = json.loads(open(tmp_path / "ff" / "metrics.jsonl").read().splitlines()[-1])
  for k in ("loss", "predictor", "corrector", "velocity_gap", "critic_loss"):
    assert np.isfinite(line[k]), (k, line)
  x = jnp.ones((3, 2))
  out = net(state.params, x, jnp.ones(3), jnp.zeros(3))
  assert out.shape == (3, 2) and bool(jnp.all(jnp.isfinite(out)))


def test_data_free_method_without_teacher_is_one_line(tmp_path):
  c = _small(toy2d.get_config("freeflow"), 5)
  with pytest.raises(ConfigError, match="data-free.*teacher.workdir"):
    train.setup(c, str(tmp_path / "none"), progress=False)
  assert not os.path.exists(tmp_path / "none")


def test_prior_batches_are_a_pure_function_of_seed_and_step():
  src = prior.PriorSource((4, 4, 1), 10, seed=3)
  a, b = src.batch(7, 8), src.batch(7, 8)
  assert set(a) == {"z", "cond"} and a["z"].shape == (8, 4, 4, 1) and a["z"].dtype == np.float32
  np.testing.assert_array_equal(a["z"], b["z"])
  assert not np.array_equal(a["z"], src.batch(8, 8)["z"])
  halves = [src.batch(7, 8, i, 2) for i in range(2)]
  np.testing.assert_array_equal(np.concatenate([h["z"] for h in halves]), a["z"])
  np.testing.assert_array_equal(np.concatenate([h["cond"] for h in halves]), a["cond"])
  assert a["cond"].min() >= 0 and a["cond"].max() < 10
  assert "cond" not in prior.PriorSource((2,), 0, 0).batch(0, 4)
  assert abs(float(np.std(src.batch(0, 4096)["z"])) - 1.0) < 0.02
