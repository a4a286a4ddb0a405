r"""Leaderboard: one teacher and every student method of a dataset config, on one budget.

    python benchmarks/leaderboard.py --config experiments/toy2d.py --toy checkerboard
    python benchmarks/leaderboard.py --config experiments/digits.py:data=scenes --seeds 3
    python benchmarks/leaderboard.py --config experiments/toy2d.py --methods meanflow,scm_cd \
        --steps 300 --dry-run

Trains (or reuses: ``--teacher``) the flow-matching teacher of the dataset config, then every
registered method that has a variant in that experiments file (``--methods`` to restrict;
``reflow`` and ``progressive`` are stage chains from the teacher, one row per stage), each with
the file's shipped settings (``--steps`` overrides every budget, ``--set field=value`` any
field), distilling the teacher and starting from its weights where it distils
(``benchmarks/_board.py``). Runs live in ``--runs`` (default ``runs/leaderboard/<dataset>``);
finished runs, evaluations and measurements are skipped on a rerun, so a killed invocation
resumes. ``--seeds N`` trains each student with seeds 0..N-1 (one teacher, seed 0, sampled
with seed k) and reports mean ± std.

Writes ``--out`` (default ``results/<dataset>``): ``leaderboard.md`` (the tables),
``leaderboard.csv`` (one row per student), ``quality.csv`` (every figure of every run, seed
and NFE, as ``fmdistill.eval.report.evaluate_runs`` returned it), ``quality_vs_nfe.png`` and
sample figures under ``samples/``. Measured: quality at 1/2/4 NFE (teacher: ``--teacher_nfe``,
Euler) beside the data-vs-data floor and as a ratio to the teacher at 64 NFE; one train step's
wall time, compile time, compiled FLOPs and temporary memory relative to the teacher's flow
matching step (seed-0 runs); the sampling speedup of 1- and 2-NFE students over the teacher at
the smallest NFE whose figure is at least as good, both compiled and warm (median of
``--reps``; compile time apart); a student better than the teacher at every NFE gets a lower
bound, the teacher timed at its largest NFE (``--teacher_nfe``).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))


def parse(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--config", required=True,
                 help="experiments/<file>.py[:key=value,...] (keys of its config string)")
  p.add_argument("--toy", default="", help="shorthand for the config-string key toy=")
  p.add_argument("--data", default="", help="shorthand for the config-string key data=")
  p.add_argument("--methods", default="", help="comma-separated (method@field=value allowed); "
                 "default: every registered student method")
  p.add_argument("--seeds", type=int, default=1)
  p.add_argument("--steps", type=int, default=0, help="every run's budget (0: the file's)")
  p.add_argument("--teacher_steps", type=int, default=-1, help="the teacher's (default --steps)")
  p.add_argument("--teacher", default="", help="a flow-matching run to reuse (trained or "
                 "resumed there first if it is not finished)")
  p.add_argument("--teacher_nfe", default=",".join(map(str, (1, 2, 4, 8, 16, 32, 64))),
                 help="comma-separated positive step counts of the teacher's Euler curve")
  p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                 help="override a config field of every run (e.g. model.width=64)")
  p.add_argument("--runs", default="")
  p.add_argument("--out", default="")
  p.add_argument("--reps", type=int, default=5, help="timed repeats (median)")
  p.add_argument("--draws", type=int, default=1, help="sample draws of each model a figure "
                 "is averaged over (eval.draws; the std over draws goes into quality.csv)")
  p.add_argument("--dry-run", action="store_true", help="list what would run, run nothing")
  args = p.parse_args(argv)
  raw = args.teacher_nfe
  try:
    args.teacher_nfe = tuple(int(n) for n in raw.split(","))
  except ValueError:
    args.teacher_nfe = ()
  for bad, why in ((not args.teacher_nfe or min(args.teacher_nfe) < 1,
                    f"--teacher_nfe {raw!r}: comma-separated positive integers"),
                   (args.seeds < 1, f"--seeds {args.seeds}: at least 1"),
                   (args.steps < 0, f"--steps {args.steps}: 0 (the file's budgets) or more"),
                   (args.teacher_steps < -1,
                    f"--teacher_steps {args.teacher_steps}: -1 (--steps), 0 or more"),
                   (args.reps < 1, f"--reps {args.reps}: at least 1"),
                   (args.draws < 1, f"--draws {args.draws}: at least 1")):
    if bad:
      p.error(why)  # one usage line, exit 2, before anything trains
  return args


def plan(args):
  """``(teacher job, student jobs, skipped {spec: reason}, dataset, runs dir, out dir)``."""
  import _board
  from fmdistill.errors import ConfigError
  path, _, keys = args.config.partition(":")
  keys = [k for k in keys.split(",") if k] + ([f"toy={args.toy}"] if args.toy else []) + (
      [f"data={args.data}"] if args.data else [])
  exp = _board.load_experiment(path)
  tsteps = args.steps if args.teacher_steps < 0 else args.teacher_steps
  probe = _board.teacher_job(exp, keys, "", tsteps, args.set)
  dataset = _board.dataset_name(probe.config)
  runs = os.path.abspath(args.runs or os.path.join("runs", "leaderboard", dataset))
  teacher = _board.teacher_job(exp, keys, os.path.abspath(args.teacher or
                                                          os.path.join(runs, "teacher")),
                               tsteps, args.set)
  jobs, skipped = [], {}
  for spec in (args.methods.split(",") if args.methods else _board.students()):
    for seed in range(args.seeds):
      try:
        jobs.append(_board.student_job(exp, spec, keys, seed, args.steps, teacher.workdir,
                                       os.path.join(runs, f"seed{seed}", spec), args.set))
      except ConfigError as e:
        if args.methods:  # asked for by name: not a row to drop silently
          raise ConfigError(f"--methods {spec}: {e}") from None
        skipped[spec] = str(e)
  return teacher, jobs, skipped, dataset, runs, os.path.abspath(args.out or
                                                                 os.path.join("results", dataset))


class Cache:
  """``<out>/cache.json``: evaluations and measurements keyed by run and checkpoint step."""

  def __init__(self, out: str):
    self.path = os.path.join(out, "cache.json")
    self.data = {}
    if os.path.exists(self.path):
      try:
        with open(self.path) as f:
          self.data = json.load(f)
        if not isinstance(self.data, dict):
          raise ValueError(f"a JSON {type(self.data).__name__}, not an object")
      except ValueError as e:  # a half-written or edited file: keep it aside, evaluate afresh
        aside = f"{self.path}.unreadable-{int(time.time())}"
        os.replace(self.path, aside)
        self.data = {}
        print(f"warning: {self.path} is unreadable ({' '.join(str(e).split())[:120]}); moved "
              f"to {aside}, the runs are evaluated again", file=sys.stderr, flush=True)

  def get(self, key: str, step: int):
    v = self.data.get(key)
    return v["value"] if v is not None and v["step"] == step else None

  def put(self, key: str, step: int, value) -> None:
    self.data[key] = {"step": step, "value": value}
    with open(self.path + ".tmp", "w") as f:
      json.dump(self.data, f)
    os.replace(self.path + ".tmp", self.path)


def _int_keys(r: dict) -> dict:
  """A cached run's evaluation with its NFE keys back as integers (JSON made them strings)."""
  return dict(r, nfe={int(k): v for k, v in r["nfe"].items()},
              **{f: {int(k): v for k, v in r.get(f, {}).items()}
                 for f in ("draw_std", "draw_values")})


def evaluate_all(runs: dict, seeds: int, teacher_nfe: tuple, out: str, cache: Cache,
                 student_nfe: dict | None = None, draws: int = 1) -> dict:
  """``evals[seed]`` (``fmdistill.eval.leaderboard``) from ``evaluate_runs``, one run at a time
  (cached: a rerun evaluates only new checkpoints).

  ``student_nfe[name]``: the NFEs this board's config evaluates that run at. A reused run (one
  trained by an earlier board or script with the same settings) may have stored a longer list,
  e.g. 1/2/4 for a one-step DMD generator before its config kept only the step counts it was
  trained on; only the board's own NFEs are evaluated and reported. ``draws``: sample draws
  of each model every figure is averaged over (``eval.draws``; cached apart from other counts)."""
  from fmdistill import objectives, runs as runs_lib
  from fmdistill.eval import report
  sdir = os.path.join(out, "samples")
  os.makedirs(sdir, exist_ok=True)
  evals = {}
  for seed in range(seeds):
    e = evals.setdefault(seed, {"floor": None, "runs": {}})
    for name, by_seed in runs.items():
      wd = by_seed.get(seed, by_seed.get(0))
      step = runs_lib.latest_step(wd)
      rcfg = runs_lib.read_config(wd)
      ecfg = rcfg.eval
      nref = int(ecfg.get("references", 4))  # figures averaged over nref references
      key = (f"eval/{seed}/{name}" + (f"/nfe{teacher_nfe}" if name == "teacher" else "")
             + f"/refs{nref}" + (f"/draws{draws}" if draws > 1 else ""))
      label = name if seed == 0 else f"{name}_seed{seed}"
      want = (student_nfe or {}).get(name)  # None: the run's stored NFEs (the teacher)
      got = cache.get(key, step)
      if got is not None and want and not set(want) <= set(_int_keys(got["run"])["nfe"]):
        got = None  # the board asks for an NFE the cached evaluation lacks
      if got is None:
        t0 = time.time()
        with ecfg.unlocked():  # a run written before eval.draws existed lacks the field
          ecfg.draws = draws
        if name == "teacher":
          ecfg.teacher_nfe = teacher_nfe
        if want:
          ecfg.student_nfe = tuple(want)
        res = report.evaluate_runs({label: wd}, sdir, seed=seed, evals={label: ecfg})
        for f in ("metrics.json", "quality_vs_nfe.png"):  # one run's: the board draws its own
          os.remove(os.path.join(sdir, f))
        got = {"floor": res["noise_floor"], "floor_range": res["noise_floor_range"],
               "references": res["references"], "draws": draws, "run": res["runs"][label]}
        cache.put(key, step, json.loads(json.dumps(got)))
        print(f"  evaluated {name} (seed {seed}) in {time.time() - t0:.0f} s", flush=True)
      e["floor"] = e["floor"] or got["floor"]
      e.setdefault("floor_range", got.get("floor_range", {}))
      e.setdefault("references", got.get("references", 1))
      e.setdefault("draws", got.get("draws", 1))
      r = _int_keys(got["run"])
      r["evals_per_jump"] = objectives.evals_per_jump(rcfg)  # a cached figure may predate it
      if want:  # a cache written before the board set the NFEs may hold more
        r["nfe"] = {n: v for n, v in r["nfe"].items() if n in want}
      e["runs"][name] = r
  return evals


def measure(runs: dict, rows: list, evals: dict, metric: str, reps: int, cache: Cache):
  """``(costs, times)``: seed-0 train steps, and samplers of 1/2-NFE students and of the
  teacher at their matched NFEs, or at its largest NFE for a student better than it at every
  NFE (the speedup's lower bound; cached)."""
  import _board
  from fmdistill import runs as runs_lib
  from fmdistill.eval import leaderboard as lb

  def cached(key, wd, fn):
    step = runs_lib.latest_step(wd)
    got = cache.get(key, step)
    if got is None:
      t0 = time.time()
      got = fn()
      cache.put(key, step, got)
      print(f"  measured {key} in {time.time() - t0:.0f} s", flush=True)
    return got
  costs = {n: cached(f"cost/{n}", by[0], lambda wd=by[0]: _board.step_cost(wd, reps))
           for n, by in runs.items() if 0 in by}
  tcurve = lb.teacher_curve(evals, metric)
  times, want = {}, set()
  for r in rows:
    for nfe in (1, 2):
      if nfe in r["q"] and 0 in runs[r["name"]]:
        want.add((r["name"], nfe))
        m = lb.matched_nfe(tcurve, r["q"][nfe][0])
        if m is None and tcurve and math.isfinite(r["q"][nfe][0]):  # better everywhere: the
          # lower bound at the teacher's largest NFE
          m = max(tcurve)
        if m is not None:
          want.add(("teacher", m))
  for name, nfe in sorted(want):
    wd = runs[name][0]
    times[(name, nfe)] = cached(f"time/{name}@{nfe}/{reps}", wd,
                                lambda wd=wd, nfe=nfe: _board.sample_time(wd, nfe, reps))
  return costs, times


def write(out: str, header: list[str], evals: dict, costs: dict, times: dict) -> str:
  from fmdistill.eval import leaderboard as lb
  floor = evals[0]["floor"]
  metric = lb.metric_of(floor)
  rows = lb.student_rows(evals, metric)
  tcurve = lb.teacher_curve(evals, metric)
  spd = lb.speedups(rows, tcurve, times)
  n = len(evals)
  nref, span = evals[0].get("references", 1), evals[0].get("floor_range", {}).get(metric)
  ndraw = evals[0].get("draws", 1)
  lines = header + [
      "", f"Figure: `{metric}` to held-out data (lower is better), "
      + (f"each the mean over {nref} held-out samples, " if nref > 1 else "")
      + (f"and over {ndraw} sample draws of each model, " if ndraw > 1 else "")
      + f"{n} seed(s){' (mean ± std)' if n > 1 else ''}; data-vs-data floor "
      f"{lb.fmt(lb.mean_std([e['floor'][metric] for e in evals.values()]))}"
      + (f" (seed 0: {span[0]:.4g}–{span[1]:.4g} over the pairs of samples)" if span else "")
      + ".", "",
      "| teacher NFE (Euler) | " + " | ".join(map(str, tcurve)) + " |",
      "|---|" + "---|" * len(tcurve),
      f"| {metric} | " + " | ".join(lb.fmt(lb.mean_std(lb.curve(evals, 'teacher', metric, k)))
                                    for k in tcurve) + " |",
      f"| / floor | " + " | ".join(f"{v / floor[metric]:.2f}" for v in tcurve.values()) + " |",
      "", "## Quality", "", *lb.quality_table(rows, metric, lb.reference_nfe(evals)),
      "", "## Train-step cost (seed 0; relative to the teacher's flow-matching step)", "",
      *lb.cost_table(rows, costs), "",
      "† the step runs part updates (critics, discriminators, learned weightings) under a "
      "`scan`/`cond`: XLA's cost analysis counts a loop body once, so these FLOPs are "
      "under-counted; the wall time is not.", "",
      "## Sampling speedup at matched quality (seed 0; compiled, warm)", "",
      *lb.speedup_table(spd), "", "![quality vs NFE](quality_vs_nfe.png)", ""]
  text = "\n".join(lines)
  with open(os.path.join(out, "leaderboard.md"), "w") as f:
    f.write(text)
  lb.write_csv(lb.csv_rows(rows, costs, spd), os.path.join(out, "leaderboard.csv"))
  lb.write_csv(lb.long_rows(evals), os.path.join(out, "quality.csv"))
  lb.plot(evals, rows, metric, os.path.join(out, "quality_vs_nfe.png"))
  return text


def main(argv=None) -> None:
  """Errors the user can fix (an unknown method or field, a bad config file or workdir, a
  missing teacher) are one line on stderr and exit 2. SIGTERM during a training saves that run's
  checkpoint and exits 0; elsewhere it ends the process (runs are checkpointed and the cache is
  replaced atomically: a rerun resumes)."""
  args = parse(argv)
  import _common
  _common.entry(lambda: board(args, argv))  # ConfigError, DataError, WorkdirError, OSError


def board(args: argparse.Namespace, argv=None) -> None:
  import _common
  teacher, jobs, skipped, dataset, runs_dir, out = plan(args)
  header = [f"machine: {_common.machine()}",
            f"command: python {' '.join(sys.argv if argv is None else ['benchmarks/leaderboard.py', *argv])}",
            f"dataset: {dataset}; runs: {runs_dir}; results: {out}"]
  print("\n".join(header), flush=True)
  for spec, why in skipped.items():
    print(f"skipped {spec}: no variant in {args.config} ({why})")
  todo = [teacher] + jobs
  for i, job in enumerate(todo, 1):
    state = "finished" if job.finished() else "resume" if job.started() else "train"
    steps = ", ".join(str(c.train.steps) for c in _stages(job))
    print(f"[{i}/{len(todo)}] {state:8s} {job.name} seed {job.seed} ({steps} steps) "
          f"-> {job.workdir}", flush=True)
    if args.dry_run or state == "finished":
      continue
    t0 = time.time()
    import _board
    _board.train_job(job)
    print(f"[{i}/{len(todo)}] done     {job.name} seed {job.seed} in {time.time() - t0:.0f} s",
          flush=True)
  if args.dry_run:
    return
  os.makedirs(out, exist_ok=True)
  cache = Cache(out)
  runs, student_nfe = {"teacher": {0: teacher.workdir}}, {}
  for job in jobs:
    for (name, wd), c in zip(job.runs().items(), _stages(job)):
      runs.setdefault(name, {})[job.seed] = wd
      student_nfe[name] = tuple(int(n) for n in c.eval.student_nfe)
  evals = evaluate_all(runs, args.seeds, args.teacher_nfe, out, cache, student_nfe, args.draws)
  from fmdistill.eval import leaderboard as lb
  metric = lb.metric_of(evals[0]["floor"])
  costs, times = measure(runs, lb.student_rows(evals, metric), evals, metric, args.reps, cache)
  budget = (f"budget: the file's shipped settings" if not args.steps else
            f"budget: --steps {args.steps}") + (f"; overrides {args.set}" if args.set else "")
  print()
  print(write(out, header + [budget], evals, costs, times))


def _stages(job):
  import _board
  return _board.stage_configs(job.config)


if __name__ == "__main__":
  main()
