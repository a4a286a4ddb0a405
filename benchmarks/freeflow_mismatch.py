r"""FreeFlow's teacher-data-mismatch claim on a 2-D mixture, measured.

    python benchmarks/freeflow_mismatch.py --runs runs/mismatch [--toy gmm]
        [--teacher-steps 300] [--steps 2000] [--seeds 0]

A flow-matching teacher is trained *briefly* on the mixture (``--teacher-steps``), so the
distribution it generates differs from the data. Students of the same budget (steps, batch,
learning rate, network, all started from the teacher's weights) distil it:

* ``freeflow``: data-free (prior samples only), predictor + corrector;
* ``freeflow_pred``: the same without the corrector (``corrector_weight = 0``);
* ``fmm_forward``: the same predictor objective (the Lagrangian map condition) on *noised
  data* ``x_t`` instead of the student's own path -- the data-based counterpart;
* ``meanflow_distill``: a second data-based distillation (Eulerian, MeanFlow's target with the
  teacher's velocity).

Reported per student and NFE: sliced W2 and energy distance to the teacher's samples (its
ODE solved with 128 Euler steps, EMA 0.99 of its brief run, on noise independent of the students') and to held-out data,
and the paired RMSE between the student's sample and the teacher's ODE solution *from the same
noise* (how closely the student reproduces the teacher's map). Noise floors: teacher vs
teacher (two independent noise draws), data vs data. Runs resume (finished runs are reused).
"""
from __future__ import annotations

import argparse
import os
import sys

import jax
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "experiments"))

from fmdistill import data, runs, teacher as teacher_lib, train  # noqa: E402
from fmdistill.eval import evaluate, metrics  # noqa: E402
import toy2d  # noqa: E402
from _common import machine  # noqa: E402  (benchmarks/_common.py)

STUDENTS = {"freeflow": ("freeflow", {}),
            "freeflow_pred": ("freeflow", {"corrector_weight": 0.0}),
            "fmm_forward": ("fmm_forward", {}),
            "meanflow_distill": ("meanflow_distill", {})}


def _run(config, workdir: str) -> str:
  if not runs.is_finished(workdir, config.train.steps):
    train.train_and_evaluate(config, workdir, progress=False)
  return workdir


def _samples(workdir: str, key, n: int, nfe: int, which: str = "") -> np.ndarray:
  r = teacher_lib.load_sampling_run(workdir, which or runs.read_config(workdir).eval.which)
  config, net, params = r.config, r.net, r.params
  return evaluate.generate(config, net, params, key, n, nfe)


def _dist(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
  return metrics.sliced_w2(a, b), metrics.energy_distance(a, b)


def run_seed(args, seed: int) -> dict:
  base = os.path.join(args.runs, f"seed{seed}")
  tc = toy2d.method_config("flow_matching", args.toy, args.teacher_steps, seed)
  # a brief run: an EMA of decay 0.999 would still be mostly the random initialisation
  tc.train.ema_decays, tc.eval.which = (0.99,), "ema_0.99"
  teacher = _run(tc, os.path.join(base, "teacher"))
  wds = {}
  for name, (method, overrides) in STUDENTS.items():
    c = toy2d.method_config(method, args.toy, args.steps, seed)
    c.teacher.workdir, c.teacher.which = teacher, "ema_0.99"
    c.objective.update(overrides)
    wds[name] = (_run(c, os.path.join(base, name)), tuple(c.eval.student_nfe))
  n = args.samples
  ref = data.make_source(tc.data, seed).reference(n, 0)
  ref2 = data.make_source(tc.data, seed).reference(n, 1)
  key, key_other = jax.random.PRNGKey(1000 + seed), jax.random.PRNGKey(2000 + seed)
  t_same = _samples(teacher, key, n, 128)        # the teacher's map of the students' noise
  t_other = _samples(teacher, key_other, n, 128)  # independent teacher samples
  out = {"floors": {"teacher_vs_teacher": _dist(t_same, t_other), "data_vs_data":
                    _dist(ref, ref2), "teacher_vs_data": _dist(t_other, ref)}, "students": {}}
  for name, (wd, nfes) in wds.items():
    for nfe in nfes:  # FreeFlow: 1 (its maps start at T only)
      x = _samples(wd, key, n, nfe, args.which)
      paired = float(np.sqrt(np.mean(np.sum((x - t_same) ** 2, -1))))
      out["students"][(name, nfe)] = (*_dist(x, t_other), *_dist(x, ref), paired)
  return out


def table(results: list[dict], args) -> str:
  mean = lambda vals: np.mean(np.asarray(vals), 0)
  fl = {k: mean([r["floors"][k] for r in results]) for k in results[0]["floors"]}
  lines = [f"Toy {args.toy}; teacher: flow matching, {args.teacher_steps} steps; students: "
           f"{args.steps} steps each, same network/batch/lr, teacher-initialised, "
           f"evaluated with their {args.which!r} weights; "
           f"{args.samples} samples; mean over seeds {args.seeds}.",
           "", f"Floors (sliced W2 / energy): teacher vs teacher {fl['teacher_vs_teacher'][0]:.4f}"
           f" / {fl['teacher_vs_teacher'][1]:.5f}; data vs data {fl['data_vs_data'][0]:.4f} / "
           f"{fl['data_vs_data'][1]:.5f}; **teacher vs data {fl['teacher_vs_data'][0]:.4f} / "
           f"{fl['teacher_vs_data'][1]:.5f}** (the mismatch).", "",
           "| student | NFE | SW2 to teacher | energy to teacher | SW2 to data | energy to data "
           "| paired RMSE to teacher's map |", "|---|---|---|---|---|---|---|"]
  for key in sorted(results[0]["students"], key=lambda k: (list(STUDENTS).index(k[0]), k[1])):
    v = mean([r["students"][key] for r in results])
    lines.append(f"| {key[0]} | {key[1]} | {v[0]:.4f} | {v[1]:.5f} | {v[2]:.4f} | {v[3]:.5f} "
                 f"| {v[4]:.4f} |")
  return "\n".join(lines)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--runs", required=True)
  p.add_argument("--toy", default="gmm")
  p.add_argument("--teacher-steps", type=int, default=300)
  p.add_argument("--steps", type=int, default=2000)
  p.add_argument("--samples", type=int, default=4000)
  p.add_argument("--seeds", default="0")
  p.add_argument("--which", default="params", help="student weights evaluated: 'params' (the "
                 "raw weights at the end of the cosine schedule) or an EMA, e.g. 'ema_0.999'")
  args = p.parse_args()
  print(f"machine: {machine()}")
  print(f"command: python {' '.join(sys.argv)}")
  print()
  results = [run_seed(args, int(s)) for s in args.seeds.split(",")]
  print(table(results, args))


if __name__ == "__main__":
  import _common  # benchmarks/_common.py
  _common.entry(main)
