r"""Mode coverage on the 2-D eight-Gaussian mixture: per-mode mass of 1-NFE students vs the data.

    python benchmarks/modes.py --teacher runs/fm_eight_gaussians --runs runs/modes [--train] \
        [--methods dmd,dmd2,scm_cd,rcm] [--seed 0]

The data (``experiments/toy2d.py``'s ``eight_gaussians``): eight isotropic Gaussians of std 0.1
on a circle of radius 2, equal weights. Every sample is assigned to its nearest mode; the table
reports, for the teacher (Euler, 64 NFE) and each student (1 NFE, consistency / flow-map
jump), the number of modes holding at least 2% of the samples, the total-variation distance
of the per-mode masses to uniform (0 = every mode 1/8), the fraction of samples farther than
4 std from every mode ("between modes": blur), the mean distance to the assigned mode (the
data's is 0.125: sharpness), sliced W2 to held-out data, and the eight masses. ``--train``
trains missing student runs with ``experiments/toy2d.py:<method>,toy=eight_gaussians`` (the
shipped settings) from the teacher; runs live in ``<runs>/<method>`` and resume.
"""
from __future__ import annotations

import argparse
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
from fmdistill.eval import evaluate, metrics  # noqa: E402
import toy2d  # noqa: E402

RADIUS, STD = 2.0, 0.1
CENTRES = RADIUS * np.stack([np.cos(np.arange(8) * np.pi / 4),
                             np.sin(np.arange(8) * np.pi / 4)], 1)


def coverage(x: np.ndarray) -> dict:
  """Mode statistics of samples ``x (n, 2)`` (module docstring)."""
  d = np.linalg.norm(x[:, None, :] - CENTRES[None], axis=-1)
  k = np.argmin(d, 1)
  near = d[np.arange(len(x)), k]
  mass = np.bincount(k, minlength=8) / len(x)
  return {"modes": int(np.sum(mass >= 0.02)), "tv": 0.5 * float(np.sum(np.abs(mass - 1 / 8))),
          "between": float(np.mean(near > 4 * STD)), "dist": float(np.mean(near)),
          "mass": mass}


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--teacher", required=True)
  p.add_argument("--runs", required=True)
  p.add_argument("--methods", default="dmd,dmd2,scm_cd,rcm")
  p.add_argument("--train", action="store_true")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--num", type=int, default=10_000)
  p.add_argument("--which", default="", help="the students' weights: 'params', an EMA name, "
                 "or '' for each run's eval.which")
  args = p.parse_args()
  print(f"machine: {platform.node()} | {os.cpu_count()} CPUs | jax {jax.__version__}")
  print(f"command: python {' '.join(sys.argv)}")
  print()
  tconfig = runs_lib.read_config(args.teacher)
  source = data.make_source(tconfig.data, tconfig.seed)
  ref = source.reference(args.num, 0)
  rows = [("data (held out)", "-", ref)]
  r = teacher_lib.load_sampling_run(args.teacher, tconfig.eval.which)
  cfg, net, params = r.config, r.net, r.params
  key = jax.random.PRNGKey(args.seed)
  rows.append(("teacher (Euler)", 64, evaluate.generate(cfg, net, params, key, args.num, 64)))
  for m in args.methods.split(","):
    wd = os.path.join(args.runs, m)
    if args.train and not runs_lib.is_finished(wd):
      c = toy2d.method_config(m, "eight_gaussians", seed=args.seed)
      if objectives.entry(m).needs_teacher:
        c.teacher.workdir = args.teacher
      train.train_and_evaluate(c, wd, progress=False)
    if not runs_lib.is_finished(wd):
      print(f"(no finished run for {m} in {wd})")
      continue
    which = args.which or runs_lib.read_config(wd).eval.which
    r = teacher_lib.load_sampling_run(wd, which)
    cfg, net, params = r.config, r.net, r.params
    rows.append((f"{m} ({which})", 1, evaluate.generate(cfg, net, params, key, args.num, 1)))
  other = source.reference(args.num, 1)
  print(f"Eight Gaussians (radius {RADIUS}, std {STD}), {args.num} samples per row; sampling "
        f"seed {args.seed}.")
  print()
  print("| run | NFE | modes >= 2% | TV to uniform | between modes | dist. to mode | sliced W2 "
        "| per-mode mass (%) |")
  print("|---|---|---|---|---|---|---|---|")
  for name, nfe, x in rows:
    c = coverage(np.asarray(x))
    w2 = metrics.sliced_w2(np.asarray(x), other)
    masses = " ".join(f"{100 * v:.1f}" for v in c["mass"])
    print(f"| {name} | {nfe} | {c['modes']} | {c['tv']:.3f} | {100 * c['between']:.1f}% | "
          f"{c['dist']:.3f} | {w2:.4f} | {masses} |")


if __name__ == "__main__":
  import _common  # benchmarks/_common.py
  _common.entry(main)
