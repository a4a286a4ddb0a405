"""Metrics against closed forms."""
import numpy as np

from fmdistill.eval import metrics


def test_sliced_w2_of_a_shift():
  """For a shift d in 2-D, sliced W2 = |d| / sqrt(2) (mean of cos^2 over directions = 1/2)."""
  rng = np.random.default_rng(0)
  a = rng.standard_normal((20_000, 2))
  d = np.array([0.6, -0.8])
  sw = metrics.sliced_w2(a, a + d, num_projections=2000)
  assert abs(sw - 1.0 / np.sqrt(2)) < 0.01
  assert metrics.sliced_w2(a, a) == 0.0


def test_energy_and_mmd():
  rng = np.random.default_rng(1)
  a, b = rng.standard_normal((1500, 2)), rng.standard_normal((1500, 2))
  c = b + 1.0
  assert metrics.energy_distance(a, b) < 0.01 < metrics.energy_distance(a, c)
  assert metrics.mmd_rbf(a, b) < 0.01 < metrics.mmd_rbf(a, c)
  # the reference's own term, passed in, gives the same figure to the last bit
  assert metrics.energy_distance(a, c, metrics.energy_self(c)) == metrics.energy_distance(a, c)
  assert metrics.mmd_rbf(a, c, self_b=metrics.mmd_self(c)) == metrics.mmd_rbf(a, c)
  assert (metrics.energy_distance(a, c, metrics.energy_self(c), metrics.energy_self(a))
          == metrics.energy_distance(a, c))
  assert (metrics.mmd_rbf(a, c, self_b=metrics.mmd_self(c), self_a=metrics.mmd_self(a))
          == metrics.mmd_rbf(a, c))
  assert metrics.energy_distance(a, c, metrics.energy_self(b)) != metrics.energy_distance(a, c)


def test_frechet_distance_closed_form():
  """FD between N(0, I) and N(m, s^2 I) in k dims is |m|^2 + k (1 - s)^2."""
  rng = np.random.default_rng(2)
  k, n = 4, 200_000
  a = rng.standard_normal((n, k))
  b = 0.5 * rng.standard_normal((n, k)) + 1.0
  expected = k * 1.0 + k * (1 - 0.5) ** 2
  assert abs(metrics.frechet_distance(a, b) - expected) < 0.05


def test_noise_floor_uses_two_samples():
  calls = []
  def sample(n, seed):
    calls.append(seed)
    return np.random.default_rng(seed).standard_normal((n, 2))
  floor = metrics.noise_floor(metrics.sliced_w2, sample, 500)
  assert floor > 0 and sorted(calls) == [1, 2]


def test_class_coverage_hand_computed():
  """Uniform predictions -> 0 deviation, no class under half its share; everything in one of C
  classes -> max |frac - 1/C| = 1 - 1/C and C - 1 classes under half their share."""
  c = 10
  uniform = metrics.class_coverage(np.arange(1000) % c, c)
  assert uniform == {"coverage_max_dev": 0.0, "coverage_low": 0.0}
  one = metrics.class_coverage(np.full(500, 3), c)
  assert abs(one["coverage_max_dev"] - 0.9) < 1e-12 and one["coverage_low"] == 9
  # 4 classes, fractions (0.5, 0.3, 0.2, 0): deviations (.25, .05, .05, .25); 0 < 0.125
  mixed = metrics.class_coverage(np.array([0] * 5 + [1] * 3 + [2] * 2), 4)
  assert abs(mixed["coverage_max_dev"] - 0.25) < 1e-12 and mixed["coverage_low"] == 1
  # a class at exactly half its share (0.125 of 8 = 1 of 8 samples... here 1 of 8) is not low
  half = metrics.class_coverage(np.array([0, 1, 1, 1, 2, 2, 3, 3]), 4)
  assert half["coverage_low"] == 0 and abs(half["coverage_max_dev"] - 0.125) < 1e-12
