"""Helpers shared by the benchmark scripts: the machine line, compiled cost and warm timing."""
from __future__ import annotations

import os
import platform
import sys
import time
from typing import Any, Callable

import jax
import numpy as np


def entry(main: Callable[[], Any]) -> None:
  """Run a script's ``main`` the way ``python -m fmdistill.main`` runs a job: SIGTERM during a
  training (the run saved its checkpoint; a rerun resumes) is one line on stderr and exit 0; an
  error the user can fix (bad config or field, missing or unfinished teacher, bad workdir, a
  missing file: ``ValueError``/``OSError``) is one ``error:`` line and exit 2."""
  from fmdistill.errors import Preempted, one_line
  try:
    main()
  except Preempted as e:
    print(str(e), file=sys.stderr)
    sys.exit(0)
  except (ValueError, OSError) as e:
    print(f"error: {one_line(e)}", file=sys.stderr)
    sys.exit(2)


def machine() -> str:
  """One line naming the host, its CPU, the visible CPUs, jax and the device."""
  dev = jax.devices()[0]
  return (f"{platform.node()} | {platform.processor() or platform.machine()} | "
          f"{os.cpu_count()} CPUs visible | jax {jax.__version__} | {dev.platform}:"
          f" {dev.device_kind}")


def compile_stats(fn: Callable, *args) -> tuple[Any, dict]:
  """``(compiled, stats)`` of a jitted ``fn`` on ``args``: ``compile_s`` (lowering and XLA
  compilation, seconds), ``flops`` (``cost_analysis``; XLA counts a loop body once, so a
  ``scan``/``fori_loop`` is under-counted) and ``temp_bytes``
  (``memory_analysis().temp_size_in_bytes``)."""
  t0 = time.perf_counter()
  compiled = fn.lower(*args).compile()
  compile_s = time.perf_counter() - t0
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  mem = compiled.memory_analysis()
  return compiled, dict(compile_s=compile_s, flops=float((cost or {}).get("flops", np.nan)),
                        temp_bytes=float(mem.temp_size_in_bytes if mem is not None else np.nan))


def time_warm(call: Callable[[], Any], reps: int) -> float:
  """Median wall seconds of ``reps`` calls of ``call`` (blocked on its result) after one
  untimed warm-up call."""
  jax.block_until_ready(call())
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(call())
    times.append(time.perf_counter() - t0)
  return float(np.median(times))


def time_round_robin(items: list, reps: int) -> list[float]:
  """Median seconds per call of each ``(compiled, args)``, timed in interleaved rounds so that
  drift in the machine's speed affects every item alike."""
  times = [[] for _ in items]
  for _ in range(reps):
    for i, (compiled, args) in enumerate(items):
      t0 = time.perf_counter()
      jax.block_until_ready(compiled(*args))
      times[i].append(time.perf_counter() - t0)
  return [float(np.median(t)) for t in times]
