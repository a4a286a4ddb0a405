r"""Tangent family benchmark: train-step cost relative to flow matching, and quality vs NFE.

    python benchmarks/tangent.py speed                       # small DiT, every method vs FM
    python benchmarks/tangent.py quality --teacher runs/fm_checkerboard \
        --runs runs/toy_checkerboard [--train]               # 2-D toys, students vs teacher

``speed``: one jitted train step (loss, gradient, Adam update) of each method on the same DiT
(``--depth 4 --width 256``, 32x32x3 images with patch 2 = 256 tokens) and batch; distillation
methods call a frozen DiT teacher. Reports compiled FLOPs (``cost_analysis``), peak temporary
memory (``memory_analysis().temp_size_in_bytes``) and the median wall time, each relative to
flow matching measured in the same run (steps timed in interleaved rounds). Extra rows:
MeanFlow with the tangent NOT under ``stop_gradient`` (what the fused JVP avoids), and with a
separate EMA target (one more forward pass).

``quality``: ``fmdistill.eval.report.evaluate_runs`` on the teacher run and every student run
found under ``--runs`` (``--train`` first trains the missing ones with
``experiments/toy2d.py:<method>``), then a table of sliced W2 at 1/2/4 NFE against the
teacher's 64-NFE value and the data-vs-data floor. ``reflow`` and ``progressive`` run their
stage chains from ``--teacher`` (one row per stage, ReFlow rounds with their straightness);
``shortcut``, ``splitmeanflow`` and ``tri_consistency`` start from the teacher's weights;
``method@key=value`` overrides an objective field (``tri_consistency@split=backward``).
"""
from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

from fmdistill import flowmap, models, objectives, paths, runs as runs_lib  # noqa: E402
from fmdistill.config import base  # noqa: E402
from fmdistill.objectives import _common as obj_common  # noqa: E402

import _common  # noqa: E402  (benchmarks/_common.py)

METHODS = ("scm_ct", "scm_cd", "meanflow", "meanflow_distill", "ayf_emd", "ayf_lmd", "facm",
           "fmm_forward", "fmm_backward", "fmm_forward_self", "fmm_backward_self",
           "imf", "tvm", "freeflow")
# discrete consistency, CTM and IMM (docs/consistency.md) start from the teacher's weights
# (_board.SELF_INIT), those that need no teacher in their loss too: --methods cm_cd,cm_ct,...


# ----------------------------------------------------------------------------- speed


def _dit(args):
  c = base("flow_matching").model
  c.name, c.width, c.depth, c.heads, c.patch = "dit", args.width, args.depth, args.heads, 2
  c.dtype = args.dtype
  shape = (args.image, args.image, 3)
  net, params = models.build(c, shape, 0, jax.random.key(0))
  return net, params, shape


def _step(name, net, params, teacher, batch, *, target_ema="", variant="", overrides=None):
  """A jitted ``(params, opt_state, ema) -> (params, opt_state, loss)`` train step. Parts
  trained by their own loss (FreeFlow's critic) enter frozen, as the teacher's network."""
  entry = objectives.entry(name)
  cfg = objectives.default_config(name)
  cfg.target_ema = target_ema
  cfg.update(overrides or {})
  frozen = {n: (lambda x, t, cond=None: teacher(x, t, t, cond))
            for n, p in entry.parts_for(cfg).items() if not p.joint}
  import types
  ctx = types.SimpleNamespace(config=types.SimpleNamespace(objective=cfg))
  parts = {n: p.init(jax.random.key(1), ctx) for n, p in entry.parts_for(cfg).items()
           if p.joint}  # jointly trained parts (sCM's weighting) train with the network
  params = (params, parts)
  opt = optax.adam(1e-4)
  loss_fn = entry.loss if not variant else _meanflow_no_stop_gradient

  def step(p, o, ema):
    def objective(q):
      return loss_fn(q[0], batch, jax.random.key(2), net=net, teacher=teacher,
                     ema_params=jax.lax.stop_gradient(ema[0]), step=10 ** 6, cfg=cfg,
                     **q[1], **frozen)[0]
    loss, g = jax.value_and_grad(objective)(p)
    upd, o = opt.update(g, o, p)
    return optax.apply_updates(p, upd), o, loss
  ema = jax.tree_util.tree_map(lambda a: a * 0.999, params) if target_ema else params
  return jax.jit(step), (params, opt.init(params), ema)


def _meanflow_no_stop_gradient(params, batch, key, *, net, cfg, **_):
  """MeanFlow with the tangent left differentiable (the cost the stop-gradient avoids)."""
  path = obj_common.path_of(cfg)
  x0 = batch["x"]
  kt, kn = jax.random.split(key)
  t, s = obj_common.sample_pairs(kt, x0.shape[0], cfg, path)
  x_t, _, v = obj_common.noisy(kn, x0, t, path)
  u, du = jax.jvp(lambda x_, t_: net(params, x_, t_, s), (x_t, t), (v, jnp.ones_like(t)))
  err = obj_common.mean_sq(u - (v - paths.bcast(t - s, du) * du))
  return jnp.mean(err), {}


def _part_step(name, part_name, net, params, teacher_fn, tparams, batch):
  """A jitted update of a part trained by its own loss (one of its ``updates`` per student
  step): ``(part params, opt_state) -> (part params, opt_state, loss)``."""
  entry = objectives.entry(name)
  cfg = objectives.default_config(name)
  part = entry.parts[part_name]
  opt = optax.adam(1e-4)

  def step(w, o):
    fn = lambda w_: part.loss(w_, params, batch, jax.random.key(3), net=net, apply=teacher_fn,
                              teacher=None, parts={}, step=0, cfg=cfg)[0]
    loss, g = jax.value_and_grad(fn)(w)
    upd, o = opt.update(g, o, w)
    return optax.apply_updates(w, upd), o, loss
  return jax.jit(step), (tparams, opt.init(tparams))


def _compile(fn, state):
  """``(compiled, FLOP count, peak temp bytes)``; one warm call to allocate buffers."""
  compiled, st = _common.compile_stats(fn, *state)
  jax.block_until_ready(compiled(*state))
  return compiled, st["flops"], st["temp_bytes"]


def speed(args) -> str:
  net, params, shape = _dit(args)
  _, tparams, _ = _dit(args)
  tparams = jax.tree_util.tree_map(lambda a: a + 0.01, tparams)  # a different, frozen net
  batch = {"x": jax.random.normal(jax.random.key(3), (args.batch,) + shape),
           "z": jax.random.normal(jax.random.key(4), (args.batch,) + shape)}  # data-free
  methods = args.methods.split(",") if args.methods else METHODS
  rows = [("flow_matching", {}), *[(m, {}) for m in methods]]
  if not args.methods:
    rows += [("meanflow", dict(variant="no_stop_gradient")), ("meanflow", dict(target_ema="ema"))]
  rows += [(m, dict(overrides=dict(tangent_grad=m == "imf"), variant="tangent_grad")) for m in
           ("imf", "tvm") if m in methods]
  results, items = [], []
  for name, kw in rows:
    cfg = objectives.default_config(name)
    path = paths.get_path(cfg.path, cfg.sigma_d)
    teacher = flowmap.teacher_network(net, tparams, flowmap.Parameterization("displacement"),
                                      paths.linear(), path)
    if kw.get("variant") == "tangent_grad":
      label = f"{name} (tangent {'differentiated' if name == 'imf' else 'under stop_gradient'})"
      kw = dict(overrides=kw["overrides"])
    else:
      label = name + (f" ({kw.get('variant') or 'EMA target'})" if kw else "")
    fn, state = _step(name, net, params, teacher, batch, **kw)
    compiled, flops, mem = _compile(fn, state)
    results.append((label, flops, mem))
    items.append((compiled, state))
    print(f"  compiled {label}", file=sys.stderr, flush=True)
    for part_name, part in objectives.entry(name).parts_for(cfg).items():
      if part.joint or kw:
        continue
      v = lambda p, x, t, cond=None: flowmap.teacher_velocity(
          net, p, flowmap.Parameterization("displacement"))(x, t, cond)
      fn, state = _part_step(name, part_name, net, params, v, tparams, batch)
      compiled, flops, mem = _compile(fn, state)
      results.append((f"{name}: one {part_name} update", flops, mem))
      items.append((compiled, state))
  secs = _common.time_round_robin(items, args.reps)
  results = [r + (s,) for r, s in zip(results, secs)]
  f0, m0, s0 = results[0][1:]
  lines = [f"DiT depth {args.depth}, width {args.width}, heads {args.heads}, "
           f"{(args.image // 2) ** 2} tokens, batch {args.batch}, {args.dtype}; median of "
           f"{args.reps} interleaved rounds after compilation.", "",
           "| method | GFLOP/step | x FM | temp MiB | x FM | ms/step | x FM |",
           "|---|---|---|---|---|---|---|"]
  for label, f, m, s in results:
    lines.append(f"| {label} | {f / 1e9:.1f} | {f / f0:.2f} | {m / 2 ** 20:.0f} | {m / m0:.2f} "
                 f"| {s * 1e3:.0f} | {s / s0:.2f} |")
  return "\n".join(lines)


# ----------------------------------------------------------------------------- quality


def quality_runs(args) -> dict:
  """``{row: workdir}`` of the teacher and every student under ``--runs`` that has a
  checkpoint; ``--train`` first trains (or resumes) the unfinished ones
  (``benchmarks/_board.py``, which the leaderboard uses too)."""
  import _board
  exp = _board.load_experiment(os.path.join(ROOT, "experiments", "toy2d.py"))
  teacher = os.path.abspath(args.teacher)
  run_dirs = {"teacher": args.teacher}
  for m in args.methods.split(","):
    job = _board.student_job(exp, m, [f"toy={args.toy}"], 0, 0, teacher,
                             os.path.join(args.runs, m), [])
    if args.train and not job.finished():  # resumes an interrupted run
      _board.train_job(job)
    run_dirs.update({n: wd for n, wd in job.runs().items()
                     if os.path.exists(os.path.join(wd, "checkpoints"))})
  return run_dirs


def quality(args) -> str:
  from fmdistill.eval import report
  run_dirs = quality_runs(args)
  res = report.evaluate_runs(run_dirs, args.out or os.path.join(args.runs, "report"))
  floor = res["noise_floor"]["sliced_w2"]
  t = res["runs"]["teacher"]["nfe"]
  t64 = t.get(64, t.get("64"))["sliced_w2"]
  lo, hi = res.get("noise_floor_range", {}).get("sliced_w2", (floor, floor))
  lines = [f"Toy {args.toy}: sliced W2 to held-out data ({res['num_samples']} samples, the mean "
           f"over {res.get('references', 1)} held-out samples); floor (data vs data) "
           f"{floor:.4f} ({lo:.4f}-{hi:.4f}); teacher (Euler) "
           + ", ".join(f"{k} NFE {v['sliced_w2']:.4f}" for k, v in t.items())
           + f"; teacher straightness S(Z) {res['runs']['teacher'].get('straightness', 0):.4f}."
           + " ODE students (ReFlow rounds) are sampled with Euler, S(Z) is their straightness.",
           "",
           "| student | steps | 1 NFE | 2 NFE | 4 NFE | 1 NFE / teacher@64 | 2 NFE / teacher@64 "
           "| S(Z) |",
           "|---|---|---|---|---|---|---|---|"]
  for name, r in res["runs"].items():
    if name == "teacher":
      continue
    q = {int(k): v["sliced_w2"] for k, v in r["nfe"].items()}
    steps = runs_lib.read_config(r["workdir"]).train.steps
    s = f"{r['straightness']:.4f}" if "straightness" in r else ""
    f = lambda n, d=1.0: f"{q[n] / d:.{2 if d != 1.0 else 4}f}" if n in q else "–"
    lines.append(f"| {name} | {steps} | {f(1)} | {f(2)} | {f(4)} | {f(1, t64)} | {f(2, t64)} "
                 f"| {s} |")
  return "\n".join(lines)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  sub = p.add_subparsers(dest="part", required=True)
  s = sub.add_parser("speed")
  s.add_argument("--depth", type=int, default=4)
  s.add_argument("--width", type=int, default=256)
  s.add_argument("--heads", type=int, default=4)
  s.add_argument("--image", type=int, default=32)
  s.add_argument("--batch", type=int, default=16)
  s.add_argument("--dtype", default="float32")
  s.add_argument("--reps", type=int, default=5)
  s.add_argument("--methods", default="", help="comma-separated subset (default: all + extras)")
  q = sub.add_parser("quality")
  q.add_argument("--teacher", required=True)
  q.add_argument("--runs", required=True)
  q.add_argument("--toy", default="checkerboard")
  q.add_argument("--methods", default=",".join(("direct_distill",) + METHODS))
  q.add_argument("--train", action="store_true")
  q.add_argument("--out", default="")
  args = p.parse_args()
  print(f"machine: {_common.machine()}")
  print(f"command: python {' '.join(sys.argv)}")
  print()
  print(speed(args) if args.part == "speed" else quality(args))


if __name__ == "__main__":
  import _common  # benchmarks/_common.py
  _common.entry(main)
