"""benchmarks/metric_noise.py: its floor, key-0 teacher figure and ``--draws`` figures are the
ones a report with ``eval.draws`` gives for the same run (same keys, references, std)."""
import os
import re
import sys

import pytest

from conftest import ROOT
from fmdistill import config as config_lib, train
from fmdistill.eval import report

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import metric_noise  # noqa: E402  (benchmarks/metric_noise.py)


def test_draws_match_a_report_over_the_same_draws(tmp_path):
  c = config_lib.base("flow_matching")
  c.train.update(steps=2, batch_size=32, log_every=1, ckpt_every=2)
  c.eval.update(num_samples=300, teacher_nfe=(4,), references=2, draws=3)
  wd = str(tmp_path / "run")
  train.train_and_evaluate(c, wd, progress=False)
  res = report.evaluate_runs({"run": wd}, str(tmp_path / "rep"))
  r = res["runs"]["run"]
  (line,) = metric_noise.rows(wd, [300], refs=2, nfe=4, draws=3)
  # | toy | n | floor (min-max) | teacher key 0 (min-max) | ratio | mean ± std (min-max) | ratio |
  num = [float(v) for v in re.findall(r"\d+\.\d+", line.split("|", 3)[3])]
  floor, key0, mean, std = num[0], num[3], num[7], num[8]
  assert floor == pytest.approx(res["noise_floor"]["sliced_w2"], abs=5e-5)
  assert key0 == pytest.approx(r["draw_values"][4]["sliced_w2"][0], abs=5e-5)
  assert mean == pytest.approx(r["nfe"][4]["sliced_w2"], abs=5e-5)
  assert std == pytest.approx(r["draw_std"][4]["sliced_w2"], abs=5e-5)
  assert std > 1e-3  # three different draws: a spread that tells ddof 1 from ddof 0
