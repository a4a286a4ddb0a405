"""Pallas attention whose JVP is one kernel, also under ``jax.grad`` (second order included).

Design
------
``pallas_attention`` is a ``jax.custom_jvp`` over four primitives (``_primitives``):

* value: ``fwd_p`` -- the flash forward kernel.
* ``jax.jvp``: ``jvp_p`` -- the one-pass online kernel returning ``(o, do, lse, mu)``
  (6 block matmuls, one read of K/V).
* ``jax.grad`` of anything built on ``jax.jvp(attention)`` (MeanFlow/sCM: through ``o`` with
  ``do`` under ``stop_gradient``; improved MeanFlow/TVM: through ``do``; or both): ``jvp_p``
  has a JVP rule whose tangent, ``jvp_lin_p``, is linear in all six inputs' tangents and
  transposes to the tangent-backward kernels (``jvp_backward``; the cotangent formulas are
  derived in its module docstring), or to the flash backward when ``do``'s cotangent is zero.
  So the forward is one kernel and the backward two, with no ``N x N`` buffer.
* plain ``jax.grad``/``jax.linearize`` of attention: linearising the custom_jvp rule
  partially evaluates ``jvp_p`` with known ``(q, k, v)`` and unknown tangents; a custom
  partial-eval rule splits it into a known ``fwd_p`` and a staged ``tangent_p`` (the flash
  tangent kernel, linear in ``(dq, dk, dv)``) whose transpose is the flash backward. The same
  split is registered for ``partial_eval_jaxpr_custom``, so ``jax.checkpoint`` works.

Kernel launches per transform (``pallas_call``s; counted in ``tests/pallas``)::

    value 1 | jvp 1 | grad 3 | grad through primal of jvp 3 | through tangent 3 | both 3

Why this shape (checked on jax 0.10.2; ``docs/pallas.md`` has the details):
``jax.experimental.hijax.VJPHiPrimitive`` (``expand`` / ``jvp`` / ``vjp_fwd`` +
``vjp_bwd`` / ``lin`` / ``batch``) expresses the same one-pass rules, and under direct
linearisation (the 0.10 default for ``jax.grad``, ``lax.scan``, ``shard_map``) it gives the
same kernel counts. But ``jax.checkpoint`` (without ``jax_remat3``) still linearises by
jvp + partial evaluation, where a fused primitive's primal cannot be separated from its
tangent, and every hijax primitive shares one ``call_hi_primitive_p``, so no per-primitive
partial-eval rule can fix that: plain ``jax.grad`` through ``jax.checkpoint`` fails. Plain
primitives with a partial-eval rule cover both.

Works with: ``jax.grad``/``vjp``, ``jax.jvp``/``linearize``, grad of a jvp through its
primal and/or tangent, ``jit``, ``vmap`` (the primitives fold mapped axes into the batch
axis), ``jax.checkpoint``, ``lax.scan``, ``shard_map`` with the default ``check_vma`` (outputs
vary over the inputs' manual axes), float32 and bfloat16 (float32 accumulation),
self- and cross-attention (``Nq != Nk``), grouped-query heads (k/v with fewer heads than
q), key masks, causal masks.

Limits
------
* No third derivatives: jvp-of-jvp, Hessian-vector products and grad-of-grad raise
  ``NotImplementedError`` (``HIGHER_ORDER_MSG``); use ``impl='xla'``.
* Under ``jax.checkpoint``, plain ``jax.grad`` saves ``o`` and the logsumexp (O(N)) whatever
  the policy, instead of recomputing the forward kernel.
* Outside the kernels (plain XLA, O(N)): row statistics (``delta``, ``beta``), zero-padding of
  unaligned sequence lengths / head dims, the int32 key-validity row, and on TPU the
  head-major transposes.
* Portability: only generic Pallas ops. On GPU the kernels request the Triton backend
  explicitly (jax 0.10 defaults Pallas GPU to Mosaic GPU). Lowering to Triton (CUDA) and to
  Mosaic (TPU) is checked on CPU with ``jax.export``; no kernel was compiled or run on a GPU
  or TPU in this work. ``interpret=True`` (CPU) is tested.
"""
from __future__ import annotations

import functools

import jax

from fmdistill.pallas import _common as cm
from fmdistill.pallas._common import Spec
from fmdistill.pallas._primitives import fwd_p, jvp_p


@functools.partial(jax.custom_jvp, nondiff_argnums=(4,))
def fused_attention(q: jax.Array, k: jax.Array, v: jax.Array, kvalid: jax.Array,
                    spec: Spec) -> jax.Array:
  """Flash attention on ``(B, N, H, D)`` with kvalid ``(B, Nk)`` int32; see module doc."""
  return fwd_p.bind(q, k, v, kvalid, spec=spec)[0]


@fused_attention.defjvp
def _fused_attention_jvp(spec: Spec, primals, tangents):
  q, k, v, kvalid = primals
  dq, dk, dv, _ = tangents
  o, do, _, _ = jvp_p.bind(q, k, v, kvalid, dq, dk, dv, spec=spec)
  return o, do


def pallas_attention(q: jax.Array, k: jax.Array, v: jax.Array, *,
                     key_mask: jax.Array | None = None, causal: bool = False,
                     scale: float | None = None, block_q: int | None = None,
                     block_k: int | None = None, interpret: bool = False,
                     head_major: bool | None = None) -> jax.Array:
  """Pallas flash attention with grad, jvp and grad of a jvp (primal and tangent).

  q ``(B, Nq, H, D)``, k/v ``(B, Nk, Hkv, D)`` (``Hkv`` divides ``H``), key_mask ``(B, Nk)``
  bool (True = attend) -> ``(B, Nq, H, D)`` in q's dtype.
  """
  spec = cm.make_spec(q, k, causal=causal, scale=scale, block_q=block_q, block_k=block_k,
                      interpret=interpret, head_major=head_major)
  return fused_attention(q, k, v, cm.default_kvalid(k, key_mask), spec)


def attention_jvp(q: jax.Array, k: jax.Array, v: jax.Array, dq: jax.Array, dk: jax.Array,
                  dv: jax.Array, *, key_mask: jax.Array | None = None, causal: bool = False,
                  scale: float | None = None, block_q: int | None = None,
                  block_k: int | None = None, interpret: bool = False,
                  head_major: bool | None = None) -> tuple[jax.Array, jax.Array]:
  """``(o, do) = jax.jvp(attention, (q, k, v), (dq, dk, dv))``: the one-pass kernel.

  Shapes as ``pallas_attention``; dq like q, dk/dv like k/v. Differentiable in all six
  inputs (the same rules as ``jax.jvp`` of ``pallas_attention``).
  """
  spec = cm.make_spec(q, k, causal=causal, scale=scale, block_q=block_q, block_k=block_k,
                      interpret=interpret, head_major=head_major)
  o, do, _, _ = jvp_p.bind(q, k, v, cm.default_kvalid(k, key_mask), dq, dk, dv, spec=spec)
  return o, do
