"""Memory, kernel launches (and CPU wall clock) of attention transforms: XLA vs Pallas.

Usage (from the repository root)::

  python benchmarks/attention.py [--ns 1024,2048,4096,8192] [--time-ns 256,1024]

Transforms, on q, k, v, dq, dk, dv ``(B, N, H, D)``:

* ``value``: ``attention(q, k, v)``.
* ``jvp``: ``jax.jvp(attention, (q, k, v), (dq, dk, dv))``.
* ``MF`` (MeanFlow/sCM pattern): ``grad_{q,k,v} sum((o - sg(o + do))^2)`` with
  ``(o, do) = jvp(attention)``: gradient through the primal, tangent under stop_gradient.
* ``iMF`` (improved MeanFlow / TVM pattern): ``grad_{q,k,v,dq,dk,dv} sum((o + do)^2)``:
  gradient through the primal and the tangent.

Memory is the compiled peak *temp* allocation (``memory_analysis().temp_size_in_bytes``;
arguments and outputs excluded) of ``jax.jit(f).lower(...).compile()`` for the default
backend; nothing is executed. Shapes: B=1, H=8, D=64, float32. Two Pallas figures:

* ``interp``: the kernels lowered with ``interpret=True`` (the only Pallas lowering on CPU).
  The HLO interpreter turns every ``pallas_call`` into a while loop whose state holds a copy
  of every kernel operand and output, so this over-counts a compiled kernel by a few O(N)
  buffers. It never contains an N x N buffer.
* ``opaque``: the same program with each ``pallas_call`` swapped for a shape-only host
  callback (an opaque custom call that reads its operands in place and allocates only its
  outputs -- which is how a compiled Triton/Mosaic kernel uses HBM; its tiles live in
  SRAM/VMEM). This is the HBM footprint of everything around the kernels.

Kernel launches are the ``pallas_call``s of each transform's jaxpr
(``fmdistill.pallas.kernel_count``), identical on every platform.
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
from fmdistill.pallas import attention  # noqa: E402
from fmdistill.pallas.kernel_count import pallas_call_count  # noqa: E402

B, H, D = 1, 8, 64
MB = 2 ** 20
NAMES = ("value", "jvp", "MF", "iMF")
sg = jax.lax.stop_gradient


def make_fns(impl: str) -> dict:
  """Transform name -> closure over ``(q, k, v, dq, dk, dv)`` (see module doc)."""
  attn = lambda q, k, v: attention(q, k, v, impl=impl)

  def jvp(q, k, v, dq, dk, dv):
    return jax.jvp(attn, (q, k, v), (dq, dk, dv))

  def meanflow(q, k, v, dq, dk, dv):
    def loss(q, k, v):
      o, do = jvp(q, k, v, dq, dk, dv)
      return jnp.sum((o - sg(o + do)) ** 2)
    return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

  def improved_meanflow(*args):
    return jax.grad(lambda *a: jnp.sum(sum(jvp(*a)) ** 2), argnums=range(6))(*args)

  return dict(value=lambda q, k, v, *_: attn(q, k, v), jvp=jvp, MF=meanflow,
              iMF=improved_meanflow)


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


def shapes(n: int) -> list[jax.ShapeDtypeStruct]:
  return [jax.ShapeDtypeStruct((B, n, H, D), jnp.float32)] * 6


def temp_mb(fn, n: int) -> float:
  compiled = jax.jit(fn).lower(*shapes(n)).compile()
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


def launch_table() -> list[str]:
  pal, xla = make_fns("pallas"), make_fns("xla")
  grad = lambda impl: lambda q, k, v, *_: jax.grad(
      lambda q, k, v: jnp.sum(attention(q, k, v, impl=impl) ** 2), argnums=(0, 1, 2))(q, k, v)
  fns = dict(pal, grad=grad("pallas"))
  order = ("value", "jvp", "grad", "MF", "iMF")
  rows = ["| impl | " + " | ".join(order) + " |", "|---|" + "---:|" * len(order),
          "| pallas | " + " | ".join(str(pallas_call_count(fns[k], *shapes(256)))
                                     for k in order) + " |",
          "| xla | " + " | ".join(str(pallas_call_count(f, *shapes(256))) for f in
                                  (xla["value"], xla["jvp"], grad("xla"), xla["MF"],
                                   xla["iMF"])) + " |"]
  print("\n".join(rows), flush=True)
  return rows


def memory_table(ns: list[int]) -> list[str]:
  xla, pal = make_fns("xla"), make_fns("pallas")
  head = " | ".join(f"{n} XLA | {n} interp | {n} opaque" for n in NAMES)
  rows = [f"| N | {head} | XLA/interp: " + ", ".join(NAMES) + " |",
          "|---:|" + "---:|" * (3 * len(NAMES) + 1)]
  print("\n".join(rows), flush=True)
  for n in ns:
    x = [temp_mb(xla[k], n) for k in NAMES]
    p = [temp_mb(pal[k], n) for k in NAMES]
    with opaque_kernels():
      o = [temp_mb(pal[k], n) for k in NAMES]
    cells = " | ".join(f"{a:.1f} | {b:.1f} | {c:.2f}" for a, b, c in zip(x, p, o))
    ratios = ", ".join(f"{a / b:.0f}x" for a, b in zip(x, p))
    rows.append(f"| {n} | {cells} | {ratios} |")
    print(rows[-1], flush=True)
  return rows


def time_table(ns: list[int], repeats: int) -> list[str]:
  xla, pal = make_fns("xla"), make_fns("pallas")
  rows = ["| N | " + " | ".join(f"{k} XLA ms | {k} Pallas ms" for k in NAMES) + " |",
          "|---:|" + "---:|" * (2 * len(NAMES))]
  print("\n".join(rows), flush=True)
  for n in ns:
    t = [wall_ms(f[k], n, repeats) for k in NAMES for f in (xla, pal)]
    rows.append("| " + " | ".join([str(n)] + [f"{x:.1f}" for x in t]) + " |")
    print(rows[-1], flush=True)
  return rows


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--ns", default="1024,2048,4096,8192")
  parser.add_argument("--time-ns", default="256,1024")
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args()
  print(machine())
  print("command: python " + " ".join(shlex.quote(a) for a in sys.argv))
  print(f"B={B} H={H} D={D} float32; see the module docstring for the transforms.")
  print("impl='pallas' on CPU = interpret=True; block_q = block_k = 64.\n")
  print("Kernel launches (pallas_calls) per transform:")
  launch_table()
  print("\nCompiled peak temp memory, MB (temp_size_in_bytes / 2^20; see module docstring):")
  memory_table([int(n) for n in args.ns.split(",") if n])
  if args.time_ns:
    print(f"\nCPU wall clock, median of {args.repeats} after one warm-up run. Pallas runs in "
          "interpret mode (an XLA while loop over the grid): a correctness path, not a "
          "speed figure for GPU/TPU:")
    time_table([int(n) for n in args.time_ns.split(",")], args.repeats)
  print("\nGPU/TPU timings: not run (no accelerator available to this task).")


if __name__ == "__main__":
  main()
