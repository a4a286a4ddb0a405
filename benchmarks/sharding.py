r"""Step time and per-device compiled memory of the DiT train step vs mesh shape.

    python benchmarks/sharding.py [--devices 8] [--width 256] [--depth 4] [--batch 32] [--steps 5]

Runs on fake CPU devices (``--xla_force_host_platform_device_count``, set here before jax is
imported). On a CPU host all "devices" share the same cores, so step times show the cost of the
partitioned program and its collectives, not a speed-up; per-device memory is the compiled
``memory_analysis()`` of the partitioned step (arguments + outputs + temporaries per device).
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time

ap = argparse.ArgumentParser()
ap.add_argument("--devices", type=int, default=8)
ap.add_argument("--width", type=int, default=256)
ap.add_argument("--depth", type=int, default=4)
ap.add_argument("--batch", type=int, default=32)
ap.add_argument("--image", type=int, default=32, help="image side; tokens = (image / 2)^2")
ap.add_argument("--steps", type=int, default=5)
ap.add_argument("--method", default="flow_matching")
args = ap.parse_args()
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + f" --xla_force_host_platform_device_count={args.devices}")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from fmdistill import config as config_lib, models, parallel, state as state_lib  # noqa: E402
from fmdistill import step as step_lib  # noqa: E402

MESHES = [(8, 1, 1), (4, 2, 1), (2, 4, 1), (1, 8, 1), (2, 2, 2), (1, 4, 2), (1, 1, 8)]


def cpu_name() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      return next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
  except (OSError, StopIteration):
    return platform.processor() or platform.machine()


def main():
  c = config_lib.base(args.method)
  c.model.update(name="dit", width=args.width, depth=args.depth, heads=4, patch=2)
  c.train.batch_size = args.batch
  shape = (args.image, args.image, 3)
  with c.unlocked():
    c.data_shape = list(shape)
  net, params = state_lib.build_network(c, shape, 0, jax.random.PRNGKey(0))
  state = state_lib.init_state(c, params, {}, jax.random.PRNGKey(1))
  rng = np.random.default_rng(0)
  batch = {"x": rng.standard_normal((args.batch,) + shape).astype(np.float32)}
  print(f"machine: {cpu_name()}, {os.cpu_count()} cores, "
        f"{jax.device_count()} fake {jax.default_backend()} devices, jax {jax.__version__}")
  print(f"command: {' '.join([os.path.basename(sys.executable)] + sys.argv)}")
  print(f"model: DiT width {args.width}, depth {args.depth}, {(args.image // 2) ** 2} tokens, "
        f"{models.param_count(state.params) / 1e6:.2f} M params; batch {args.batch}; "
        f"method {args.method}")
  print()
  print("| mesh (data, fsdp, tensor) | step time (ms) | train state per device (MB) | "
        "compiled arguments (MB) | compiled temp (MB) |")
  print("|---|---|---|---|---|")
  for shape_ in MESHES:
    if np.prod(shape_) != jax.device_count() or args.batch % (shape_[0] * shape_[1]):
      continue
    c.mesh.update(data=shape_[0], fsdp=shape_[1], tensor=shape_[2], fsdp_min_size=2 ** 12)
    mesh = parallel.make_mesh(c.mesh)
    sh = parallel.state_shardings(state, mesh, c.mesh)
    step = step_lib.make_train_step(c, net, None, (mesh, sh, None))
    st = jax.device_put(state_lib.copy(state), sh)
    gb = parallel.global_batch(batch, mesh, args.batch)
    st, m = step(st, gb, None)
    jax.block_until_ready(st)
    t0 = time.perf_counter()
    for _ in range(args.steps):
      st, m = step(st, gb, None)
    jax.block_until_ready(st)
    ms = (time.perf_counter() - t0) / args.steps * 1e3
    mem = step.lower(st, gb, None).compile().memory_analysis()
    per_dev = sum(x.addressable_shards[0].data.nbytes for x in jax.tree_util.tree_leaves(st))
    print(f"| {shape_} | {ms:.0f} | {per_dev / 2 ** 20:.1f} | "
          f"{mem.argument_size_in_bytes / 2 ** 20:.1f} | {mem.temp_size_in_bytes / 2 ** 20:.1f} |",
          flush=True)


if __name__ == "__main__":
  main()
