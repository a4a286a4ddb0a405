"""Teacher-initialised vs random-initialised students on the 2-D toys (issue "One train state").

For each toy: train (or reuse) the flow-matching teacher of ``experiments/toy2d.py``, then
every method in ``--methods`` twice on the same budget and seed, once starting from the
teacher's weights (``teacher.init_student=True``, the default) and once from random weights.
Every ``--every`` steps the student's 1- and 2-NFE samples are scored (sliced W2 to held-out
data, ``--samples`` samples, the report's reference set), so the table gives the final figures
and the first step at which the 1-NFE figure reaches ``--target`` x the teacher's 64-NFE one.
Resumable: finished runs are reused (delete a run directory to redo it).

    python benchmarks/teacher_init.py --runs runs/teacher_init --toys checkerboard,moons
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "experiments"))

import jax  # noqa: E402

from fmdistill import data, runs, train  # noqa: E402
from fmdistill.eval import evaluate, metrics, report  # noqa: E402
import toy2d  # noqa: E402

METHODS = "meanflow_distill,ayf_emd,scm_cd,fmm_backward"


def machine() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      cpu = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
  except (OSError, StopIteration):
    cpu = platform.processor() or platform.machine()
  return f"{cpu}, {os.cpu_count()} cores, jax {jax.__version__} ({jax.default_backend()})"


def curve_fn(config, reference, nfes=(1, 2)):
  """The train loop's evaluation hook: sliced W2 of the raw student at ``nfes``."""
  def fn(net, state):
    out = {}
    for nfe in nfes:
      x = evaluate.generate(config, net, state.params, jax.random.PRNGKey(0), len(reference),
                            nfe)
      out[f"sw2_nfe{nfe}"] = metrics.sliced_w2(x, reference)
    return out
  return fn


def teacher_run(args, toy: str) -> tuple[str, dict]:
  wd = os.path.join(args.runs, toy, "teacher")
  if not runs.is_finished(wd):
    train.train_and_evaluate(toy2d.method_config("flow_matching", toy, seed=args.seed), wd,
                             progress=False)
  path = os.path.join(wd, "metrics.json")
  if not os.path.exists(path):
    report.evaluate_runs({"teacher": wd}, wd)
  with open(path) as f:
    res = json.load(f)
  return wd, res


def student_run(args, toy: str, method: str, init: bool, teacher: str, reference) -> dict:
  wd = os.path.join(args.runs, toy, f"{method}_{'teacher' if init else 'random'}_init")
  c = toy2d.method_config(method, toy, steps=args.steps, seed=args.seed)
  c.teacher.update(workdir=teacher, init_student=init)
  c.train.update(eval_every=args.every, log_every=args.every)
  if not runs.is_finished(wd):
    t0 = time.time()
    train.train_and_evaluate(c, wd, progress=False, eval_fn=curve_fn(c, reference))
    print(f"  {toy} {method} init={init}: {time.time() - t0:.0f} s", file=sys.stderr,
          flush=True)
  with open(os.path.join(wd, "metrics.jsonl")) as f:
    lines = [json.loads(l) for l in f if "eval/sw2_nfe1" in l]
  return {"curve": [(l["step"], l["eval/sw2_nfe1"], l["eval/sw2_nfe2"]) for l in lines],
          "steps": c.train.steps}


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--runs", default="runs/teacher_init")
  p.add_argument("--toys", default="checkerboard,moons")
  p.add_argument("--methods", default=METHODS)
  p.add_argument("--steps", type=int, default=0, help="student steps (0: the config's)")
  p.add_argument("--every", type=int, default=250)
  p.add_argument("--samples", type=int, default=2000)
  p.add_argument("--target", type=float, default=1.2)
  p.add_argument("--seed", type=int, default=0)
  args = p.parse_args()
  print(f"machine: {machine()}")
  print(f"command: python {' '.join(sys.argv)}")
  for toy in args.toys.split(","):
    teacher, tres = teacher_run(args, toy)
    t64 = tres["runs"]["teacher"]["nfe"]["64"]["sliced_w2"]
    floor = tres["noise_floor"]["sliced_w2"]
    src = data.make_source(runs.read_config(teacher).data, args.seed)
    reference = src.reference(args.samples, 0)
    print(f"\n{toy}: teacher 64-NFE Euler sliced W2 {t64:.4f} (floor {floor:.4f}, "
          f"{tres['num_samples']} samples); target {args.target} x teacher = "
          f"{args.target * t64:.4f}\n")
    print("| method | init | 1 NFE | 2 NFE | 1 NFE / teacher@64 | 2 NFE / teacher@64 | "
          f"first step with 1 NFE <= {args.target}x teacher |")
    print("|---|---|---|---|---|---|---|")
    for method in args.methods.split(","):
      for init in (True, False):
        r = student_run(args, toy, method, init, teacher, reference)
        last = r["curve"][-1]
        hit = next((s for s, q1, _ in r["curve"] if q1 <= args.target * t64), None)
        reached = hit if hit is not None else f"not within {r['steps']}"
        print(f"| {method} | {'teacher' if init else 'random'} | {last[1]:.4f} | {last[2]:.4f} "
              f"| {last[1] / t64:.2f} | {last[2] / t64:.2f} | {reached} |", flush=True)


if __name__ == "__main__":
  import _common  # benchmarks/_common.py
  _common.entry(main)
