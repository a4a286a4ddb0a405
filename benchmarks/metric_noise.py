r"""How noisy is sliced W2 on the toys? Data vs data over several pairs, and a teacher vs
several held-out references, at several sample sizes.

    python benchmarks/metric_noise.py --teacher checkerboard=runs/fm_checkerboard \
        --teacher moons=runs/fm_moons --n 2000,20000 --refs 4 --draws 16

For each toy (the teacher run's data config, source seed 0): ``--refs`` held-out samples of
size ``n`` (``source.reference(n, k)``, k = 0..refs-1); sliced W2 between every pair of them
(the data-vs-data floor: mean, min, max) and between ``n`` samples of the teacher (``--nfe``,
``--solver``, sampling key 0: the draw a one-draw report scores) and each of them; the teacher's
mean as a multiple of the floor's mean. With ``--draws K`` also the same figure (mean over the
references) for K sample draws of the teacher (``evaluate.draw_key(0, d)``, d < K, the keys a
report with ``eval.draws = K`` uses): mean ± std (``ddof = 1``, as the reports' ``draw_std``),
min–max, and that mean over the floor. Only sliced W2 is computed (the reports' energy and MMD
are quadratic in ``n``). The reports average over the references (``eval.references``) and, by
default (``eval.draws = 1``), score one sample draw of each model, so this says how much each of
the two draws can move a figure.
"""
from __future__ import annotations

import argparse
import itertools
import os
import platform
import sys

import jax
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from fmdistill import data, runs as runs_lib, teacher as teacher_lib  # noqa: E402
from fmdistill.eval import evaluate, metrics  # noqa: E402


def rows(wd: str, sizes: list[int], refs: int, nfe: int, solver: str = "euler",
         draws: int = 1) -> list[str]:
  r = teacher_lib.load_sampling_run(wd, runs_lib.read_config(wd).eval.which)
  cfg, net, params = r.config, r.net, r.params
  with cfg.unlocked():
    cfg.eval.solver = solver
  source = data.make_source(cfg.data, 0)
  out = []
  for n in sizes:
    ref = evaluate.references(source, n, refs)
    dd = [metrics.sliced_w2(a, b) for a, b in itertools.combinations(ref, 2)]
    x = evaluate.generate(cfg, net, params, evaluate.draw_key(0, 0), n, nfe)
    tm = [metrics.sliced_w2(x, r) for r in ref]
    line = (f"| {cfg.data.toy} | {n} | {np.mean(dd):.4f} ({min(dd):.4f}-{max(dd):.4f}) | "
            f"{np.mean(tm):.4f} ({min(tm):.4f}-{max(tm):.4f}) | {np.mean(tm) / np.mean(dd):.2f} |")
    if draws > 1:
      per = [np.mean(tm)] + [
          evaluate.mean_sliced_w2(evaluate.generate(cfg, net, params, evaluate.draw_key(0, d), n,
                                                    nfe), ref) for d in range(1, draws)]
      std = evaluate.draw_std({"sliced_w2": per})["sliced_w2"]
      line += (f" {np.mean(per):.4f} ± {std:.4f} ({min(per):.4f}-{max(per):.4f}) | "
               f"{np.mean(per) / np.mean(dd):.2f} |")
    out.append(line)
  return out


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--teacher", action="append", default=[], required=True, help="toy=workdir")
  p.add_argument("--n", default="2000,20000", help="sample sizes")
  p.add_argument("--refs", type=int, default=4, help="held-out references per size")
  p.add_argument("--nfe", type=int, default=64)
  p.add_argument("--solver", default="euler", help="the teacher's ODE solver (eval.solver)")
  p.add_argument("--draws", type=int, default=1, help="sample draws of the teacher (keys 0..)")
  args = p.parse_args()
  if args.refs < 2 or args.draws < 1:
    p.error(f"--refs {args.refs} (at least 2) and --draws {args.draws} (at least 1)")
  print(f"machine: {platform.node()} | {os.cpu_count()} CPUs | jax {jax.__version__}")
  print(f"command: python {' '.join(sys.argv)}")
  print()
  print(f"| toy | n | data vs data: mean (min-max over {args.refs * (args.refs - 1) // 2} "
        f"pairs) | teacher@{args.nfe} ({args.solver}, key 0) vs each reference: mean (min-max) "
        "| teacher / floor |" + (f" teacher over {args.draws} sample draws: mean ± std (min-max) "
                                 "| / floor |" if args.draws > 1 else ""))
  print("|---|---|---|---|---|" + ("---|---|" if args.draws > 1 else ""))
  for spec in args.teacher:
    _, wd = spec.split("=", 1)
    for line in rows(wd, [int(v) for v in args.n.split(",")], args.refs, args.nfe,
                     args.solver, args.draws):
      print(line, flush=True)


if __name__ == "__main__":
  import _common  # benchmarks/_common.py
  _common.entry(main)
