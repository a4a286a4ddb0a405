"""benchmarks/leaderboard.py: the speedup matching and seed arithmetic on hand-made numbers, the
outputs it writes, the plan of a dry run; end to end on tiny runs (slow): tables, CSVs and PNG
written, a rerun resumes, ``--seeds 2`` gives std columns, the CSV holds the report's numbers."""
import csv
import math
import os
import sys

import pytest

from conftest import ROOT
from fmdistill.eval import leaderboard as lb

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import leaderboard  # noqa: E402  (benchmarks/leaderboard.py)


def test_matched_nfe_is_the_smallest_teacher_nfe_at_least_as_good():
  teacher = {1: 1.0, 2: 0.5, 4: 0.2, 8: 0.1, 64: 0.09}
  assert lb.matched_nfe(teacher, 0.2) == 4  # equal counts as matched
  assert lb.matched_nfe(teacher, 0.15) == 8
  assert lb.matched_nfe(teacher, 5.0) == 1
  assert lb.matched_nfe(teacher, 0.05) is None  # better than the teacher anywhere: not matched
  assert lb.matched_nfe(teacher, float("nan")) is None
  assert lb.matched_nfe({1: 1.0, 2: float("nan"), 4: 0.3}, 0.4) == 4  # a NaN NFE never matches
  # non-monotone teacher curve: the smallest NFE that reaches it, not the first crossing
  assert lb.matched_nfe({1: 1.0, 2: 0.3, 4: 0.35, 8: 0.2}, 0.32) == 2
  n, x = lb.speedup(teacher, 0.15, 0.002, {8: 0.016, 1: 0.002})
  assert (n, x) == (8, 8.0)
  assert lb.speedup(teacher, 0.05, 0.002, {8: 0.016}) == (None, None)


def _evals(seeds=2):
  """Hand-made ``evals``: teacher at 1..64 NFE, one student, per-seed figures."""
  out = {}
  for k in range(seeds):
    t = {n: {"sliced_w2": 1.0 / n + 0.01 * k} for n in (1, 2, 4, 8, 16, 32, 64)}
    s = {1: {"sliced_w2": 0.2 + 0.02 * k}, 2: {"sliced_w2": 0.001 + 0.002 * k},
         4: {"sliced_w2": 0.3}}
    out[k] = {"floor": {"sliced_w2": 0.01},
              "runs": {"teacher": {"method": "flow_matching", "step": 5, "steps": 5, "nfe": t},
                       "st": {"method": "meanflow", "step": 5, "steps": 5, "nfe": s}}}
  return out


def test_seed_means_stds_and_ratios_to_the_teacher_of_the_same_seed():
  rows = lb.student_rows(_evals(), "sliced_w2")
  q1, ratio1 = rows[0]["q"][1], rows[0]["ratio"][1]
  assert q1[0] == pytest.approx(0.21) and q1[1] == pytest.approx(math.sqrt(2) * 0.01)
  r = [0.2 / (1 / 64), 0.22 / (1 / 64 + 0.01)]
  assert ratio1[0] == pytest.approx(sum(r) / 2)
  assert math.isnan(lb.student_rows(_evals(1), "sliced_w2")[0]["q"][1][1])  # one seed: no std


def test_a_row_that_samples_through_its_teacher_is_marked_and_plotted_at_its_evaluations(
    tmp_path, monkeypatch):
  """A second-order FMM row's "NFE" counts jumps of two network evaluations each: the quality
  and speedup tables mark it and say so, the CSV carries the count, the plot places it at
  ``2 x NFE``; an ordinary row is not marked and no footnote appears without such a row."""
  ev = _evals(1)
  plain = lb.student_rows(ev, "sliced_w2")
  assert "‡" not in "\n".join(lb.quality_table(plain, "sliced_w2"))
  ev[0]["runs"]["st"]["evals_per_jump"] = 2
  rows = lb.student_rows(ev, "sliced_w2")
  table = lb.quality_table(rows, "sliced_w2")
  assert table[2].startswith("| st ‡ |")
  assert any("each step (\"NFE\" here) is 2 network evaluations" in line for line in table)
  spd = lb.speedups(rows, lb.teacher_curve(ev, "sliced_w2"),
                    {("st", 1): {"run_s": 0.001, "compile_s": 1.0},
                     ("teacher", 4): {"run_s": 0.004, "compile_s": 1.0}})
  assert lb.speedup_table(spd)[2].startswith("| st ‡ | 1 |")
  assert lb.csv_rows(rows, {}, spd)[0]["evals_per_nfe"] == 2
  seen = {}

  class Axes:
    def __getattr__(self, name):
      return lambda *a, **k: None

    def errorbar(self, x, y, **k):
      seen[k["label"]] = list(x)

  class Fig:
    def __getattr__(self, name):
      return lambda *a, **k: None

  from fmdistill.eval import plots
  monkeypatch.setattr(plots.plt, "subplots", lambda *a, **k: (Fig(), Axes()))
  lb.plot(ev, rows, "sliced_w2", str(tmp_path / "q.png"))
  assert seen == {"st (2 evals per step)": [2, 4, 8]}


def test_a_reused_run_reports_only_the_nfes_the_boards_config_evaluates(tmp_path, monkeypatch):
  # a one-step generator's run stored (and cached) at 1/2/4 NFE: the board's config asks for 1
  import ml_collections
  from fmdistill import runs as runs_lib
  monkeypatch.setattr(runs_lib, "latest_step", lambda wd: 1500)
  monkeypatch.setattr(runs_lib, "read_config", lambda wd: ml_collections.ConfigDict(
      {"method": "dmd", "eval": {"references": 4, "student_nfe": (1, 2, 4)}}))
  cache = leaderboard.Cache(str(tmp_path))
  q = lambda v: {"swd": v}  # noqa: E731
  for name in ("teacher", "dmd"):
    key = f"eval/0/{name}" + ("/nfe(1, 64)" if name == "teacher" else "") + "/refs4"
    cache.put(key, 1500, {"floor": {"swd": 0.05}, "floor_range": {}, "references": 4,
                          "run": {"nfe": {"1": q(0.1), "2": q(0.9), "4": q(1.2)}}})
  evals = leaderboard.evaluate_all({"teacher": {0: "t"}, "dmd": {0: "d"}}, 1, (1, 64),
                                   str(tmp_path), cache, {"dmd": (1,)})
  assert set(evals[0]["runs"]["dmd"]["nfe"]) == {1}
  assert set(evals[0]["runs"]["teacher"]["nfe"]) == {1, 2, 4}  # the teacher: not filtered
  # and an NFE the cache lacks is evaluated, at the board's NFEs, not silently dropped
  from fmdistill.eval import report
  asked = []

  def fake_evaluate_runs(wds, sdir, seed, evals):
    (label, ecfg), = evals.items()
    asked.append(tuple(ecfg.student_nfe))
    for f in ("metrics.json", "quality_vs_nfe.png"):
      open(os.path.join(sdir, f), "w").close()
    return {"noise_floor": {"swd": 0.05}, "noise_floor_range": {}, "references": 4,
            "runs": {label: {"nfe": {str(n): q(0.1) for n in ecfg.student_nfe}}}}
  monkeypatch.setattr(report, "evaluate_runs", fake_evaluate_runs)
  evals = leaderboard.evaluate_all({"teacher": {0: "t"}, "dmd": {0: "d"}}, 1, (1, 64),
                                   str(tmp_path), cache, {"dmd": (1, 8)})
  assert asked == [(1, 8)] and set(evals[0]["runs"]["dmd"]["nfe"]) == {1, 8}


def test_draws_reach_the_evaluation_are_cached_apart_and_reach_the_outputs(tmp_path,
                                                                           monkeypatch):
  import ml_collections
  from fmdistill import runs as runs_lib
  from fmdistill.eval import report
  stored = ml_collections.ConfigDict({"method": "meanflow",
                                      "eval": {"references": 4, "student_nfe": (1,),
                                               "teacher_nfe": (1,)}})
  stored.lock()  # as read back from a run written before eval.draws existed
  monkeypatch.setattr(runs_lib, "latest_step", lambda wd: 7)
  monkeypatch.setattr(runs_lib, "read_config", lambda wd: stored)
  cache = leaderboard.Cache(str(tmp_path))
  q = lambda v: {"sliced_w2": v}  # noqa: E731
  for name in ("teacher", "st"):  # one-draw figures already cached: not what --draws 3 asks
    key = f"eval/0/{name}" + ("/nfe(1, 64)" if name == "teacher" else "") + "/refs4"
    cache.put(key, 7, {"floor": q(0.05), "floor_range": {}, "references": 4,
                       "run": {"method": "m", "step": 7, "nfe": {"1": q(9.0), "64": q(9.0)}}})
  asked = []

  def fake_evaluate_runs(wds, sdir, seed, evals):
    (label, ecfg), = evals.items()
    asked.append((label, ecfg.draws))
    for f in ("metrics.json", "quality_vs_nfe.png"):
      open(os.path.join(sdir, f), "w").close()
    nfe = (1, 64) if label == "teacher" else (1,)
    return {"noise_floor": q(0.05), "noise_floor_range": {}, "references": 4,
            "runs": {label: {"method": "flow_matching" if label == "teacher" else "meanflow",
                             "step": 7, "steps": 7, "draws": ecfg.draws,
                             "nfe": {str(n): q(0.1 * n) for n in nfe},
                             "draw_std": {str(n): q(0.01) for n in nfe}}}}
  monkeypatch.setattr(report, "evaluate_runs", fake_evaluate_runs)
  args = ({"teacher": {0: "t"}, "st": {0: "s"}}, 1, (1, 64), str(tmp_path), cache,
          {"st": (1,)})
  evals = leaderboard.evaluate_all(*args, draws=3)
  assert asked == [("teacher", 3), ("st", 3)] and evals[0]["draws"] == 3
  assert evals[0]["runs"]["st"]["nfe"][1] == q(0.1)  # not the cached one-draw 9.0
  assert evals[0]["runs"]["st"]["draw_std"][1] == q(0.01)
  assert leaderboard.evaluate_all(*args, draws=3)[0]["runs"]["st"]["nfe"][1] == q(0.1)
  assert len(asked) == 2  # the three-draw figures are cached in their turn
  assert leaderboard.evaluate_all(*args)[0]["runs"]["st"]["nfe"][1] == q(9.0)
  text = leaderboard.write(str(tmp_path), ["machine: m"], evals, {}, {})
  assert "mean over 4 held-out samples, and over 3 sample draws of each model" in text
  with open(tmp_path / "quality.csv") as f:
    st = [r for r in csv.DictReader(f) if r["run"] == "st"]
  assert st[0]["draws"] == "3" and float(st[0]["draw_std"]) == 0.01


def test_write_outputs_tables_csvs_and_plot(tmp_path):
  evals = _evals()
  costs = {"teacher": dict(step_s=1e-3, flops=1e6, temp_bytes=2 ** 20, compile_s=1.0,
                           loops=False),
           "st": dict(step_s=3e-3, flops=2e6, temp_bytes=2 ** 21, compile_s=2.0, loops=True)}
  times = {("st", 1): dict(run_s=1e-3, compile_s=0.5), ("st", 2): dict(run_s=2e-3, compile_s=0.5),
           ("teacher", 8): dict(run_s=8e-3, compile_s=0.7)}
  text = leaderboard.write(str(tmp_path), ["machine: m", "command: c"], evals, costs, times)
  assert "| st | meanflow | 5 | 0.21 ± 0.01414 |" in text
  assert "| st | 1 | 0.21 | 8 | 1 | 8 | 8.0x | 0.50 / 0.70 |" in text  # teacher@8: 0.13
  assert "| st | 2 | 0.002 | not matched |" in text  # better than the teacher@64 (0.0206)
  # with the teacher timed at its largest NFE, that student's speedup is a lower bound
  times[("teacher", 64)] = dict(run_s=0.1, compile_s=0.9)
  text = leaderboard.write(str(tmp_path), ["machine: m", "command: c"], evals, costs, times)
  assert ("| st | 2 | 0.002 | none: better than the teacher at every NFE up to 64 | 2 | "
          "100 (at 64) | > 50.0x | 0.50 / 0.90 |") in text
  nan_row = dict(name="bad", q={1: (float("nan"), float("nan"))})
  nan = lb.speedups([nan_row], {1: 1.0, 64: 0.1}, {("bad", 1): dict(run_s=1e-3, compile_s=0.1),
                                                   ("teacher", 64): dict(run_s=0.1,
                                                                         compile_s=0.1)})
  assert nan[0]["matched"] is None and nan[0]["speedup"] is None  # NaN: no bound, no speedup
  assert "| st | 3 | 3.00 | 2.0 | 0.002 † | 2.00 | 2 | 2.00 |" in text
  with open(tmp_path / "leaderboard.csv") as f:
    row = next(csv.DictReader(f))
  assert float(row["q_nfe1_std"]) == pytest.approx(math.sqrt(2) * 0.01)
  assert row["matched_teacher_nfe_1"] == "8" and float(row["speedup_nfe1"]) == 8.0
  assert row["speedup_nfe1_is_lower_bound"] == "False"
  assert float(row["speedup_nfe2"]) == 50.0 and row["speedup_nfe2_is_lower_bound"] == "True"
  with open(tmp_path / "quality.csv") as f:
    long = list(csv.DictReader(f))
  assert {(r["seed"], r["run"], r["nfe"]) for r in long} >= {("1", "teacher", "64"),
                                                             ("0", "st", "4")}
  assert os.path.getsize(tmp_path / "quality_vs_nfe.png") > 1000


def test_dry_run_lists_every_student_and_trains_nothing(tmp_path, capsys):
  runs = tmp_path / "runs"
  leaderboard.main(["--config", "experiments/toy2d.py", "--toy", "moons", "--dry-run",
                    "--runs", str(runs), "--out", str(tmp_path / "out"), "--seeds", "2",
                    "--methods", "meanflow,reflow,tri_consistency@split=backward"])
  out = capsys.readouterr().out
  assert "dataset: moons" in out
  assert "[1/7] train    teacher seed 0 (4000 steps)" in out
  assert "reflow seed 1 (2000, 2000, 2000 steps)" in out  # 2 rounds + the distill stage
  assert f"tri_consistency@split=backward seed 0 (4000 steps) -> {runs}" in out
  assert not runs.exists() and not (tmp_path / "out").exists()


BAD_ARGS = {
    "unknown method": (["--methods", "meanflow,no_such"], "unknown method 'no_such'"),
    "unknown objective field": (["--methods", "meanflow@no_such=1"],
                                "no objective field 'no_such'"),
    "unknown --set field": (["--set", "model.no_such=1"], "config has no field 'model.no_such'"),
    "--set under a leaf": (["--set", "train.steps.x=1"], "config has no field 'train.steps.x'"),
    "--set of the wrong type": (["--set", "train.steps=abc"], "'train.steps=abc'"),
    "bad dataset key": (["--toy", "no_such"], "config.data.toy='no_such' is invalid"),
    "missing config file": (["--config", "experiments/no_such.py"], "no_such.py"),
    "bad teacher NFEs": (["--teacher_nfe", "1,abc"], "--teacher_nfe '1,abc'"),
    "zero teacher NFE": (["--teacher_nfe", "0,4"], "--teacher_nfe '0,4'"),
    "no seeds": (["--seeds", "0"], "--seeds 0"),
    "negative budget": (["--steps", "-5"], "--steps -5"),
    "no sample draws": (["--draws", "0"], "--draws 0"),
}


@pytest.mark.parametrize("case", sorted(BAD_ARGS))
def test_a_bad_argument_is_one_line_exit_2_before_anything_runs(case, tmp_path, capsys):
  extra, message = BAD_ARGS[case]
  config = [] if extra[0] == "--config" else ["--config", "experiments/toy2d.py"]
  argv = config + ["--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "out"),
                   "--methods", "meanflow"] + extra  # argparse: the last --methods wins
  with pytest.raises(SystemExit) as e:
    leaderboard.main(argv)  # not a dry run: an error must come before any training
  assert e.value.code == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert message in err[-1] and "error" in err[-1] and "Traceback" not in "".join(err)
  assert not (tmp_path / "runs").exists() and not (tmp_path / "out").exists()


def test_an_unreadable_cache_is_moved_aside_not_lost(tmp_path, capsys):
  (tmp_path / "cache.json").write_text('{"eval/0/teacher": {"step": 5, "va')  # cut off
  cache = leaderboard.Cache(str(tmp_path))
  assert cache.data == {} and not (tmp_path / "cache.json").exists()
  aside = [p for p in os.listdir(tmp_path) if p.startswith("cache.json.unreadable-")]
  assert len(aside) == 1 and (tmp_path / aside[0]).read_text().startswith('{"eval/0/teacher"')
  assert "unreadable" in capsys.readouterr().err
  cache.put("k", 3, {"a": 1})
  assert leaderboard.Cache(str(tmp_path)).get("k", 3) == {"a": 1}


TINY = ["--config", "experiments/toy2d.py", "--toy", "checkerboard", "--steps", "5",
        "--methods", "cm_cd,direct_distill", "--teacher_nfe", "1,2,4", "--reps", "1",
        "--set", "model.width=16", "--set", "model.depth=1", "--set", "train.batch_size=32",
        "--set", "eval.num_samples=64", "--set", "teacher.pair_num=64",
        "--set", "teacher.pair_chunk=64", "--set", "train.log_every=5",
        "--set", "train.ckpt_every=5"]


@pytest.mark.slow
def test_end_to_end_resumes_gives_stds_and_the_report_numbers(tmp_path, capsys):
  from fmdistill.eval import report
  args = TINY + ["--seeds", "2", "--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "out")]
  leaderboard.main(args)
  first = capsys.readouterr().out
  out = tmp_path / "out"
  for f in ("leaderboard.md", "leaderboard.csv", "quality.csv", "quality_vs_nfe.png",
            "samples/samples_cm_cd.png", "samples/samples_teacher_seed1.png"):
    assert (out / f).exists(), f
  assert "[5/5] done     direct_distill seed 1" in first
  with open(out / "leaderboard.csv") as f:
    rows = {r["name"]: r for r in csv.DictReader(f)}
  assert set(rows) == {"cm_cd", "direct_distill"}
  assert float(rows["cm_cd"]["q_nfe1_std"]) >= 0 and rows["cm_cd"]["seeds"] == "2"
  assert float(rows["cm_cd"]["step_x_fm"]) > 0 and float(rows["cm_cd"]["temp_x_fm"]) > 0
  md = (out / "leaderboard.md").read_text()
  assert " ± " in md and "## Sampling speedup" in md
  # a rerun trains, evaluates and measures nothing
  leaderboard.main(args)
  second = capsys.readouterr().out
  assert second.count("finished ") == 5 and "done " not in second
  assert "evaluated" not in second and "measured" not in second
  # the CSV holds what the report computes for the same checkpoint and sampling seed
  wd = str(tmp_path / "runs" / "seed1" / "cm_cd")
  res = report.evaluate_runs({"cm_cd": wd}, str(tmp_path / "check"), seed=1)
  with open(out / "quality.csv") as f:
    got = {(r["nfe"], r["metric"]): float(r["value"]) for r in csv.DictReader(f)
           if r["run"] == "cm_cd" and r["seed"] == "1"}
  want = {(str(n), k): v for n, q in res["runs"]["cm_cd"]["nfe"].items() for k, v in q.items()
          if k != "seconds"}
  assert want and all(got[k] == want[k] for k in want)
