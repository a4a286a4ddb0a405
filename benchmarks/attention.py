"""Memory (and CPU wall clock) of jvp(attention) and the MeanFlow pattern: XLA vs Pallas.

Usage (from the repository root)::

  python benchmarks/attention.py [--ns 256,512,1024,2048,4096,8192] [--time-ns 256,512,1024]

Memory is the compiled peak *temp* allocation (``memory_analysis().temp_size_in_bytes``;
arguments and outputs excluded) of ``jax.jit(f).lower(...).compile()`` for the default
backend, nothing is executed. Shapes: B=1, H=8, D=64, float32. Two Pallas figures:

* ``interp``: the kernels lowered with ``interpret=True`` (the only Pallas lowering on CPU).
  The HLO interpreter turns every ``pallas_call`` into a while loop whose state holds a copy
  of every kernel operand and output, so this over-counts a compiled kernel by a few O(N)
  buffers. It never contains an N x N buffer.
* ``online-jvp``: the one-pass fused online JVP kernel (``attention_jvp``), interpret mode.
* ``opaque``: the same program with each ``pallas_call`` swapped for a shape-only host
  callback (an opaque custom call that reads its operands in place and allocates only its
  outputs -- which is how a compiled Triton/Mosaic kernel uses HBM; its tiles live in
  SRAM/VMEM). This is the HBM footprint of everything around the kernels.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import platform
import shlex
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from fmdistill.pallas import attention, attention_jvp  # noqa: E402

B, H, D = 1, 8, 64
MB = 2 ** 20


def make_fns(impl: str):
  """(jvp, meanflow) closures over q, k, v, dq, dk, dv ``(B, N, H, D)``."""
  attn = lambda q, k, v: attention(q, k, v, impl=impl)

  def jvp(q, k, v, dq, dk, dv):
    return jax.jvp(attn, (q, k, v), (dq, dk, dv))

  def meanflow(q, k, v, dq, dk, dv):
    def loss(q, k, v):
      o, do = jax.jvp(attn, (q, k, v), (dq, dk, dv))
      return jnp.sum((o - jax.lax.stop_gradient(o + do)) ** 2)
    return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

  return jvp, meanflow


def online_jvp(q, k, v, dq, dk, dv):
  """The one-pass fused online JVP kernel (forward-only; not what jax.jvp runs)."""
  return attention_jvp(q, k, v, dq, dk, dv, interpret=jax.default_backend() == "cpu")


@contextlib.contextmanager
def opaque_kernels():
  """Replaces ``pl.pallas_call`` by a shape-only ``pure_callback`` (for lowering only)."""
  real = pl.pallas_call

  def fake(kernel, out_shape, **kwargs):
    del kernel, kwargs
    flat, tree = jax.tree.flatten(out_shape)
    structs = [jax.ShapeDtypeStruct(s.shape, s.dtype) for s in flat]

    def call(*args):
      host = lambda *_: [np.zeros(s.shape, s.dtype) for s in structs]
      return jax.tree.unflatten(tree, jax.pure_callback(host, structs, *args))
    return call

  pl.pallas_call = fake
  jax.clear_caches()
  try:
    yield
  finally:
    pl.pallas_call = real
    jax.clear_caches()


def temp_mb(fn, n: int) -> float:
  s = jax.ShapeDtypeStruct((B, n, H, D), jnp.float32)
  compiled = jax.jit(fn).lower(*[s] * 6).compile()
  return compiled.memory_analysis().temp_size_in_bytes / MB


def wall_ms(fn, n: int, repeats: int) -> float:
  args = [jax.random.normal(key, (B, n, H, D)) for key in jax.random.split(jax.random.key(0), 6)]
  f = jax.jit(fn)
  jax.block_until_ready(f(*args))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(f(*args))
    times.append(time.perf_counter() - t0)
  return 1e3 * float(np.median(times))


def machine() -> str:
  cpu = platform.processor()
  if not cpu and os.path.exists("/proc/cpuinfo"):
    with open("/proc/cpuinfo") as f:
      cpu = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), "")
  return (f"processor: {cpu or platform.machine()} ({os.cpu_count()} cores visible)\n"
          f"jax {jax.__version__}, backend {jax.default_backend()}, devices {jax.devices()}")


def memory_table(ns: list[int]) -> list[str]:
  xla, pal = make_fns("xla"), make_fns("pallas")
  rows = ["| N | jvp XLA | jvp Pallas interp | jvp Pallas opaque | online-jvp interp "
          "| MF XLA | MF Pallas interp | MF Pallas opaque | XLA/Pallas-interp: jvp, MF |",
          "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
  print("\n".join(rows), flush=True)
  for n in ns:
    x = [temp_mb(f, n) for f in xla]
    p = [temp_mb(f, n) for f in (*pal, online_jvp)]
    with opaque_kernels():
      o = [temp_mb(f, n) for f in pal]
    rows.append(f"| {n} | {x[0]:.1f} | {p[0]:.1f} | {o[0]:.2f} | {p[2]:.1f} | {x[1]:.1f} "
                f"| {p[1]:.1f} | {o[1]:.2f} | {x[0] / p[0]:.0f}x, {x[1] / p[1]:.0f}x |")
    print(rows[-1], flush=True)
  return rows


def time_table(ns: list[int], repeats: int) -> list[str]:
  xla, pal = make_fns("xla"), make_fns("pallas")
  rows = ["| N | jvp XLA ms | jvp Pallas ms | online-jvp Pallas ms | MF XLA ms | MF Pallas ms |",
          "|---:|---:|---:|---:|---:|---:|"]
  print("\n".join(rows), flush=True)
  for n in ns:
    t = [wall_ms(f, n, repeats) for f in (xla[0], pal[0], online_jvp, xla[1], pal[1])]
    rows.append("| " + " | ".join([str(n)] + [f"{x:.1f}" for x in t]) + " |")
    print(rows[-1], flush=True)
  return rows


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--ns", default="256,512,1024,2048,4096,8192")
  parser.add_argument("--time-ns", default="256,512,1024")
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args()
  print(machine())
  print("command: python " + " ".join(shlex.quote(a) for a in sys.argv))
  print(f"B={B} H={H} D={D} float32; jvp = jax.jvp(attention, (q,k,v), (dq,dk,dv)); "
        "MF = grad_{q,k,v} sum((o - sg(o + do))^2) with (o, do) = jvp(attention).")
  print("impl='pallas' on CPU = interpret=True; block_q = block_k = 64.\n")
  print("Compiled peak temp memory, MB (temp_size_in_bytes / 2^20; see module docstring):")
  memory_table([int(n) for n in args.ns.split(",") if n])
  if args.time_ns:
    print(f"\nCPU wall clock, median of {args.repeats} after one warm-up run. Pallas runs in "
          "interpret mode (an XLA while loop over the grid): a correctness path, not a "
          "speed figure for GPU/TPU:")
    time_table([int(n) for n in args.time_ns.split(",")], args.repeats)
  print("\nGPU/TPU timings: not run (no accelerator available to this task).")


if __name__ == "__main__":
  main()
