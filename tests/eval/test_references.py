"""Figures averaged over several held-out samples, the floor over every pair of them
(``evaluate.references`` / ``scores`` / ``floor``): one draw moves sliced W2 at 2000 samples by
up to +-30%, so a report's figure is a mean and its floor a range."""
import itertools

import numpy as np
import pytest

from fmdistill import config, data
from fmdistill.eval import evaluate, metrics


def _toy():
  c = config.base("flow_matching").data
  c.toy = "moons"
  return data.make_source(c, 0)


def test_a_toy_gives_independent_draws_a_finite_set_its_two_halves():
  toy = _toy()
  refs = evaluate.references(toy, 300, 4)
  assert len(refs) == 4
  assert all(not np.allclose(a, b) for a, b in itertools.combinations(refs, 2))
  x = np.random.default_rng(0).standard_normal((100, 3)).astype(np.float32)
  arr = data.ArraySource(lambda idx: {"x": x[idx]}, 100, 0, (3,), 0)
  halves = evaluate.references(arr, 80, 4)  # capped: a finite set has two distinct draws
  assert len(halves) == 2 and halves[0].shape == (50, 3)
  rows = lambda a: {tuple(r) for r in a.tolist()}
  assert not rows(halves[0]) & rows(halves[1])  # disjoint, so the floor is data vs data


def test_scores_and_floor_are_means_and_ranges_over_the_samples():
  refs = evaluate.references(_toy(), 300, 3)
  x = refs[0] + 0.3  # a shifted model
  mean, span = evaluate.scores(x, refs)
  each = [metrics.sliced_w2(x, r) for r in refs]
  assert mean["sliced_w2"] == pytest.approx(np.mean(each))
  assert span["sliced_w2"] == pytest.approx([min(each), max(each)])
  assert set(mean) == {"sliced_w2", "energy", "mmd"}
  fmean, fspan = evaluate.floor(refs)
  pairs = [metrics.sliced_w2(a, b) for a, b in itertools.combinations(refs, 2)]
  assert fmean["sliced_w2"] == pytest.approx(np.mean(pairs))
  assert fspan["sliced_w2"] == pytest.approx([min(pairs), max(pairs)])
  assert mean["sliced_w2"] > fspan["sliced_w2"][1]  # the shift is far above the floor
  with pytest.raises(ValueError, match="two reference samples"):
    evaluate.floor(refs[:1])


def test_fid_is_computed_once_per_sample_set():
  """FID uses the dataset's statistics, not the reference draw: one call per scored sample
  set, and one per reference sample for the floor."""
  refs = evaluate.references(_toy(), 200, 3)
  calls = []
  fid = lambda s: calls.append(len(s)) or float(np.abs(s).mean())
  mean, span = evaluate.scores(refs[0] * 2, refs, fid=fid)
  assert len(calls) == 1 and mean["fid"] == span["fid"][0] == span["fid"][1]
  fmean, _ = evaluate.floor(refs, fid=fid)
  assert len(calls) == 4
  assert fmean["fid"] == pytest.approx(np.mean([np.abs(r).mean() for r in refs]))


def test_draws_average_whole_sample_sets_and_report_their_spread():
  """``scores_over_draws``: the mean over draws of each draw's mean over the references, the
  range over every draw and reference, the std over draws; one draw is ``scores`` itself."""
  refs = evaluate.references(_toy(), 300, 3)
  rng = np.random.default_rng(1)
  sets = [refs[0] + 0.2 + 0.1 * rng.standard_normal(refs[0].shape).astype(np.float32)
          for _ in range(4)]
  mean, span, per_draw, first = evaluate.scores_over_draws(lambda d: sets[d], 4, refs)
  std = evaluate.draw_std(per_draw)
  per = [[metrics.sliced_w2(s, r) for r in refs] for s in sets]
  draw_means = [np.mean(p) for p in per]
  assert mean["sliced_w2"] == pytest.approx(np.mean(draw_means))
  assert span["sliced_w2"] == pytest.approx([np.min(per), np.max(per)])
  assert per_draw["sliced_w2"] == pytest.approx(draw_means)
  assert std["sliced_w2"] == pytest.approx(np.std(draw_means, ddof=1))
  assert std["sliced_w2"] > 0 and first is sets[0]
  one = evaluate.scores_over_draws(lambda d: sets[d], 1, refs)
  assert one[:2] == evaluate.scores(sets[0], refs) and one[2] == {}
  with pytest.raises(ValueError, match="draws"):
    evaluate.scores_over_draws(lambda d: sets[d], 0, refs)


def test_draw_keys_start_at_the_one_draw_key():
  import jax
  assert np.array_equal(evaluate.draw_key(0, 0), jax.random.PRNGKey(0))
  assert np.array_equal(evaluate.draw_key(3, 2), jax.random.PRNGKey(5))


class _CountingClassifier:
  """Features = the samples themselves; counts the feature passes."""
  num_classes = 2

  def __init__(self):
    self.calls = 0

  def features(self, x):
    self.calls += 1
    return np.asarray(x, np.float64).reshape(len(x), -1)

  def predict(self, x):
    return (np.asarray(x).reshape(len(x), -1)[:, 0] > 0).astype(int)


def test_a_memo_computes_the_reference_terms_once_and_changes_no_figure():
  refs = evaluate.references(_toy(), 300, 2)
  images = [r.reshape(300, 1, 1, 2) for r in refs]  # 'images': the classifier path
  x, y = images[0] + 0.3, images[0] - 0.2
  clf = _CountingClassifier()
  plain = [evaluate.quality(s, images[1], clf) for s in (x, y)]
  assert clf.calls == 4  # sample and reference features, each call
  clf.calls, memo = 0, {}
  memoed = [evaluate.quality(s, images[1], clf, memo=memo) for s in (x, y)]
  assert memoed == plain and clf.calls == 3  # the reference's features once
  assert evaluate.quality(x, images[0], clf, memo=memo) != plain[0]  # keyed by content
  vec = [evaluate.scores(s, refs, memo={}) for s in (refs[0] + 0.3, refs[1])]
  assert vec == [evaluate.scores(s, refs) for s in (refs[0] + 0.3, refs[1])]
