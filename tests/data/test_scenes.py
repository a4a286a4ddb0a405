"""The 32x32 RGB scenes: determinism, shapes and range, class balance, the registered name, and
the TFDS build serving the same arrays."""
import os
import sys

import numpy as np
import pytest

from fmdistill import config as config_lib, data, train
from fmdistill.data import scenes, tfds_builder, tfds_source
from fmdistill.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "experiments"))
import digits  # noqa: E402


def test_scenes_are_a_pure_function_of_n_and_seed():
  a, ya = scenes.scenes_uint8(120, seed=3)
  b, yb = scenes.scenes_uint8(120, seed=3)
  np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(ya, yb)
  c, _ = scenes.scenes_uint8(120, seed=4)
  assert np.abs(a.astype(int) - c.astype(int)).mean() > 5


def test_shapes_dtypes_range_and_the_uint8_grid():
  x, y = scenes.scenes(200, seed=0)
  assert x.shape == (200, 32, 32, 3) and x.dtype == np.float32
  assert y.shape == (200,) and y.dtype == np.int32 and set(y) == set(range(10))
  assert x.min() >= -1.0 and x.max() <= 1.0 and x.max() - x.min() > 1.5
  u, _ = scenes.scenes_uint8(200, seed=0)
  np.testing.assert_array_equal(x, (u / 127.5 - 1.0).astype(np.float32))
  assert not x.flags.writeable  # the cached arrays cannot be modified by a caller


@pytest.mark.parametrize("n", [200, 1003])
def test_classes_are_balanced(n):
  _, y = scenes.scenes_uint8(n, seed=1)
  counts = np.bincount(y, minlength=10)
  assert counts.sum() == n and counts.max() - counts.min() <= 1


def test_the_colour_family_is_in_the_pixels():
  """Warm classes (even labels) are redder than cool ones (odd labels): red minus blue of the
  most saturated pixel of each image separates the families."""
  u, y = scenes.scenes_uint8(400, seed=2)
  px = u.reshape(len(u), -1, 3).astype(float)
  sat = px.max(-1) - px.min(-1)
  top = px[np.arange(len(u)), sat.argmax(1)]
  warmth = top[:, 0] - top[:, 2]
  assert (warmth[y % 2 == 0] > 0).mean() > 0.95 and (warmth[y % 2 == 1] < 0).mean() > 0.95


def test_registered_name_and_the_experiment_config():
  c = digits.get_config("flow_matching,data=scenes")
  config_lib.validate(c)
  assert c.data.name == "scenes" and c.model.patch == 4
  cfg = c.data.copy_and_resolve_references()
  cfg.num_examples = 300
  src = data.make_source(cfg, seed=0)
  assert src.shape == (32, 32, 3) and src.num_classes == 10 and src.size == 300
  b = src.batch(0, 16)
  assert b["x"].shape == (16, 32, 32, 3) and b["cond"].dtype == np.int32
  config_lib.validate(digits.get_config("meanflow,data=scenes"))
  with pytest.raises(ConfigError, match="data='cifar'"):
    digits.get_config("flow_matching,data=cifar")


def test_tfds_build_serves_the_same_arrays(tmp_path):
  name = tfds_builder.build_scenes(str(tmp_path), "small")
  cfg = config_lib.base("flow_matching").data
  cfg.update(name="tfds", tfds_name=name, data_dir=str(tmp_path), num_classes=10,
             conditional=True)
  for split, n, seed in (("train", 512, 0), ("test", 128, 1)):
    cfg.split = split
    rows = tfds_source.rows(cfg)
    order = np.argsort([int(r["index"]) for r in rows])
    got = tfds_source.to_arrays(rows, order, cfg, labelled=True)
    x, y = scenes.scenes(n, seed)
    np.testing.assert_array_equal(got["x"], x)
    np.testing.assert_array_equal(got["cond"], y)
  cfg.split = "train"
  src = data.make_source(cfg, seed=0)
  assert src.shape == (32, 32, 3) and src.size == 512 and src.num_classes == 10


@pytest.mark.slow
def test_scene_configs_train_a_step_in_the_loop(tmp_path):
  """The DiT teacher and a flow-map student (MeanFlow, trained from scratch) at 32x32 RGB take
  real steps through the train loop (tiny network; ~20 s of CPU, so ``-m slow``)."""
  for method in ("flow_matching", "meanflow"):
    c = digits.get_config(f"{method},data=scenes,steps=2")
    c.data.num_examples = 64
    c.model.update(width=16, depth=1, heads=2)
    c.train.update(batch_size=8, log_every=1, ckpt_every=2, warmup_steps=0)
    net, state = train.train_and_evaluate(c, str(tmp_path / method), progress=False)
    assert int(state.step) == 2
