"""InceptionV3 for FID with random weights: input handling, one forward pass at 299x299, the
weight-file round trip, one-line errors, reference statistics and the FID formula."""
import os

import jax
import numpy as np
import pytest

from fmdistill import config as config_lib
from fmdistill.errors import ConfigError, DataError
from fmdistill.eval import fid, inception, metrics


@pytest.fixture(scope="module")
def net():
  return inception.init(seed=0)


def test_preprocess_resizes_and_makes_grey_rgb():
  rng = np.random.default_rng(0)
  rgb = rng.uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
  grey = rng.uniform(-1, 1, (2, 32, 32, 1)).astype(np.float32)
  a, b = inception.preprocess(rgb), inception.preprocess(grey)
  assert a.shape == b.shape == (2, 299, 299, 3)
  np.testing.assert_array_equal(b[..., 0], b[..., 2])
  assert float(a.min()) >= -1 and float(a.max()) <= 1
  const = inception.preprocess(np.full((1, 8, 8, 1), 0.25, np.float32))
  np.testing.assert_allclose(const, 0.25, atol=1e-6)
  assert float(inception.preprocess(np.full((1, 4, 4, 3), 3.0, np.float32)).max()) == 1.0


def test_features_and_the_weight_file_round_trip(net, tmp_path):
  """One 299x299 forward of a batch of two (an RGB and a grey 32x32 image): (2, 2048) finite
  features; the params written in the PyTorch layout and loaded back give the same features."""
  graphdef, params = net
  rng = np.random.default_rng(1)
  x = np.concatenate([inception.preprocess(rng.uniform(-1, 1, (1, 32, 32, 3))),
                      inception.preprocess(rng.uniform(-1, 1, (1, 32, 32, 1)))])
  run = inception.features_fn(graphdef)
  f = np.asarray(run(params, x))
  assert f.shape == (2, 2048) and np.all(np.isfinite(f)) and f.std() > 0
  assert not np.allclose(f[0], f[1])
  path = str(tmp_path / "w.npz")
  fid.save_weights(params, path)
  with np.load(path) as z:  # the documented layout: PyTorch names, OIHW kernels
    assert z["Conv2d_1a_3x3.conv.weight"].shape == (32, 3, 3, 3)
    assert z["Mixed_7c.branch3x3dbl_3b.bn.running_var"].shape == (384,)
    assert len(z.files) == 94 * 5
    names = inception.layer_names(params)
    assert len(names) == 94 and "Mixed_7b.branch3x3dbl_3a" in names
    assert all(f"{n}.bn.running_mean" in z.files for n in names)
  loaded = fid.load_params(path)
  np.testing.assert_array_equal(np.asarray(run(loaded, x)), f)


def test_pickle_round_trip_and_extra_keys_are_ignored(net, tmp_path):
  """A pickled state dict with the classifier head and BN counters (as PyTorch saves them)."""
  import pickle
  _, params = net
  raw = fid.state_dict(params)
  raw["fc.weight"] = np.zeros((1008, 2048), np.float32)
  raw["Conv2d_1a_3x3.bn.num_batches_tracked"] = np.zeros((), np.int64)
  with open(tmp_path / "w.pkl", "wb") as f:
    pickle.dump(raw, f)
  loaded = fid.load_params(str(tmp_path / "w.pkl"))
  same = jax.tree_util.tree_map(lambda a, b: bool(np.array_equal(a, b)), params, loaded)
  assert all(jax.tree_util.tree_leaves(same))


def _one_line(e) -> str:
  text = str(e.value)
  assert "\n" not in text
  return text


def test_missing_corrupt_and_wrong_files_are_one_line(net, tmp_path):
  _, params = net
  missing = str(tmp_path / "nope.npz")
  with pytest.raises(ConfigError) as e:
    fid.load_params(missing)
  assert missing in _one_line(e)
  bad = tmp_path / "bad.npz"
  bad.write_bytes(b"not a zip file at all")
  with pytest.raises(DataError) as e:
    fid.load_params(str(bad))
  assert str(bad) in _one_line(e)
  badpkl = tmp_path / "bad.pkl"
  badpkl.write_bytes(b"\x80\x04garbage")
  with pytest.raises(DataError) as e:
    fid.load_params(str(badpkl))
  assert str(badpkl) in _one_line(e)
  # tiny arrays under every name: the name check runs first, then the shapes
  raw = {k: np.zeros((1, 1, 1, 1) if k.endswith("conv.weight") else (1,), np.float32)
         for k in fid.state_dict(params)}
  short = dict(raw)
  del short["Mixed_6b.branch7x7_2.conv.weight"]
  np.savez(str(tmp_path / "short.npz"), **short)
  with pytest.raises(DataError, match="lack 1 of 470") as e:
    fid.load_params(str(tmp_path / "short.npz"))
  assert "Mixed_6b.branch7x7_2.conv.weight" in _one_line(e)
  np.savez(str(tmp_path / "shape.npz"), **raw)
  with pytest.raises(DataError, match=r"'Conv2d_1a_3x3.bn.bias' has shape \(1,\); "
                     r"expected \(32,\)") as e:
    fid.load_params(str(tmp_path / "shape.npz"))
  _one_line(e)


def test_config_refuses_a_missing_weight_file(tmp_path):
  c = config_lib.base("flow_matching")
  c.data.name, c.model.name = "digits", "dit"
  c.eval.inception_weights = str(tmp_path / "absent.npz")
  with pytest.raises(ConfigError, match="absent.npz"):
    config_lib.validate(c)
  (tmp_path / "w.npz").write_bytes(b"")
  c.eval.inception_weights = str(tmp_path / "w.npz")
  config_lib.validate(c)
  c.data.name, c.model.name = "toy", "mlp"
  with pytest.raises(ConfigError, match="toy"):
    config_lib.validate(c)


def test_fid_to_itself_is_zero_and_a_shift_costs_its_square(tmp_path):
  """FID of a set to its own statistics ~ 0; a shift by d adds exactly |d|^2; the reference
  statistics are cached under a name keyed by dataset, split, size and weights hash."""
  rng = np.random.default_rng(3)
  x = rng.standard_normal((600, 2, 2, 2))
  feats = lambda im: np.asarray(im, np.float64).reshape(len(im), -1)
  cache = str(tmp_path / fid.stats_key("fmdistill_scenes/small", "train", 600, "ab" * 32))
  assert os.path.basename(cache) == ("fid_stats_fmdistill_scenes-small_train_600_"
                                     "abababababababab.npz")
  mu, sigma = fid.reference_stats(lambda idx: x[idx], len(x), feats, cache, batch=128)
  assert os.path.isfile(cache)
  score = fid.fid_fn(feats, mu, sigma)
  assert abs(score(x)) < 1e-6
  d = np.full(8, 0.5)
  assert abs(score(x + d.reshape(2, 2, 2)) - (d ** 2).sum()) < 1e-6
  def refuse(_):
    raise AssertionError("the cached statistics were recomputed")
  mu2, sigma2 = fid.reference_stats(lambda idx: x[idx], len(x), refuse, cache)
  np.testing.assert_array_equal(mu, mu2)
  np.testing.assert_array_equal(sigma, sigma2)
  # the closed form for Gaussians with different covariances: N(0, I) vs N(m, s^2 I)
  assert abs(metrics.frechet_from_stats(np.zeros(3), np.eye(3), np.ones(3), 0.25 * np.eye(3))
             - (3 + 3 * 0.25)) < 1e-9


@pytest.mark.slow
def test_report_adds_fid_with_its_floor_and_caches_the_statistics(net, tmp_path):
  """A tiny digits run evaluated with (random) Inception weights: an ``fid`` column beside the
  floor, the reference statistics cached under the weights' hash (~1 min of CPU: ``-m slow``)."""
  from fmdistill import train
  from fmdistill.eval import report
  _, params = net
  weights = str(tmp_path / "inception.npz")
  fid.save_weights(params, weights)
  c = config_lib.base("flow_matching")
  c.data.update(name="digits", conditional=True)
  c.model.update(name="dit", width=16, depth=1, heads=2, patch=2)
  c.train.update(steps=2, batch_size=16, log_every=2, ckpt_every=2)
  c.eval.update(num_samples=8, teacher_nfe=(1,), classifier_steps=2, inception_weights=weights,
                fid_reference_num=8, fid_batch=4)
  wd = str(tmp_path / "run")
  train.train_and_evaluate(c, wd, progress=False)
  out = str(tmp_path / "report")
  result = report.evaluate_runs({"run": wd}, out)
  floor, q = result["noise_floor"]["fid"], result["runs"]["run"]["nfe"][1]["fid"]
  assert np.isfinite(floor) and floor >= 0 and np.isfinite(q) and q > floor
  cached = [f for f in os.listdir(out) if f.startswith("fid_stats_digits")]
  assert cached == [fid.stats_key("digits4096", "all", 8, fid.file_sha256(weights))]
  assert "`fid`" in report.markdown(result, "t")
