"""The image report path: a tiny DiT run on digits gets FD on a self-trained classifier."""
import json
import os

import numpy as np
import pytest

from fmdistill import config as config_lib, train
from fmdistill.eval import report


def test_image_report_has_frechet_distance_and_floor(tmp_path):
  c = config_lib.base("flow_matching")
  c.data.update(name="digits", conditional=True)
  c.model.update(name="dit", width=16, depth=1, heads=2, patch=2)
  c.train.update(steps=4, batch_size=16, log_every=2, ckpt_every=4)
  c.eval.update(num_samples=200, teacher_nfe=(1, 2), classifier_steps=60)
  wd = str(tmp_path / "run")
  train.train_and_evaluate(c, wd, progress=False)
  result = report.evaluate_runs({"run": wd}, str(tmp_path))
  assert {"fd", "sliced_w2"} <= set(result["noise_floor"])
  assert result["classifier_accuracy"] > 0.5  # the features separate the digits
  q = result["runs"]["run"]["nfe"][1]
  assert q["fd"] > result["noise_floor"]["fd"]  # a 4-step model is far from the data
  assert os.path.exists(tmp_path / "classifier.npz")  # cached for the next evaluation
  assert os.path.exists(tmp_path / "samples_run.png")
  assert result["runs"]["run"]["straightness"] > 0  # an ODE model: S(Z) of its flow
  md = report.markdown(json.loads(json.dumps(result)), "t")
  assert "| fd |" in md or " fd " in md
  assert "| run | S(Z) |" in md


def test_a_k_draw_figure_is_the_mean_of_k_one_draw_figures(tmp_path):
  """``eval.draws = 3`` with seed 0 averages exactly the one-draw reports of seeds 0, 1 and 2
  (draw ``d`` samples with key ``seed + d``, against the same references)."""
  c = config_lib.base("flow_matching")
  c.train.update(steps=2, batch_size=32, log_every=1, ckpt_every=2)
  c.eval.update(num_samples=300, teacher_nfe=(1, 4), references=2)
  wd = str(tmp_path / "run")
  train.train_and_evaluate(c, wd, progress=False)
  one = [report.evaluate_runs({"run": wd}, str(tmp_path / f"s{s}"), seed=s)["runs"]["run"]
         for s in range(3)]
  e = c.eval.copy_and_resolve_references()
  e.draws = 3
  res = report.evaluate_runs({"run": wd}, str(tmp_path / "k"), evals={"run": e})
  r = res["runs"]["run"]
  assert r["draws"] == 3 and "draw_std" not in one[0]
  for nfe in (1, 4):
    each = [o["nfe"][nfe]["sliced_w2"] for o in one]
    assert r["nfe"][nfe]["sliced_w2"] == pytest.approx(np.mean(each), rel=1e-5)
    assert r["draw_std"][nfe]["sliced_w2"] == pytest.approx(np.std(each, ddof=1), rel=1e-4)
    assert r["draw_values"][nfe]["sliced_w2"] == pytest.approx(each, rel=1e-5)
    assert r["range"][nfe]["sliced_w2"][0] <= min(each)
  md = report.markdown(json.loads(json.dumps(res)), "t")
  assert "mean over 3 sample draws" in md and " ± " in md
  assert " ± " not in report.markdown(json.loads(json.dumps({**res, "runs": {"run": one[0]}})),
                                      "t")
