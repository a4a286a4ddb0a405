"""Sharding checks, run in a subprocess with fake CPU devices (see tests/test_parallel.py).

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/parallel_check.py \
        equivalence flow_matching pallas WORKDIR
    ... parallel_check.py train WORKDIR DATA FSDP STEPS [STOP_AFTER]  (prints a params checksum file)
"""
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from fmdistill import config as config_lib, objectives, parallel, state as state_lib  # noqa: E402
from fmdistill import train  # noqa: E402


def dit_config(method: str, data: int = 1, fsdp: int = 1, impl: str = "xla"):
  c = config_lib.base(method)
  c.data.name = "digits"
  c.data.conditional = True
  c.model.update(name="dit", width=32, depth=2, heads=2, patch=2, attn_impl=impl)
  c.train.update(batch_size=16, steps=8, log_every=2, ckpt_every=2, keep=5, warmup_steps=2)
  c.mesh.update(data=data, fsdp=fsdp, tensor=1, fsdp_min_size=256)
  return c


def equivalence(method: str, impl: str, workdir: str) -> None:
  c = dit_config(method, data=2, fsdp=4, impl=impl)
  if objectives.entry(method).needs_teacher:  # a 2-step DiT teacher run, then distil it
    tc = dit_config("flow_matching", data=8, fsdp=1, impl="xla")
    tc.train.steps = 2
    train.train_and_evaluate(tc, os.path.join(workdir, "teacher"), progress=False)
    c.teacher.update(workdir=os.path.join(workdir, "teacher"), which="params")
  workdir = os.path.join(workdir, "student")
  source, teacher, net, state = train.setup(c, workdir)
  batch = {k: jnp.asarray(v) for k, v in source.batch(0, 16).items()}
  tparams = teacher.params if teacher is not None else None
  # unsharded: everything on one device, plain jit
  single = train.make_train_step(c, net, teacher)
  s1, m1 = single(jax.device_put(state_lib.copy(state), jax.devices()[0]), batch, tparams)
  # sharded: data=2 x fsdp=4 mesh, pjit-style shardings, attention kernel under shard_map
  mesh = parallel.make_mesh(c.mesh)
  sh = parallel.state_shardings(state, mesh, c.mesh)
  tsh = parallel.state_shardings(tparams, mesh, c.mesh) if tparams is not None else None
  step = train.make_train_step(c, net, teacher, (mesh, sh, tsh))
  s2, m2 = step(jax.device_put(state_lib.copy(state), sh), parallel.global_batch(
      {k: np.asarray(v) for k, v in batch.items()}, mesh, 16),
      jax.device_put(tparams, tsh) if tparams is not None else None)
  specs = {str(x.sharding.spec) for x in jax.tree_util.tree_leaves(s2.params)}
  assert any("fsdp" in s for s in specs), specs
  trees = lambda s: (s.params, s.parts)  # every part's update too (DMD's critic)
  diff = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) for a, b in zip(
      jax.tree_util.tree_leaves(trees(s1)), jax.tree_util.tree_leaves(trees(s2))))
  print(json.dumps({"loss_single": float(m1["loss"]), "loss_sharded": float(m2["loss"]),
                    "max_param_diff": diff, "specs": sorted(specs),
                    "devices": jax.device_count()}))


def mlp_config(data: int, fsdp: int, steps: int):
  """A small toy run (fast to compile) whose kernels are big enough to be FSDP-sharded."""
  c = config_lib.base("flow_matching")
  c.model.update(width=32, depth=2)
  c.train.update(batch_size=16, steps=steps, log_every=2, ckpt_every=4, keep=5,
                 warmup_steps=2)
  c.mesh.update(data=data, fsdp=fsdp, tensor=1, fsdp_min_size=64)
  return c


def run_training(workdir: str, data: int, fsdp: int, steps: int, stop_after: int | None) -> None:
  parallel.initialize()
  c = mlp_config(data, fsdp, steps)
  _, state = train.train_and_evaluate(c, workdir, progress=False, stop_after=stop_after)
  leaves = [np.asarray(jax.device_get(x)).tolist()
            for x in jax.tree_util.tree_leaves(state.params)]
  if jax.process_index() == 0:
    with open(os.path.join(workdir, f"params_{steps}_{jax.device_count()}.json"), "w") as f:
      json.dump({"step": int(state.step), "leaves": leaves}, f)
  print(json.dumps({"step": int(state.step), "devices": jax.device_count(),
                    "processes": jax.process_count()}))


if __name__ == "__main__":
  mode = sys.argv[1]
  if mode == "equivalence":
    equivalence(sys.argv[2], sys.argv[3], sys.argv[4])
  elif mode == "train":
    wd, data, fsdp, steps = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
    run_training(wd, data, fsdp, steps, int(sys.argv[6]) if len(sys.argv) > 6 else None)
  else:
    raise SystemExit(f"unknown mode {mode}")
