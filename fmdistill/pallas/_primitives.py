"""The four primitives behind ``pallas_attention`` and their rules (design: ``fused_attention``).

=============  ==========================================================  ==================
primitive      operands -> results                                         kernels (impl)
=============  ==========================================================  ==================
``fwd_p``      ``(q, k, v, kvalid) -> (o, lse)``                           flash forward
``jvp_p``      ``(q, k, v, kvalid, dq, dk, dv) -> (o, do, lse, mu)``       one-pass online JVP
``tangent_p``  ``(q, k, v, kvalid, o, lse, dq, dk, dv) -> (do, mu)``       flash tangent
``jvp_lin_p``  ``(q, k, v, kvalid, dq, dk, dv, o, do, lse, mu; t_q, t_k,   none (transpose
               t_v, t_dq, t_dk, t_dv) -> (t_o, t_do)``                     only)
=============  ==========================================================  ==================

Shapes: q/o/do ``(B, Nq, H, D)``, k/v ``(B, Nk, Hkv, D)``, kvalid ``(B, Nk)`` int32, lse/mu
``(B, H, Nq)`` float32 with ``mu = rowsum(P * dS)``. lse and mu are residual outputs: their
tangents are zero (like ``stop_gradient``); only the internal rules consume them.

Rules:

* ``jvp_p`` JVP: ``jvp_lin_p``, linear in the six ``t_*`` operands; its transpose is the
  tangent-backward pair of kernels (``jvp_backward``), or the flash backward when the ``do``
  cotangent is zero (MeanFlow/sCM: tangent under ``stop_gradient``). This is how ``jax.grad``
  of anything built on ``jax.jvp(attention)`` runs one forward kernel and two backward ones.
* ``jvp_p`` partial evaluation with known ``(q, k, v)`` and unknown ``(dq, dk, dv)`` (plain
  ``jax.grad``/``jax.linearize`` of attention, also under ``jax.checkpoint``): split into a
  known ``fwd_p`` and a staged ``tangent_p``, whose transpose is the flash backward. Both the
  ``JaxprTrace`` rule and the ``partial_eval_jaxpr_custom`` rule (used by ``jax.checkpoint``)
  are registered.
* ``vmap``: every primitive folds the mapped axis into the batch axis.
* Higher order (a JVP of ``fwd_p``/``tangent_p``/``jvp_lin_p`` in their non-linear operands,
  evaluating ``jvp_lin_p``) raises ``NotImplementedError``: jvp-of-jvp, Hessian-vector
  products and grad-of-grad are not supported.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.extend.core import DropVar, Primitive, Var
from jax.interpreters import ad, batching, mlir
from jax.interpreters import partial_eval as pe

from fmdistill.pallas import flash_attention as fa
from fmdistill.pallas import flash_jvp as fj
from fmdistill.pallas.jvp_backward import jvp_backward

HIGHER_ORDER_MSG = (
    "fmdistill.pallas.attention(impl='pallas') supports value, jax.grad, jax.jvp and "
    "jax.grad of a jax.jvp (through the primal and the tangent); a third derivative "
    "(jvp-of-jvp, a Hessian-vector product, grad-of-grad) is not implemented. Use "
    "impl='xla' for those.")

fwd_p = Primitive("fmdistill_attention_fwd")
jvp_p = Primitive("fmdistill_attention_jvp")
tangent_p = Primitive("fmdistill_attention_tangent")
jvp_lin_p = Primitive("fmdistill_attention_jvp_lin")
PRIMITIVES = (fwd_p, jvp_p, tangent_p, jvp_lin_p)
for _p in PRIMITIVES:
  _p.multiple_results = True

_N_RES = 11  # jvp_lin_p: residual operands before the six linear ones


# ---------------------------------------------------------------- abstract evaluation

def _avals(q, v, avals, n_seq: int, n_row: int) -> list:
  """``n_seq`` avals like o, then ``n_row`` float32 row statistics ``(B, H, Nq)``; all
  varying over every operand's manual axes (for ``shard_map``'s ``check_vma``)."""
  varying = frozenset().union(*(a.manual_axis_type.varying for a in avals))
  mat = q.manual_axis_type
  if varying != mat.varying:
    mat = mat.update(varying=varying)
  seq = q.update(shape=q.shape[:-1] + (v.shape[-1],), dtype=q.dtype, weak_type=False,
                 manual_axis_type=mat)
  row = q.update(shape=(q.shape[0], q.shape[2], q.shape[1]), dtype=jnp.float32,
                 weak_type=False, manual_axis_type=mat)
  return [seq] * n_seq + [row] * n_row


fwd_p.def_abstract_eval(lambda *a, spec: _avals(a[0], a[2], a, 1, 1))
jvp_p.def_abstract_eval(lambda *a, spec: _avals(a[0], a[2], a, 2, 2))
tangent_p.def_abstract_eval(lambda *a, spec: _avals(a[0], a[2], a, 1, 1))
jvp_lin_p.def_abstract_eval(lambda *a, spec: _avals(a[0], a[2], a, 2, 0))


# ---------------------------------------------------------------- implementations

def _fwd_impl(q, k, v, kvalid, *, spec):
  return list(fa._forward(q, k, v, kvalid, spec))


def _jvp_impl(q, k, v, kvalid, dq, dk, dv, *, spec):
  return list(fj._online(q, k, v, kvalid, dq, dk, dv, spec))


def _tangent_impl(q, k, v, kvalid, o, lse, dq, dk, dv, *, spec):
  return list(fj._tangent(q, k, v, kvalid, o, lse, dq, dk, dv, spec))


def _jvp_lin_impl(*args, spec):
  raise NotImplementedError(HIGHER_ORDER_MSG)


for _p, _impl in ((fwd_p, _fwd_impl), (jvp_p, _jvp_impl), (tangent_p, _tangent_impl),
                  (jvp_lin_p, _jvp_lin_impl)):
  _p.def_impl(_impl)
  mlir.register_lowering(_p, mlir.lower_fun(_impl, multiple_results=True))


# ---------------------------------------------------------------- vmap

def _fold(x, d, size: int):
  """Moves the vmapped axis ``d`` (or a broadcast one) to the front and merges it into B."""
  x = jnp.broadcast_to(x, (size,) + x.shape) if d is None else jnp.moveaxis(x, d, 0)
  return x.reshape((size * x.shape[1],) + x.shape[2:])


def _batch_rule(prim: Primitive):
  def rule(args, dims, *, spec):
    size = next(a.shape[d] for a, d in zip(args, dims) if d is not None)
    outs = prim.bind(*(_fold(a, d, size) for a, d in zip(args, dims)), spec=spec)
    return [x.reshape((size, -1) + x.shape[1:]) for x in outs], [0] * len(outs)
  return rule


for _p in PRIMITIVES:
  batching.primitive_batchers[_p] = _batch_rule(_p)


# ---------------------------------------------------------------- forward mode

def _nonzero(tangents) -> bool:
  return any(type(t) is not ad.Zero for t in tangents)


def _zeros_like(outs) -> list:
  return [ad.Zero(jax.typeof(x).to_tangent_aval()) for x in outs]


def _jvp_jvp(primals, tangents, *, spec):
  """JVP of ``jvp_p``: ``jvp_lin_p`` in the six tangents (zero for lse and mu)."""
  outs = jvp_p.bind(*primals, spec=spec)
  lin = [tangents[i] for i in (0, 1, 2, 4, 5, 6)]
  if not _nonzero(lin):
    return outs, _zeros_like(outs)
  t_o, t_do = jvp_lin_p.bind(*primals, *outs, *map(ad.instantiate_zeros, lin), spec=spec)
  return outs, [t_o, t_do, *_zeros_like(outs[2:])]


def _tangent_jvp(primals, tangents, *, spec):
  """``tangent_p`` is linear in (dq, dk, dv); its derivative in the rest is higher order."""
  if _nonzero(tangents[:6]):
    raise NotImplementedError(HIGHER_ORDER_MSG)
  outs = tangent_p.bind(*primals, spec=spec)
  t_out = tangent_p.bind(*primals[:6], *map(ad.instantiate_zeros, tangents[6:]), spec=spec)
  return outs, t_out


def _higher_order_jvp(primals, tangents, *, spec):
  raise NotImplementedError(HIGHER_ORDER_MSG)


ad.primitive_jvps[fwd_p] = _higher_order_jvp
ad.primitive_jvps[jvp_p] = _jvp_jvp
ad.primitive_jvps[tangent_p] = _tangent_jvp
ad.primitive_jvps[jvp_lin_p] = _higher_order_jvp


# ---------------------------------------------------------------- transposes

def _check_linear(residuals, name: str) -> None:
  if any(ad.is_undefined_primal(x) for x in residuals):
    raise ValueError(f"{name} is linear only in its tangent operands")


def _only_undefined(grads, lin) -> list:
  return [g if ad.is_undefined_primal(x) else None for g, x in zip(grads, lin)]


def _tangent_transpose(cts, q, k, v, kvalid, o, lse, dq, dk, dv, *, spec):
  """Flash backward with the ``do`` cotangent (and ``mu``'s, folded into ``delta``)."""
  _check_linear((q, k, v, kvalid, o, lse), "fmdistill_attention_tangent")
  ct_do, ct_mu = cts
  if type(ct_do) is ad.Zero and type(ct_mu) is ad.Zero:
    return [None] * 9
  g = jnp.zeros(o.shape, o.dtype) if type(ct_do) is ad.Zero else ct_do
  dlse = None if type(ct_mu) is ad.Zero else ct_mu
  grads = fa._backward(q, k, v, kvalid, o, lse, g, dlse, spec)
  return [None] * 6 + _only_undefined(grads, (dq, dk, dv))


def _jvp_lin_transpose(cts, *args, spec):
  """Cotangents of the six tangents of ``jvp_p``'s operands from those of ``(o, do)``."""
  res, lin = args[:_N_RES], args[_N_RES:]
  _check_linear(res, "fmdistill_attention_jvp_lin")
  q, k, v, kvalid, dq, dk, dv, o, do, lse, mu = res
  ct_o, ct_do = cts
  go = None if type(ct_o) is ad.Zero else ct_o
  if type(ct_do) is not ad.Zero:
    grads = jvp_backward(q, k, v, kvalid, dq, dk, dv, o, do, lse, mu, go, ct_do, spec)
  elif go is not None:  # tangent under stop_gradient: the flash backward is enough
    grads = (*fa._backward(q, k, v, kvalid, o, lse, go, None, spec), None, None, None)
  else:
    grads = (None,) * 6
  return [None] * _N_RES + _only_undefined(grads, lin)


ad.primitive_transposes[tangent_p] = _tangent_transpose
ad.primitive_transposes[jvp_lin_p] = _jvp_lin_transpose


# ---------------------------------------------------------------- partial evaluation

def _split_mixed(unknown) -> bool:
  """Known (q, k, v, kvalid) and some unknown tangent: the case ``jvp_p`` splits."""
  return not any(unknown[:4]) and any(unknown[4:])


def _jvp_partial_eval(trace, *tracers, spec):
  """``JaxprTrace`` rule: known ``fwd_p`` + staged ``tangent_p`` in the mixed case."""
  unknown = [not t.pval.is_known() for t in tracers]
  if not _split_mixed(unknown):
    return trace.default_process_primitive(jvp_p, tracers, dict(spec=spec))
  q, k, v, kvalid = (t.pval.get_known() for t in tracers[:4])
  o, lse = fwd_p.bind(q, k, v, kvalid, spec=spec)
  do, mu = trace.default_process_primitive(
      tangent_p, [*tracers[:4], o, lse, *tracers[4:]], dict(spec=spec))
  return [o, do, lse, mu]


def _policy_saves(saveable, eqn) -> bool:
  """Whether a ``jax.checkpoint`` policy saves (rather than recomputes) ``eqn``'s outputs."""
  policy = saveable(eqn.primitive, *[x.aval for x in eqn.invars], **eqn.params)
  return policy is True or type(policy).__name__ in ("SaveableType", "Offloadable")


def _jvp_partial_eval_custom(saveable, unks_in, inst_in, eqn):
  """``partial_eval_jaxpr_custom`` rule (``jax.checkpoint``); other cases as for any
  primitive. In the mixed case o and lse are saved residuals (O(N)) whatever the policy."""
  n = len(eqn.outvars)
  uninst = [x for x, inst in zip(eqn.invars, inst_in) if isinstance(x, Var) and not inst]
  if any(unks_in) and not _split_mixed(unks_in):
    return None, eqn, [True] * n, [True] * n, uninst
  if not any(unks_in):
    if _policy_saves(saveable, eqn):
      return eqn, None, [False] * n, [False] * n, []
    return eqn, eqn, [False] * n, [True] * n, uninst
  o_var, do_var, lse_var, mu_var = eqn.outvars
  # o and lse are residuals, so they need real variables even where the outputs are dropped.
  o_var, lse_var = (Var(x.aval) if isinstance(x, DropVar) else x for x in (o_var, lse_var))
  known = eqn.replace(primitive=fwd_p, invars=eqn.invars[:4], outvars=[o_var, lse_var])
  staged = eqn.replace(primitive=tangent_p, outvars=[do_var, mu_var],
                       invars=[*eqn.invars[:4], o_var, lse_var, *eqn.invars[4:]])
  return known, staged, [False, True, False, True], [True] * 4, uninst + [o_var, lse_var]


pe.custom_partial_eval_rules[jvp_p] = _jvp_partial_eval
pe.partial_eval_jaxpr_custom_rules[jvp_p] = _jvp_partial_eval_custom
