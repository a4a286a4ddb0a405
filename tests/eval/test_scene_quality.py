"""Quality on the 32x32 scenes: the classifier's FD floor (data vs data) is finite and below the
FD to pixel-shuffled images, and the coverage columns come with it."""
import numpy as np

from fmdistill import config as config_lib, data
from fmdistill.eval import classifier, evaluate


def test_fd_floor_is_below_shuffled_images_and_coverage_is_reported(tmp_path):
  cfg = config_lib.base("flow_matching").data
  cfg.update(name="scenes", conditional=True, num_examples=1000)
  src = data.make_source(cfg, seed=0)
  cache = str(tmp_path / "classifier.npz")
  clf = classifier.train_classifier(src, steps=5, batch=32, cache=cache)
  assert clf.num_classes == 10 and 0.0 <= clf.accuracy <= 1.0
  floor = evaluate.noise_floor(src, 400, clf)
  assert np.isfinite(floor["fd"]) and floor["fd"] >= 0
  ref = src.reference(400, 0)
  rng = np.random.default_rng(0)
  flat = ref.reshape(len(ref), -1, 3)
  shuffled = np.stack([f[rng.permutation(len(f))] for f in flat]).reshape(ref.shape)
  q = evaluate.quality(shuffled, ref, clf)
  assert q["fd"] > 2 * floor["fd"]
  for r in (floor, q):
    assert 0 <= r["coverage_max_dev"] <= 0.9 and r["coverage_low"] in range(11)
  again = classifier.train_classifier(src, steps=1, cache=cache)  # read back from the cache
  np.testing.assert_array_equal(again.features(ref[:8]), clf.features(ref[:8]))
