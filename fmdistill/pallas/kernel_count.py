"""Count the Pallas kernel launches (``pallas_call``s) of a traced function.

``jax.make_jaxpr`` shows the attention primitives (``_primitives``), not the kernels they lower
to, so each of them is expanded by tracing its implementation on the equation's operand
shapes; sub-jaxprs (``jit``, ``custom_jvp``, ``scan``, ``checkpoint``, ...) are walked
recursively. A ``pallas_call`` inside a loop body counts once.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import jax
from jax.extend import core as jcore

from fmdistill.pallas import _primitives as prims


def _impls() -> dict:
  return {p: p.impl for p in prims.PRIMITIVES}


def count_in_jaxpr(jaxpr: jcore.Jaxpr) -> int:
  """``pallas_call`` equations in ``jaxpr``, attention primitives expanded."""
  impls = _impls()
  n = 0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "pallas_call":
      n += 1
    elif eqn.primitive in impls:
      avals = [jax.ShapeDtypeStruct(x.aval.shape, x.aval.dtype) for x in eqn.invars]
      inner = jax.make_jaxpr(functools.partial(impls[eqn.primitive], **eqn.params))(*avals)
      n += count_in_jaxpr(inner.jaxpr)
    for sub in jcore.jaxprs_in_params(eqn.params):
      n += count_in_jaxpr(sub)
  return n


def pallas_call_count(fn: Callable[..., Any], *args: Any) -> int:
  """Kernel launches of ``fn(*args)`` (arrays or ``jax.ShapeDtypeStruct``s); nothing runs."""
  return count_in_jaxpr(jax.make_jaxpr(fn)(*args).jaxpr)
