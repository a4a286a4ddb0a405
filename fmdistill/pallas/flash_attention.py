"""Flash attention forward (online softmax, saves logsumexp) and backward (dQ; dK, dV) kernels.

Kernels read the model layout ``(B, N, H, D)`` in place on GPU (head-major on TPU; see
``_common``). One program handles one ``(batch, head, block)``; the key
(or query) loop runs inside the kernel, so nothing of size ``N x N`` is ever written to HBM.
Only generic Pallas ops are used (ref slicing, ``fori_loop``, ``dot_general``), so the same
kernels target Triton (GPU), Mosaic (TPU) or ``interpret=True`` (CPU).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from fmdistill.pallas import _common as cm
from fmdistill.pallas._common import Spec

# ---------------------------------------------------------------- forward


def _fwd_kernel(q_ref, k_ref, v_ref, valid_ref, o_ref, lse_ref, *, spec: Spec):
  """Grid ``(B, H, Nq_pad // bq)``; q/o tiles ``(bq, D)``, k/v whole ``(Nk_pad, D)``,
  validity ``(1, Nk_pad)``, lse tile ``(bq, 1)``."""
  bq, bk = spec.block_q, spec.block_k
  qb = pl.program_id(2)
  q = q_ref[...]
  k_rows, v_rows = cm.Rows(k_ref, spec.interpret), cm.Rows(v_ref, spec.interpret)
  valid_rows = cm.valid_rows(valid_ref, spec.interpret)

  def body(j, carry):
    acc, m, l = carry
    ks = pl.ds(j * bk, bk)
    s = cm.masked_scores(q, k_rows[ks], valid_rows[ks], qb * bq, j * bk,
                         spec.scale, spec.causal)
    m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
    m_safe = jnp.where(m_new == cm.NEG_INF, 0.0, m_new)  # all-masked so far: keep p = 0
    alpha = jnp.exp(m - m_safe)
    p = jnp.exp(s - m_safe)
    v = v_rows[ks]
    acc = alpha * acc + cm.dot(p.astype(v.dtype), v)
    return acc, m_new, alpha * l + jnp.sum(p, axis=1, keepdims=True)

  init = (jnp.zeros((bq, v_ref.shape[-1]), jnp.float32),
          jnp.full((bq, 1), cm.NEG_INF, jnp.float32), jnp.zeros((bq, 1), jnp.float32))
  nkb = cm.num_k_blocks(qb, bq, bk, k_ref.shape[0], spec.causal)
  acc, m, l = lax.fori_loop(0, nkb, body, init)
  empty = l == 0.0  # every key masked: output 0, lse +inf (so exp(s - lse) = 0 later)
  l_safe = jnp.where(empty, 1.0, l)
  o_ref[...] = (acc / l_safe).astype(o_ref.dtype)
  lse_ref[...] = jnp.where(empty, cm.POS_INF, m + jnp.log(l_safe))


def _forward(q: jax.Array, k: jax.Array, v: jax.Array, kvalid: jax.Array,
             spec: Spec) -> tuple[jax.Array, jax.Array]:
  """q ``(B, Nq, H, D)``, k/v ``(B, Nk, H, D)``, kvalid ``(B, Nk)`` ->
  o ``(B, Nq, H, D)`` (q's dtype), lse ``(B, H, Nq)`` float32."""
  g = cm.Geometry.of(q, k, spec)
  qp = g.q_in(q)
  o, lse = pl.pallas_call(
      functools.partial(_fwd_kernel, spec=spec),
      grid=g.grid_q,
      in_specs=[g.seq_block(g.bq), g.seq_full(g.nk_p, kv=True), g.seq_full(g.nk_p, kv=True),
                g.valid_full(g.nk_p)],
      out_specs=[g.seq_block(g.bq), g.row_block(g.bq)],
      out_shape=[cm.out_struct(qp.shape, q.dtype, qp),
                 cm.out_struct((g.b, g.h, g.nq_p, 1), jnp.float32, qp)],
      interpret=spec.interpret,
      compiler_params=cm.compiler_params(spec),
      name="fmdistill_flash_fwd",
  )(qp, g.k_in(k), g.k_in(v), g.valid_in(kvalid))
  return g.q_out(o), g.rows_out(lse)


# ---------------------------------------------------------------- backward


def _dkdv_kernel(q_ref, k_ref, v_ref, valid_ref, do_ref, lse_ref, delta_ref,
                 dk_ref, dv_ref, *, spec: Spec):
  """Grid ``(B, H, Nk_pad // bk)``: loops over query blocks, accumulates dK and dV."""
  bq, bk = spec.block_q, spec.block_k
  kb = pl.program_id(2)
  k, v, valid = k_ref[...], v_ref[...], valid_ref[...]
  q_rows, do_rows, lse_rows, delta_rows = (
      cm.Rows(r, spec.interpret) for r in (q_ref, do_ref, lse_ref, delta_ref))

  def body(i, carry):
    dk, dv = carry
    qs = pl.ds(i * bq, bq)
    q, do = q_rows[qs], do_rows[qs]
    s = cm.masked_scores(q, k, valid, i * bq, kb * bk, spec.scale, spec.causal)
    p = jnp.exp(s - lse_rows[qs])
    dv = dv + cm.dot_tn(p.astype(do.dtype), do)
    ds = p * (cm.dot_t(do, v) - delta_rows[qs])
    dk = dk + cm.dot_tn(ds.astype(q.dtype), q)
    return dk, dv

  zeros = jnp.zeros((bk, k.shape[-1]), jnp.float32)
  start = cm.first_q_block(kb, bq, bk, spec.causal)
  dk, dv = lax.fori_loop(start, q_ref.shape[0] // bq, body, (zeros, zeros))
  dk_ref[...] = (dk * spec.scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _dq_kernel(q_ref, k_ref, v_ref, valid_ref, do_ref, lse_ref, delta_ref, dq_ref, *,
               spec: Spec):
  """Grid ``(B, H, Nq_pad // bq)``: loops over key blocks, accumulates dQ."""
  bq, bk = spec.block_q, spec.block_k
  qb = pl.program_id(2)
  q, do = q_ref[...], do_ref[...]
  lse, delta = lse_ref[...], delta_ref[...]
  k_rows, v_rows = cm.Rows(k_ref, spec.interpret), cm.Rows(v_ref, spec.interpret)
  valid_rows = cm.valid_rows(valid_ref, spec.interpret)

  def body(j, dq):
    ks = pl.ds(j * bk, bk)
    k = k_rows[ks]
    s = cm.masked_scores(q, k, valid_rows[ks], qb * bq, j * bk, spec.scale, spec.causal)
    p = jnp.exp(s - lse)
    ds = p * (cm.dot_t(do, v_rows[ks]) - delta)
    return dq + cm.dot(ds.astype(k.dtype), k)

  nkb = cm.num_k_blocks(qb, bq, bk, k_ref.shape[0], spec.causal)
  dq = lax.fori_loop(0, nkb, body, jnp.zeros((bq, q.shape[-1]), jnp.float32))
  dq_ref[...] = (dq * spec.scale).astype(dq_ref.dtype)


def _backward(q: jax.Array, k: jax.Array, v: jax.Array, kvalid: jax.Array, o: jax.Array,
              lse: jax.Array, do: jax.Array, dlse: jax.Array | None,
              spec: Spec) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Cotangents of (q, k, v) given those of o ``(B, Nq, H, D)`` and lse ``(B, H, Nq)``.

  ``delta = rowsum(o * do) - dlse`` is an O(N) XLA elementwise op; the two Pallas kernels
  recompute ``P = exp(S - lse)`` block by block.
  """
  g = cm.Geometry.of(q, k, spec)
  delta = jnp.einsum("bqhd,bqhd->bhq", o.astype(jnp.float32), do.astype(jnp.float32))
  if dlse is not None:
    delta = delta - dlse
  qp, kp, vp = g.q_in(q), g.k_in(k), g.k_in(v)
  args = (qp, kp, vp, g.valid_in(kvalid), g.q_in(do), g.rows_in(lse, cm.POS_INF),
          g.rows_in(delta, 0.0))
  full_q, full_k = g.seq_full(g.nq_p), g.seq_full(g.nk_p, kv=True)
  blk_q, blk_k, out_k = g.seq_block(g.bq), g.seq_block(g.bk, kv=True), g.seq_block(g.bk)
  full_row, blk_row = g.row_full(g.nq_p), g.row_block(g.bq)
  params = dict(interpret=spec.interpret, compiler_params=cm.compiler_params(spec))

  dk, dv = pl.pallas_call(
      functools.partial(_dkdv_kernel, spec=spec),
      grid=g.grid_k,
      in_specs=[full_q, blk_k, blk_k, g.valid_block(g.bk), full_q, full_row, full_row],
      out_specs=[out_k, out_k],  # per query head; k_out sums shared heads
      out_shape=[cm.out_struct(g.out_shape(g.nk_p), k.dtype, qp),
                 cm.out_struct(g.out_shape(g.nk_p), v.dtype, qp)],
      name="fmdistill_flash_bwd_dkdv", **params,
  )(*args)
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, spec=spec),
      grid=g.grid_q,
      in_specs=[blk_q, full_k, full_k, g.valid_full(g.nk_p), blk_q, blk_row, blk_row],
      out_specs=blk_q,
      out_shape=cm.out_struct(qp.shape, q.dtype, qp),
      name="fmdistill_flash_bwd_dq", **params,
  )(*args)
  return g.q_out(dq), g.k_out(dk), g.k_out(dv)
