"""The image report path: a tiny DiT run on digits gets FD on a self-trained classifier."""
import json
import os

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
