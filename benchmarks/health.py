r"""Training health of finished (or running) runs: did the network die, and how good is it.

    python benchmarks/health.py runs/scm_cd_checkerboard_s0 runs/rcm_moons_s1 ... \
        --teacher checkerboard=runs/fm_checkerboard --teacher moons=runs/fm_moons
    python benchmarks/health.py --train scm_cd,checkerboard,1 --dir runs \
        --teacher checkerboard=runs/fm_checkerboard          # train <dir>/scm_cd_checkerboard_s1

For every run (a toy run of ``experiments/toy2d.py``, or a ``digits``/``shapes``/``scenes`` run
of ``experiments/digits.py``; ``--teacher`` and ``--train`` name the dataset in place of the
toy): the largest ``health/dead_frac`` and ``health/mod_scale`` logged in ``metrics.jsonl``
over the run, the number of logged steps with ``health/alarm``, skipped (non-finite) updates,
the spread of its 1-NFE samples relative to the data's (total standard deviation over all
coordinates; a dead network maps all noise to one point: spread ~ 0), and sliced W2 at 1 and
2 NFE as a multiple of its teacher's 64-NFE Euler value (``--teacher toy=workdir``), each the
mean over ``REFS`` held-out references shared by every run of the dataset (``references``).
A run "died" when its 1-NFE spread is below 10% of the data's or its last logged step raised
the alarm.
``--train method,toy,seed[,modulation]`` trains missing runs first with the shipped settings
(``experiments/toy2d.py``), named ``<dir>/<method>_<toy>_s<seed>[_<modulation>]``.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys

import jax
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "experiments"))

from fmdistill import data, objectives, runs as runs_lib, teacher as teacher_lib  # noqa: E402
from fmdistill import train  # noqa: E402
from fmdistill.eval import evaluate  # noqa: E402
import digits  # noqa: E402
import toy2d  # noqa: E402

N = 2000
REFS = 4
IMAGES = ("digits", "shapes", "scenes")


def dataset(cfg) -> str:
  """The name ``--teacher``/``--train`` use: the toy, or the image set."""
  return cfg.data.toy if cfg.data.name == "toy" else cfg.data.name


def spread(x: np.ndarray, reference: np.ndarray) -> float:
  """Total std of samples relative to the data's (all coordinates flattened)."""
  flat = lambda a: np.reshape(a, (len(a), -1))
  return float(np.sqrt(flat(x).var(0).sum() / flat(reference).var(0).sum()))


def _train(spec: str, directory: str, teachers: dict) -> str:
  method, toy, seed, *mod = spec.split(",")
  name = f"{method}_{toy}_s{seed}" + (f"_{mod[0]}" if mod else "")
  wd = os.path.join(directory, name)
  if not runs_lib.is_finished(wd):
    c = (digits.method_config(method, seed=int(seed), data=toy) if toy in IMAGES
         else toy2d.method_config(method, toy, seed=int(seed)))
    if mod:
      c.model.modulation = mod[0]
    if objectives.entry(method).needs_teacher:
      c.teacher.workdir = teachers[toy]
    with contextlib.redirect_stdout(sys.stderr):  # stdout is the table
      train.train_and_evaluate(c, wd, progress=False)
  return wd


def references(cfg) -> list:
  """``REFS`` held-out data samples of the dataset, the same for every run of it whatever the
  run's seed (the seed-0 source): one reference draw moves sliced W2 at 2000 samples by up to
  +-30% (``benchmarks/metric_noise.py``), so figures are means over these."""
  return evaluate.references(data.make_source(cfg.data, 0), N, REFS)


def _teacher_w2(wd: str, refs: list, cache: dict) -> float:
  if wd not in cache:
    r = teacher_lib.load_sampling_run(wd, runs_lib.read_config(wd).eval.which)
    cfg, net, params = r.config, r.net, r.params
    x = evaluate.generate(cfg, net, params, jax.random.PRNGKey(0), N, 64)
    cache[wd] = evaluate.mean_sliced_w2(x, refs)
  return cache[wd]


def summary(wd: str, teachers: dict, cache: dict) -> str:
  cfg = runs_lib.read_config(wd)
  rows = [json.loads(l) for l in open(os.path.join(wd, "metrics.jsonl")) if l.strip()]
  h = lambda k: [r[k] for r in rows if k in r and np.isfinite(r[k])]
  refs = references(cfg)
  r = teacher_lib.load_sampling_run(wd, cfg.eval.which)
  net, params = r.net, r.params
  q = {}
  for nfe in (1, 2):
    x = evaluate.generate(cfg, net, params, jax.random.PRNGKey(0), N, nfe)
    q[nfe] = (evaluate.mean_sliced_w2(x, refs), spread(x, refs[0]))
  name = dataset(cfg)
  tw = _teacher_w2(teachers[name], refs, cache) if name in teachers else None
  alarms = sum(1 for v in h("health/alarm") if v > 0)
  last_alarm = bool(h("health/alarm")) and h("health/alarm")[-1] > 0
  died = q[1][1] < 0.1 or last_alarm
  rel = lambda v: f"{v / tw:.2f}x" if tw else "-"
  return (f"| {os.path.basename(wd)} | {cfg.method} | {cfg.model.get('modulation', 'film')} | "
          f"{int(rows[-1]['step'])} | {max(h('health/dead_frac') or [np.nan]):.2f} | "
          f"{max(h('health/mod_scale') or [np.nan]):.2f} | {alarms} | "
          f"{int(rows[-1].get('skipped', 0))} | {q[1][1]:.2f} | {q[1][0]:.4f} ({rel(q[1][0])}) | "
          f"{q[2][0]:.4f} ({rel(q[2][0])}) | {'DIED' if died else 'alive'} |")


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("runs", nargs="*")
  p.add_argument("--teacher", action="append", default=[], help="toy=workdir (or digits=...)")
  p.add_argument("--train", action="append", default=[],
                 help="method,toy,seed[,modulation] (toy: a 2-D toy or digits/shapes/scenes)")
  p.add_argument("--dir", default="runs")
  args = p.parse_args()
  teachers = dict(a.split("=", 1) for a in args.teacher)
  print(f"machine: {platform.node()} | {os.cpu_count()} CPUs | jax {jax.__version__}")
  print(f"command: python {' '.join(sys.argv)}")
  print()
  todo = list(args.runs) + [_train(s, args.dir, teachers) for s in args.train]
  print("| run | method | modulation | steps | max dead frac | max mod scale | alarms | skipped "
        "| 1-NFE spread | 1 NFE W2 (x teacher@64) | 2 NFE W2 | verdict |")
  print("|---|---|---|---|---|---|---|---|---|---|---|---|")
  cache: dict = {}
  for wd in todo:
    print(summary(wd, teachers, cache), flush=True)


if __name__ == "__main__":
  import _common  # benchmarks/_common.py
  _common.entry(main)
