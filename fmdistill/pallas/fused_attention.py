"""Pallas attention with a fused JVP rule that also works under ``jax.grad``.

Design
------
``pallas_attention`` is a ``jax.custom_jvp`` whose rule builds the tangent out of two
differentiable pieces:

* ``(o, lse) = flash_forward(q, k, v)`` -- a ``jax.custom_vjp`` over the flash forward kernel
  whose backward is the flash backward kernels (dQ; dK, dV). This is what gives the *primal*
  output its gradient when a forward-mode call sits inside reverse mode (MeanFlow / sCM:
  ``o, do = jax.jvp(net, ...)`` inside a loss differentiated through ``o``).
* ``do = tangent_p(q, k, v, sg(o), sg(lse); dq, dk, dv)`` -- a custom primitive, linear in
  ``(dq, dk, dv)``. Its implementation is the flash tangent kernel (one pass over key blocks
  using the saved lse). Its transpose is the flash backward kernel: the tangent map of
  attention is linear in the input tangents and its transpose *is* the VJP of attention at
  ``(q, k, v)``. So ``jax.grad`` of plain attention goes jvp -> linearize -> transpose and ends
  in the flash backward, with no ``N x N`` tensor anywhere.

Why this shape (checked on jax 0.10.2): a single fused Pallas kernel inside the custom_jvp
rule breaks ``jax.grad`` (linearize cannot separate its primal output from its tangent
inputs); a custom_jvp around a custom_vjp ignores the inner VJP; a custom_vjp around a
custom_jvp breaks ``jax.jvp``; ``pallas_call`` has no transpose rule.

Works with: ``jax.grad``/``vjp``, ``jax.jvp``/``linearize``, grad through the primal of a
jvp with the tangent under ``stop_gradient`` (MeanFlow, sCM), ``jit``, ``vmap`` (the tangent
primitive folds vmapped axes into the batch axis; pallas_call batches the rest),
``jax.checkpoint``, ``lax.scan``, ``shard_map`` with the default ``check_vma`` (kernel
outputs carry the inputs' manual axes), float32 and bfloat16 (float32 accumulation).

Cost and limits
---------------
* ``jax.jvp(attention)`` runs two kernels (flash forward, then the tangent kernel): 7 block
  matmuls and two reads of K/V, against 6 matmuls and one read for the one-pass online
  kernel ``flash_jvp.attention_jvp`` (exposed for forward-only use; not differentiable).
  Fusing the two under ``jax.grad`` needs custom partial-eval rules on JAX internals; not
  done, and not measurable here (no GPU in this task).
* Second-order terms are not implemented. The derivative of the tangent ``do`` with respect
  to ``(q, k, v)`` is emitted as a placeholder primitive that raises ``NotImplementedError``
  only if actually needed (grad through ``do`` w.r.t. q/k/v); with the tangent under
  ``stop_gradient`` its cotangent is zero and it is never evaluated. Gradients through
  ``do`` w.r.t. the *tangent inputs* work (linear). jvp-of-jvp and forward-over-reverse
  (Hessian-vector products) fail with JAX's "can't apply forward-mode autodiff (jvp) to a
  custom_vjp function"; grad-of-grad with "Linearization failed to produce known values".
  Use ``impl='xla'`` for those.
* Outside the kernels (plain XLA, O(N)): ``delta = rowsum(o * do)``, zero-padding of
  unaligned sequence lengths / head dims, the int32 key-validity row, and on TPU the
  head-major transposes.
* Portability: only generic Pallas ops. On GPU the kernels request the Triton backend
  explicitly (jax 0.10 defaults Pallas GPU to Mosaic GPU). Lowering to Triton (CUDA) and to
  Mosaic (TPU, head-major layout, 128 blocks) is checked on CPU with ``jax.export``; neither
  was compiled or run on hardware in this task. ``interpret=True`` (CPU) is tested.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

from fmdistill.pallas import _common as cm
from fmdistill.pallas import flash_attention as fa
from fmdistill.pallas import flash_jvp as fj
from fmdistill.pallas._common import Spec

_NONLIN = 6  # operands (q, k, v, kvalid, o, lse); then the linear (dq, dk, dv)
_SECOND_ORDER_ARGS = (0, 1, 2, 4, 5)  # differentiable non-linear operands

SECOND_ORDER_MSG = (
    "fmdistill.pallas.attention(impl='pallas'): the derivative of the attention *tangent* "
    "(jax.jvp output) with respect to q, k or v is not implemented (a second-order term, "
    "needed when differentiating through the tangent). MeanFlow/sCM losses put the tangent "
    "under jax.lax.stop_gradient, which never needs it; otherwise use impl='xla'.")


# ---------------------------------------------------------------- tangent primitive

tangent_p = Primitive("fmdistill_flash_attention_tangent")
second_order_p = Primitive("fmdistill_flash_attention_tangent_second_order")


def _out_aval(q, k, v, kvalid, o, lse, *rest, spec: Spec):
  """``do`` aval: o's shape and dtype, varying over every operand's manual axes."""
  del spec
  avals = (q, k, v, kvalid, o, lse, *rest)
  varying = frozenset().union(*(a.manual_axis_type.varying for a in avals))
  mat = o.manual_axis_type
  if varying != mat.varying:
    mat = mat.update(varying=varying)
  return o.update(shape=q.shape[:-1] + (v.shape[-1],), dtype=q.dtype, weak_type=False,
                  manual_axis_type=mat)


def _tangent_impl(q, k, v, kvalid, o, lse, dq, dk, dv, *, spec: Spec):
  return fj._tangent(q, k, v, kvalid, o, lse, dq, dk, dv, spec)


def _tangent_jvp(primals, tangents, *, spec: Spec):
  out = tangent_p.bind(*primals, spec=spec)
  t_out = None
  lin = tangents[_NONLIN:]
  if any(type(t) is not ad.Zero for t in lin):
    lin = [ad.instantiate_zeros(t) for t in lin]
    t_out = tangent_p.bind(*primals[:_NONLIN], *lin, spec=spec)
  second = [tangents[i] for i in _SECOND_ORDER_ARGS]
  if any(type(t) is not ad.Zero for t in second):
    extra = second_order_p.bind(*primals, *map(ad.instantiate_zeros, second), spec=spec)
    t_out = extra if t_out is None else t_out + extra
  return out, (ad.Zero.from_primal_value(out) if t_out is None else t_out)


def _tangent_transpose(ct, q, k, v, kvalid, o, lse, dq, dk, dv, *, spec: Spec):
  if any(ad.is_undefined_primal(x) for x in (q, k, v, kvalid, o, lse)):
    raise ValueError("fmdistill_flash_attention_tangent is linear only in (dq, dk, dv)")
  lin = (dq, dk, dv)
  if type(ct) is ad.Zero:
    return [None] * (_NONLIN + 3)
  grads = fa._backward(q, k, v, kvalid, o, lse, ct, None, spec)
  return [None] * _NONLIN + [g if ad.is_undefined_primal(x) else None
                             for g, x in zip(grads, lin)]


def _fold(x, d, size: int):
  """Moves the vmapped axis ``d`` (or a broadcast one) to the front and merges it into B."""
  x = jnp.broadcast_to(x, (size,) + x.shape) if d is None else jnp.moveaxis(x, d, 0)
  return x.reshape((size * x.shape[1],) + x.shape[2:])


def _tangent_batch(args, dims, *, spec: Spec):
  size = next(a.shape[d] for a, d in zip(args, dims) if d is not None)
  out = tangent_p.bind(*(_fold(a, d, size) for a, d in zip(args, dims)), spec=spec)
  return out.reshape((size, -1) + out.shape[1:]), 0


tangent_p.def_impl(_tangent_impl)
tangent_p.def_abstract_eval(_out_aval)
mlir.register_lowering(tangent_p, mlir.lower_fun(_tangent_impl, multiple_results=False))
ad.primitive_jvps[tangent_p] = _tangent_jvp
ad.primitive_transposes[tangent_p] = _tangent_transpose
batching.primitive_batchers[tangent_p] = _tangent_batch


# ---------------------------------------------------------------- second-order placeholder

def _second_order_impl(*args, spec: Spec):
  raise NotImplementedError(SECOND_ORDER_MSG)


def _second_order_jvp(primals, tangents, *, spec: Spec):
  out = second_order_p.bind(*primals, spec=spec)
  return out, second_order_p.bind(*primals, spec=spec)


def _second_order_transpose(ct, *args, spec: Spec):
  if type(ct) is not ad.Zero:
    raise NotImplementedError(SECOND_ORDER_MSG)
  return [None] * len(args)


def _second_order_batch(args, dims, *, spec: Spec):
  size = next(a.shape[d] for a, d in zip(args, dims) if d is not None)
  args = [jnp.broadcast_to(a, (size,) + a.shape) if d is None else jnp.moveaxis(a, d, 0)
          for a, d in zip(args, dims)]
  return second_order_p.bind(*args, spec=spec), 0


second_order_p.def_impl(_second_order_impl)
second_order_p.def_abstract_eval(_out_aval)
mlir.register_lowering(second_order_p,
                       mlir.lower_fun(_second_order_impl, multiple_results=False))
ad.primitive_jvps[second_order_p] = _second_order_jvp
ad.primitive_transposes[second_order_p] = _second_order_transpose
batching.primitive_batchers[second_order_p] = _second_order_batch


# ---------------------------------------------------------------- custom_jvp attention

@functools.partial(jax.custom_jvp, nondiff_argnums=(4,))
def fused_attention(q: jax.Array, k: jax.Array, v: jax.Array, kvalid: jax.Array,
                    spec: Spec) -> jax.Array:
  """Flash attention on ``(B, N, H, D)`` with kvalid ``(B, Nk)`` int32; see module doc."""
  return fa.flash_forward(q, k, v, kvalid, spec)[0]


@fused_attention.defjvp
def _fused_attention_jvp(spec: Spec, primals, tangents):
  q, k, v, kvalid = primals
  dq, dk, dv, _ = tangents
  o, lse = fa.flash_forward(q, k, v, kvalid, spec)
  do = tangent_p.bind(q, k, v, kvalid, lax.stop_gradient(o), lax.stop_gradient(lse),
                      dq, dk, dv, spec=spec)
  return o, do


def pallas_attention(q: jax.Array, k: jax.Array, v: jax.Array, *,
                     key_mask: jax.Array | None = None, causal: bool = False,
                     scale: float | None = None, block_q: int | None = None,
                     block_k: int | None = None, interpret: bool = False,
                     head_major: bool | None = None) -> jax.Array:
  """Pallas flash attention with grad, jvp and grad-of-jvp (tangent under stop_gradient).

  q ``(B, Nq, H, D)``, k/v ``(B, Nk, H, D)``, key_mask ``(B, Nk)`` bool (True = attend)
  -> ``(B, Nq, H, D)`` in q's dtype.
  """
  spec = cm.make_spec(q, k, causal=causal, scale=scale, block_q=block_q, block_k=block_k,
                      interpret=interpret, head_major=head_major)
  return fused_attention(q, k, v, cm.default_kvalid(k, key_mask), spec)
