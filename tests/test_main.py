"""The command line: overrides reach the loop, bad fields fail clearly, the quickstart runs."""
import json
import os
import subprocess
import sys

import pytest

from fmdistill import checkpoint, runs, tblog

TINY = ["--config.model.width=16", "--config.model.depth=1", "--config.train.batch_size=32",
        "--config.eval.num_samples=200", "--config.eval.teacher_nfe=(1,4)", "--progress=false"]


def _run(root, *args, timeout=600):
  env = dict(os.environ, PYTHONPATH=root, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "fmdistill.main", *args], cwd=root, env=env,
                        capture_output=True, text=True, timeout=timeout)


def test_overrides_reach_the_loop(root, tmp_path):
  wd = str(tmp_path / "fm")
  r = _run(root, "--config", "experiments/toy2d.py:flow_matching", "--workdir", wd,
           "--config.train.steps=7", "--config.train.log_every=7", "--config.seed=5", *TINY)
  assert r.returncode == 0, r.stderr[-2000:]
  cfg = runs.read_config(wd)
  assert cfg.train.steps == 7 and cfg.model.width == 16 and cfg.seed == 5
  assert checkpoint.manager(wd, read_only=True).latest_step() == 7
  lines = [json.loads(l) for l in open(os.path.join(wd, "metrics.jsonl"))]
  assert lines[-1]["step"] == 7
  assert os.path.exists(os.path.join(wd, "report.md"))


@pytest.mark.parametrize("override,match", [
    ("--config.train.stepz=5", "stepz"),
    ("--config.train.steps=ten", "steps"),
    ("--config.method=meanflw", "config.method='meanflw' is invalid"),
])
def test_bad_config_is_one_clear_error(root, tmp_path, override, match):
  wd = tmp_path / "bad"
  r = _run(root, "--config", "experiments/toy2d.py:flow_matching", "--workdir", str(wd), override)
  assert r.returncode != 0
  assert match in r.stderr
  assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_quickstart_end_to_end_with_a_tiny_budget(root, tmp_path):
  """The README's first command, with step budgets cut so it runs in seconds."""
  wd = str(tmp_path / "qs")
  r = _run(root, "--config", "experiments/toy2d.py:quickstart", "--workdir", wd,
           "--config.stages.teacher.train.steps=40", "--config.stages.student.train.steps=20",
           "--config.stages.student.teacher.pair_num=256",
           "--config.stages.student.teacher.pair_chunk=128",
           "--config.stages.teacher.eval.num_samples=300", "--progress=false")
  assert r.returncode == 0, r.stderr[-3000:]
  for name in ("report.md", "metrics.json", "quality_vs_nfe.png", "samples_teacher.png",
               "samples_student.png"):
    assert os.path.exists(os.path.join(wd, name)), name
  m = json.load(open(os.path.join(wd, "metrics.json")))
  assert set(m["runs"]) == {"teacher", "student"}
  assert set(m["runs"]["teacher"]["nfe"]) == {"1", "2", "4", "8", "64"}
  assert set(m["runs"]["student"]["nfe"]) == {"1", "2", "4"}
  assert m["noise_floor"]["sliced_w2"] > 0
  assert "data vs data (floor)" in open(os.path.join(wd, "report.md")).read()
  for stage, nfe in (("teacher", 64), ("student", 1)):  # per stage: training and the report
    events = tblog.read_events(os.path.join(wd, stage, "tensorboard"))
    tags = tblog.tags(events)
    assert {"loss", "grad_norm", f"report/sliced_w2_nfe{nfe}", "report/samples"} <= set(tags)
    assert tags["report/samples"] == [m["runs"][stage]["step"]]
