"""Flash JVP kernels: the attention tangent ``do`` without materialising ``N x N`` matrices.

With ``S = q k^T * scale``, ``dS = (dq k^T + q dk^T) * scale`` and ``P = softmax(S)``::

    o  = P v
    do = P dv + (P * dS) v - rowsum(P * dS) * o

(from ``dP = P * (dS - rowsum(P * dS))``). Two kernels, both one pass over key blocks per
query block, and both also return ``mu = rowsum(P * dS)`` (float32 ``(B, H, Nq)``), the
row statistic the tangent-backward kernels (``jvp_backward``) need:

* ``_tangent``: given the forward's ``o`` and ``lse``, ``P = exp(S - lse)`` is exact per
  block, so no running max is needed (5 block matmuls); ``-rowsum(P dS) o`` is subtracted
  block by block. It runs when the tangent is separated from the primal: ``jax.linearize``
  and plain ``jax.grad`` (see ``_partial_eval``), where its transpose is the flash backward.
* ``_online``: o and do together from scratch with the online softmax trick (6 block
  matmuls, one kernel, one read of K/V): running max ``m``, sum ``l``, ``acc_o = sum p v``,
  ``acc_t = sum p dv + (p * dS) v``, ``mu = sum p * dS`` (all rescaled by
  ``exp(m_old - m_new)``); finally ``o = acc_o / l`` and ``do = acc_t / l - (mu / l) o``.
  This is what ``jax.jvp`` of the public attention runs, also inside ``jax.grad``.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from fmdistill.pallas import _common as cm
from fmdistill.pallas._common import Spec


def _key_rows(spec: Spec, k_ref, dk_ref, v_ref, dv_ref, valid_ref):
  rows = tuple(cm.Rows(r, spec.interpret) for r in (k_ref, dk_ref, v_ref, dv_ref))
  return rows + (cm.valid_rows(valid_ref, spec.interpret),)


def _block_scores(q, dq, k_rows, dk_rows, valid_rows, ks, q_start, k_start, spec: Spec):
  """Masked ``S`` and ``dS`` for one ``(bq, bk)`` block (float32)."""
  k = k_rows[ks]
  s = cm.masked_scores(q, k, valid_rows[ks], q_start, k_start, spec.scale, spec.causal)
  ds = (cm.dot_t(dq, k) + cm.dot_t(q, dk_rows[ks])) * spec.scale
  return s, ds


def _tangent_kernel(q_ref, dq_ref, o_ref, lse_ref, k_ref, dk_ref, v_ref, dv_ref, valid_ref,
                    do_ref, mu_ref, *, spec: Spec):
  """Grid ``(B, H, Nq_pad // bq)``; q/dq/o/do tiles ``(bq, D)``, lse/mu ``(bq, 1)``, keys
  whole ``(Nk_pad, D)``, validity ``(1, Nk_pad)``."""
  bq, bk = spec.block_q, spec.block_k
  qb = pl.program_id(2)
  q, dq, lse = q_ref[...], dq_ref[...], lse_ref[...]
  kr, dkr, vr, dvr, validr = _key_rows(spec, k_ref, dk_ref, v_ref, dv_ref, valid_ref)
  o = o_ref[...].astype(jnp.float32)

  def body(j, carry):
    acc, mu = carry
    ks = pl.ds(j * bk, bk)
    s, ds = _block_scores(q, dq, kr, dkr, validr, ks, qb * bq, j * bk, spec)
    p = jnp.exp(s - lse)  # lse = +inf on empty rows -> p = 0
    pds = p * ds
    v, dv = vr[ks], dvr[ks]
    # The -rowsum(P dS) o term is linear in the blocks, so it is subtracted per block (one
    # (bq, D) FMA). Keeping every use of the loaded o inside the loop also keeps interpret
    # mode under shard_map's check_vma happy (see ``_common.Rows``).
    mu_j = jnp.sum(pds, axis=1, keepdims=True)
    acc = (acc + cm.dot(p.astype(dv.dtype), dv) + cm.dot(pds.astype(v.dtype), v) - mu_j * o)
    return acc, mu + mu_j

  nkb = cm.num_k_blocks(qb, bq, bk, k_ref.shape[0], spec.causal)
  init = (jnp.zeros((bq, v_ref.shape[-1]), jnp.float32), jnp.zeros((bq, 1), jnp.float32))
  acc, mu = lax.fori_loop(0, nkb, body, init)
  do_ref[...] = acc.astype(do_ref.dtype)
  mu_ref[...] = mu


def _online_kernel(q_ref, dq_ref, k_ref, dk_ref, v_ref, dv_ref, valid_ref,
                   o_ref, do_ref, lse_ref, mu_ref, *, spec: Spec):
  """Grid ``(B, H, Nq_pad // bq)``: o, do, lse and mu in one online-softmax pass."""
  bq, bk = spec.block_q, spec.block_k
  qb = pl.program_id(2)
  q, dq = q_ref[...], dq_ref[...]
  kr, dkr, vr, dvr, validr = _key_rows(spec, k_ref, dk_ref, v_ref, dv_ref, valid_ref)

  def body(j, carry):
    acc_o, acc_t, mu, m, l = carry
    ks = pl.ds(j * bk, bk)
    s, ds = _block_scores(q, dq, kr, dkr, validr, ks, qb * bq, j * bk, spec)
    m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
    m_safe = jnp.where(m_new == cm.NEG_INF, 0.0, m_new)
    alpha = jnp.exp(m - m_safe)
    p = jnp.exp(s - m_safe)
    pds = p * ds
    v, dv = vr[ks], dvr[ks]
    acc_o = alpha * acc_o + cm.dot(p.astype(v.dtype), v)
    acc_t = alpha * acc_t + cm.dot(p.astype(dv.dtype), dv) + cm.dot(pds.astype(v.dtype), v)
    mu = alpha * mu + jnp.sum(pds, axis=1, keepdims=True)
    return acc_o, acc_t, mu, m_new, alpha * l + jnp.sum(p, axis=1, keepdims=True)

  d = v_ref.shape[-1]
  zrow = jnp.zeros((bq, 1), jnp.float32)
  init = (jnp.zeros((bq, d), jnp.float32), jnp.zeros((bq, d), jnp.float32), zrow,
          jnp.full((bq, 1), cm.NEG_INF, jnp.float32), zrow)
  nkb = cm.num_k_blocks(qb, bq, bk, k_ref.shape[0], spec.causal)
  acc_o, acc_t, mu, m, l = lax.fori_loop(0, nkb, body, init)
  empty = l == 0.0
  l_safe = jnp.where(empty, 1.0, l)
  o = acc_o / l_safe
  o_ref[...] = o.astype(o_ref.dtype)
  do_ref[...] = (acc_t / l_safe - (mu / l_safe) * o).astype(do_ref.dtype)
  lse_ref[...] = jnp.where(empty, cm.POS_INF, m + jnp.log(l_safe))
  mu_ref[...] = mu / l_safe


def _tangent(q: jax.Array, k: jax.Array, v: jax.Array, kvalid: jax.Array, o: jax.Array,
             lse: jax.Array, dq: jax.Array, dk: jax.Array, dv: jax.Array,
             spec: Spec) -> tuple[jax.Array, jax.Array]:
  """Tangent of attention at (q, k, v) along (dq, dk, dv), given the forward's o and lse.

  q/o/dq ``(B, Nq, H, D)``, k/v/dk/dv ``(B, Nk, H, D)``, kvalid ``(B, Nk)``,
  lse ``(B, H, Nq)`` -> do ``(B, Nq, H, D)`` in q's dtype and mu = rowsum(P * dS)
  ``(B, H, Nq)`` float32.
  """
  g = cm.Geometry.of(q, k, spec)
  qs = [g.q_in(x) for x in (q, dq, o)]
  blk_q, full_k, blk_row = g.seq_block(g.bq), g.seq_full(g.nk_p, kv=True), g.row_block(g.bq)
  do, mu = pl.pallas_call(
      functools.partial(_tangent_kernel, spec=spec),
      grid=g.grid_q,
      in_specs=[blk_q, blk_q, blk_q, blk_row, full_k, full_k, full_k, full_k,
                g.valid_full(g.nk_p)],
      out_specs=[blk_q, blk_row],
      out_shape=[cm.out_struct(qs[0].shape, q.dtype, qs[0]),
                 cm.out_struct((g.b, g.h, g.nq_p, 1), jnp.float32, qs[0])],
      interpret=spec.interpret,
      compiler_params=cm.compiler_params(spec),
      name="fmdistill_flash_tangent",
  )(*qs, g.rows_in(lse, cm.POS_INF), *(g.k_in(x) for x in (k, dk, v, dv)),
    g.valid_in(kvalid))
  return g.q_out(do), g.rows_out(mu)


def _online(q: jax.Array, k: jax.Array, v: jax.Array, kvalid: jax.Array, dq: jax.Array,
            dk: jax.Array, dv: jax.Array, spec: Spec
            ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """One-pass fused JVP -> o, do ``(B, Nq, H, D)`` (q's dtype), lse and mu ``(B, H, Nq)``
  float32."""
  g = cm.Geometry.of(q, k, spec)
  qp = g.q_in(q)
  blk_q, full_k, blk_row = g.seq_block(g.bq), g.seq_full(g.nk_p, kv=True), g.row_block(g.bq)
  row = cm.out_struct((g.b, g.h, g.nq_p, 1), jnp.float32, qp)
  o, do, lse, mu = pl.pallas_call(
      functools.partial(_online_kernel, spec=spec),
      grid=g.grid_q,
      in_specs=[blk_q, blk_q, full_k, full_k, full_k, full_k, g.valid_full(g.nk_p)],
      out_specs=[blk_q, blk_q, blk_row, blk_row],
      out_shape=[cm.out_struct(qp.shape, q.dtype, qp),
                 cm.out_struct(qp.shape, q.dtype, qp), row, row],
      interpret=spec.interpret,
      compiler_params=cm.compiler_params(spec),
      name="fmdistill_flash_jvp_online",
  )(qp, g.q_in(dq), *(g.k_in(x) for x in (k, dk, v, dv)), g.valid_in(kvalid))
  return g.q_out(o), g.q_out(do), g.rows_out(lse), g.rows_out(mu)
