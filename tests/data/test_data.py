"""Data sources: determinism from (seed, step), host-local slicing, images, the TFDS path."""
import numpy as np
import pytest

from fmdistill import data
from fmdistill.config import base
from fmdistill.data import images, tfds_builder, toy


@pytest.mark.parametrize("name", sorted(toy.TOYS))
def test_toys(name):
  x = toy.TOYS[name](np.random.default_rng(0), 1000)
  assert x.shape == (1000, 2) and x.dtype == np.float32
  assert np.all(np.abs(x) < 5)


def test_batches_are_a_function_of_the_step_and_split_across_hosts():
  cfg = base("flow_matching").data
  src = data.make_source(cfg, seed=3)
  a, b = src.batch(7, 64), src.batch(7, 64)
  np.testing.assert_array_equal(a["x"], b["x"])
  assert not np.array_equal(src.batch(8, 64)["x"], a["x"])
  parts = [src.batch(7, 64, i, 4)["x"] for i in range(4)]
  assert all(p.shape == (16, 2) for p in parts)


def test_array_source_epochs_cover_the_data():
  cfg = base("flow_matching").data
  cfg.name, cfg.conditional = "digits", True
  src = data.make_source(cfg, seed=0)
  assert src.shape == (8, 8, 1) and src.num_classes == 10
  idx = np.concatenate([src.indices(s, 100) for s in range(18)])
  assert len(np.unique(idx[:1797])) == 1797  # the first epoch is a permutation
  host = [src.batch(5, 64, i, 2) for i in range(2)]
  whole = src.batch(5, 64)
  np.testing.assert_array_equal(np.concatenate([host[0]["x"], host[1]["x"]]).sum(),
                                whole["x"].sum())
  assert whole["cond"].dtype == np.int32
  r1, r2 = src.reference(5000, 1), src.reference(5000, 2)
  assert len(r1) == 898  # half the data, disjoint halves for the noise floor
  assert not any((r1[:50, None] == r2[None]).all(axis=(2, 3, 4)).any(1))


def test_shapes_dataset():
  x, y = images.shapes(64, seed=0)
  assert x.shape == (64, 16, 16, 1) and set(np.unique(y)) <= set(range(4))
  assert x.min() >= -1 and x.max() <= 1 and x.max() > 0


def test_tfds_builder_round_trip(tmp_path):
  name = tfds_builder.build_digits(str(tmp_path))
  cfg = base("flow_matching").data
  cfg.update(name="tfds", tfds_name=name, data_dir=str(tmp_path), num_classes=10,
             conditional=True)
  src = data.make_source(cfg, seed=0)
  assert src.shape == (8, 8, 1) and src.size == 1500
  b = src.batch(0, 32)
  assert b["x"].shape == (32, 8, 8, 1) and b["cond"].shape == (32,)
  xs, ys = images.digits()
  # every tfds example is one of the bundled digits with its label
  i = int(np.argmin(((xs - b["x"][0]) ** 2).sum(axis=(1, 2, 3))))
  np.testing.assert_allclose(xs[i], b["x"][0])
  assert ys[i] == b["cond"][0]


def test_tfds_missing_data_is_a_clear_error(tmp_path):
  cfg = base("flow_matching").data
  cfg.update(name="tfds", tfds_name="fmdistill_digits", data_dir="")
  with pytest.raises(ValueError, match="data_dir"):
    data.make_source(cfg, 0)
  cfg.data_dir = str(tmp_path)
  with pytest.raises(FileNotFoundError, match="not found under"):
    data.make_source(cfg, 0)


def test_unknown_dataset():
  cfg = base("flow_matching").data
  cfg.name = "imagenet"
  with pytest.raises(ValueError, match="data.name"):
    data.make_source(cfg, 0)
  cfg.name, cfg.toy = "toy", "swissroll"
  with pytest.raises(ValueError, match="data.toy"):
    data.make_source(cfg, 0)


def test_tfds_tfrecord_without_tensorflow_says_which_extra(tmp_path):
  """A tfrecord dataset goes through tf.data; without TensorFlow the error names the extra."""
  import json
  import pathlib
  pytest.importorskip("tensorflow_datasets")
  try:
    import tensorflow  # noqa: F401
    pytest.skip("TensorFlow is installed: the error path cannot be shown")
  except ImportError:
    pass
  name = tfds_builder.build_digits(str(tmp_path))
  info = next(pathlib.Path(tmp_path).glob(f"{name}/*/dataset_info.json"))
  meta = json.loads(info.read_text())
  meta["fileFormat"] = "tfrecord"
  info.write_text(json.dumps(meta))
  cfg = base("flow_matching").data
  cfg.update(name="tfds", tfds_name=name, data_dir=str(tmp_path))
  with pytest.raises(ValueError, match=r"install the 'tf' extra"):
    data.make_source(cfg, 0)
  cfg.split = "validation"
  with pytest.raises(ValueError, match="not a split"):
    data.make_source(cfg, 0)
