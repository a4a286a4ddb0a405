r"""Train-step cost of the distribution-matching family (and rCM) relative to flow matching.

    python benchmarks/score_distill.py --reps 3 [--methods scm_cd,dmd,dmd2,rcm,vsd,sid]

Unlike ``benchmarks/tangent.py speed`` (one loss evaluation and gradient), this times the whole
train step of ``fmdistill.step`` -- the student update AND every part update its schedule runs
on that step (DMD/DMD2: 5 fake-score updates, rCM: 4 after the warmup, VSD/SiD: 1; DMD2's
discriminator head 5) -- because that is what a step of these methods costs. Same DiT for
student, teacher and critic (``--depth/--width``, 32x32x3 images, patch 2 = 256 tokens),
batch ``--batch``, float32; rCM is timed after its warmup (critic on, DMD term on). Reports the
compiled temporary memory of the step and the median wall time of ``--reps`` interleaved
rounds, each relative to flow matching measured in the same run. (No FLOP column: XLA's cost
analysis counts the body of the parts' update loop once, so it under-counts these steps.)
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from fmdistill import config as config_lib, flowmap, models, objectives, paths  # noqa: E402
from fmdistill import state as state_lib, step as step_lib, teacher as teacher_lib  # noqa: E402


def _config(method, args):
  c = config_lib.base(method)
  c.model.update(name="dit", width=args.width, depth=args.depth, heads=args.heads, patch=2)
  c.data.name = "shapes"
  c.data_shape = [args.image, args.image, 3]
  c.train.update(batch_size=args.batch, steps=10 ** 6, log_every=10 ** 6)
  c.objective.num_classes = 0
  return c


def _state(method, args, tnet, tparams):
  """``(step_fn, state, batch, teacher_params)`` for one method at a post-warmup step."""
  c = _config(method, args)
  entry = objectives.entry(method)
  teacher = None
  if entry.needs_teacher:
    native = state_lib.function_key("displacement", "linear", 1.0)
    teacher = teacher_lib.Teacher(tnet, flowmap.Parameterization(), paths.linear(), tparams,
                                  tuple((k, c.model.get(k)) for k in models.FUNCTION_FIELDS),
                                  native)
    same = native == state_lib.function_key(c.objective.param, c.objective.path,
                                            c.objective.sigma_d)
    with c.unlocked():
      c.model.native_param = "" if same else "displacement"
      c.model.native_path = "" if same else "linear"
      c.model.native_sigma_d = 0.0 if same else 1.0
  net, params = state_lib.build_network(c, tuple(c.data_shape), 0, jax.random.key(0))
  if teacher is not None:
    params = state_lib.copy(tparams)
  ctx = objectives.PartContext(config=c, net=net, params=params,
                               teacher_params=None if teacher is None else tparams,
                               teacher_fn=None if teacher is None else
                               teacher_lib.velocity_fn(teacher, c), teacher=teacher)
  parts = state_lib.init_parts(c, ctx, jax.random.key(1))
  st = state_lib.init_state(c, params, parts, jax.random.key(2))
  st = st.replace(step=jnp.asarray(2000, jnp.int32))  # past every warmup and part start
  step = step_lib.make_train_step(c, net, teacher)
  batch = {"x": jax.random.normal(jax.random.key(3), (args.batch, args.image, args.image, 3))}
  return step, st, batch


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--methods", default="scm_cd,dmd,dmd2,rcm,vsd,sid")
  p.add_argument("--depth", type=int, default=4)
  p.add_argument("--width", type=int, default=256)
  p.add_argument("--heads", type=int, default=4)
  p.add_argument("--image", type=int, default=32)
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--reps", type=int, default=3)
  args = p.parse_args()
  print(f"machine: {platform.node()} | {platform.machine()} | {os.cpu_count()} CPUs visible | "
        f"jax {jax.__version__} | {jax.devices()[0].platform}")
  print(f"command: python {' '.join(sys.argv)}")
  print()
  tnet, tparams = models.build(_config("flow_matching", args).model,
                               (args.image, args.image, 3), 0, jax.random.key(5))
  tparams = jax.tree_util.tree_map(lambda a: a + 0.01, tparams)  # no zero layers
  rows = []
  for m in ["flow_matching"] + args.methods.split(","):
    step, st, batch = _state(m, args, tnet, tparams)
    compiled = step.lower(st, batch, tparams).compile()
    mem = compiled.memory_analysis().temp_size_in_bytes
    st = jax.block_until_ready(step(st, batch, tparams))[0]  # warm (the step donates st)
    rows.append([m, mem, step, st, batch, []])
    print(f"  compiled {m}", file=sys.stderr, flush=True)
  for _ in range(args.reps):
    for r in rows:
      t0 = time.perf_counter()
      r[3] = jax.block_until_ready(r[2](r[3], r[4], tparams))[0]
      r[5].append(time.perf_counter() - t0)
  m0, s0 = rows[0][1], float(np.median(rows[0][5]))
  print(f"DiT depth {args.depth}, width {args.width}, heads {args.heads}, "
        f"{(args.image // 2) ** 2} tokens, batch {args.batch}, float32; whole train step "
        f"(student + part updates); median of {args.reps} interleaved rounds.")
  print()
  print("| method | part updates / step | temp MiB | x FM | s/step | x FM |")
  print("|---|---|---|---|---|---|")
  for m, mem, _, st, _, ts in rows:
    c = _config(m, args)
    ups = ", ".join(f"{n} {c.parts[n].updates}"
                    for n in objectives.entry(m).parts_for(c.objective)) or "-"
    s = float(np.median(ts))
    print(f"| {m} | {ups} | {mem / 2 ** 20:.0f} | {mem / m0:.2f} | {s:.2f} | {s / s0:.2f} |")


if __name__ == "__main__":
  import _common  # benchmarks/_common.py
  _common.entry(main)
