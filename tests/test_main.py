"""The command line: overrides reach the loop, bad fields fail clearly, the quickstart runs;
sampling, --list, --show_config and TensorBoard files on the command-line batch of
``test_reliability`` (one process for every case)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from fmdistill import checkpoint, runs, tblog
from tests.test_reliability import _lines, cli  # noqa: F401  (cli: the batch's fixture)

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
  assert m["references"] == 4  # figures are means over four held-out samples
  lo, hi = m["noise_floor_range"]["sliced_w2"]
  assert 0 < lo <= m["noise_floor"]["sliced_w2"] <= hi
  lo, hi = m["runs"]["student"]["range"]["1"]["sliced_w2"]
  assert lo <= m["runs"]["student"]["nfe"]["1"]["sliced_w2"] <= hi
  md = open(os.path.join(wd, "report.md")).read()
  assert "data vs data (floor)" in md and "mean over the 6 pairs" in md
  for stage, nfe in (("teacher", 64), ("student", 1)):  # per stage: training and the report
    events = tblog.read_events(os.path.join(wd, stage, "tensorboard"))
    tags = tblog.tags(events)
    assert {"loss", "grad_norm", f"report/sliced_w2_nfe{nfe}", "report/samples"} <= set(tags)
    assert tags["report/samples"] == [m["runs"][stage]["step"]]


# ------------------------------------------------------------------ on the cli batch

def test_sample_writes_a_grid_per_nfe_and_one_npz_at_the_chosen_step(cli):
  results, t = cli
  r = results["sample"]
  assert r["rc"] == 0, r["stderr"][-3000:]
  base = t / "good" / "samples_run_step5"
  assert f"to {base}_nfe1-64.npz" in r["stdout"]
  with np.load(f"{base}_nfe1-64.npz") as z:
    assert sorted(z.files) == ["nfe1", "nfe64"] and z["nfe64"].shape == (1000, 2)
  for nfe in (1, 64):
    assert open(f"{base}_nfe{nfe}.png", "rb").read(4) == b"\x89PNG"
  info = json.loads(open(f"{base}_nfe1-64.json").read())
  assert (info["step"], info["steps"], info["finished"], info["nfe"]) == (5, 8, False, [1, 64])
  assert "unfinished" in _lines(r["stderr"])[0]


def test_sample_and_eval_match_the_train_time_evaluation(cli):
  """Same checkpoint, same seeds: the sliced W2 logged during training at step 5, the report of
  --mode=eval and the samples of --mode=sample are the same numbers."""
  from fmdistill import config as config_lib, data
  from fmdistill.eval import evaluate, metrics
  results, t = cli
  assert results["eval at the trained step"]["rc"] == 0
  logged = [json.loads(l) for l in open(t / "good" / "metrics.jsonl")]
  at_train = [l["eval/sliced_w2_nfe64"] for l in logged if "eval/sliced_w2_nfe64" in l]
  report = json.loads((t / "good" / "metrics_at_5.json").read_text())["runs"]["run"]
  assert report["step"] == 5 and len(at_train) == 1
  source = data.make_source(config_lib.base("flow_matching").data, 0)
  with np.load(t / "good" / "samples_run_step5_nfe1-64.npz") as z:
    sampled = np.mean([metrics.sliced_w2(z["nfe64"], r)  # the mean over the four references
                       for r in evaluate.references(source, 1000, 4)])
  np.testing.assert_allclose([report["nfe"]["64"]["sliced_w2"], sampled], at_train[0],
                             rtol=1e-6)


def test_list_and_show_config_need_no_workdir(cli):
  from fmdistill import objectives
  results, _ = cli
  listed, shown = results["list"], results["show_config"]
  assert listed["rc"] == 0 and shown["rc"] == 0, (listed["stderr"], shown["stderr"])
  lines = _lines(listed["stdout"])
  assert [l.split()[0] for l in lines] == objectives.names()
  assert "MeanFlow from scratch" in next(l for l in lines if l.startswith("meanflow "))
  fields = dict(l.split(" = ", 1) for l in _lines(shown["stdout"]))
  assert fields["method"] == "'meanflow'" and fields["train.lr"] == "0.5"
  assert fields["eval.student_nfe"] == "(1, 2, 4)" and fields["train.tensorboard"] == "True"
  assert len(fields) > 60 and not shown["stderr"].strip()


def test_tensorboard_holds_every_logged_scalar_and_the_evaluation_image(cli):
  from fmdistill import tblog
  results, t = cli
  events = tblog.read_events(str(t / "good" / "tensorboard"))
  tags = tblog.tags(events)
  logged = [json.loads(l) for l in open(t / "good" / "metrics.jsonl")]
  names = {k for line in logged for k in line if k not in ("step", "nonfinite")}
  assert names <= set(tags), names - set(tags)
  assert {"loss", "grad_norm", "health/dead_frac", "eval/sliced_w2_nfe64"} <= names
  assert tags["eval/samples_nfe64"] == [5]
  image = next(v.image for _, e in events for v in e.summary.value if v.HasField("image"))
  assert image.encoded_image_string.startswith(b"\x89PNG") and image.width > 100
  loss = {e.step: v.simple_value for _, e in events for v in e.summary.value if v.tag == "loss"}
  assert loss == {l["step"]: np.float32(l["loss"]) for l in logged}


def test_a_tensorboard_failure_is_one_warning_and_keeps_the_checkpoints(cli):
  results, t = cli
  r = results["train noisy"]
  lines = _lines(r["stderr"])
  assert r["rc"] == 0 and len(lines) == 1, r["stderr"][-3000:]
  assert lines[0].startswith("warning: TensorBoard logging stopped, could not write to "
                             f"{t}/noisy/tensorboard")
  assert "5" in json.loads((t / "noisy.ckpts").read_text())
  assert (t / "noisy" / "metrics.jsonl").stat().st_size > 0
