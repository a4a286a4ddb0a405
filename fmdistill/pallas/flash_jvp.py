"""Flash JVP kernels: the attention tangent ``do`` without materialising ``N x N`` matrices.

With ``S = q k^T * scale``, ``dS = (dq k^T + q dk^T) * scale`` and ``P = softmax(S)``::

    o  = P v
    do = P dv + (P * dS) v - rowsum(P * dS) * o

(from ``dP = P * (dS - rowsum(P * dS))``). Two kernels, both one pass over key blocks per
query block:

* ``_tangent``: given the forward's ``o`` and ``lse``, ``P = exp(S - lse)`` is exact per
  block, so no running max is needed (5 block matmuls); ``-rowsum(P dS) o`` is subtracted
  block by block. This is what ``jax.jvp`` of the
  public attention runs after the flash forward, and what its transpose pairs with.
* ``_online`` (public ``attention_jvp``): o and do together from scratch with the online
  softmax trick (6 block matmuls, one kernel): running max ``m``, sum ``l``,
  ``acc_o = sum p v``, ``acc_t = sum p dv + (p * dS) v``, ``mu = sum p * dS`` (all rescaled by
  ``exp(m_old - m_new)``); finally ``o = acc_o / l`` and ``do = acc_t / l - (mu / l) o``.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from fmdistill.pallas import _common as cm
from fmdistill.pallas._common import Spec


def _key_rows(spec: Spec, *refs):
  return tuple(cm.Rows(r, spec.interpret) for r in refs)


def _block_scores(q, dq, k_rows, dk_rows, valid_rows, ks, q_start, k_start, spec: Spec):
  """Masked ``S`` and ``dS`` for one ``(bq, bk)`` block (float32)."""
  k = k_rows[ks]
  s = cm.masked_scores(q, k, valid_rows[ks], q_start, k_start, spec.scale, spec.causal)
  ds = (cm.dot_t(dq, k) + cm.dot_t(q, dk_rows[ks])) * spec.scale
  return s, ds


def _tangent_kernel(q_ref, dq_ref, o_ref, lse_ref, k_ref, dk_ref, v_ref, dv_ref, valid_ref,
                    do_ref, *, spec: Spec):
  """Grid ``(B, H, Nq_pad // bq)``; q/dq/o/do tiles ``(bq, D)``, keys whole ``(Nk_pad, D)``."""
  bq, bk = spec.block_q, spec.block_k
  qb = pl.program_id(2)
  q, dq, lse = q_ref[...], dq_ref[...], lse_ref[...]
  kr, dkr, vr, dvr, validr = _key_rows(spec, k_ref, dk_ref, v_ref, dv_ref, valid_ref)
  o = o_ref[...].astype(jnp.float32)

  def body(j, acc):
    ks = pl.ds(j * bk, bk)
    s, ds = _block_scores(q, dq, kr, dkr, validr, ks, qb * bq, j * bk, spec)
    p = jnp.exp(s - lse[:, None])  # lse = +inf on empty rows -> p = 0
    pds = p * ds
    v, dv = vr[ks], dvr[ks]
    # The -rowsum(P dS) o term is linear in the blocks, so it is subtracted per block (one
    # (bq, D) FMA). Keeping every use of the loaded o inside the loop also keeps interpret
    # mode under shard_map's check_vma happy (see ``_common.Rows``).
    return (acc + cm.dot(p.astype(dv.dtype), dv) + cm.dot(pds.astype(v.dtype), v)
            - jnp.sum(pds, axis=1)[:, None] * o)

  nkb = cm.num_k_blocks(qb, bq, bk, k_ref.shape[0], spec.causal)
  acc = lax.fori_loop(0, nkb, body, jnp.zeros((bq, v_ref.shape[-1]), jnp.float32))
  do_ref[...] = acc.astype(do_ref.dtype)


def _online_kernel(q_ref, dq_ref, k_ref, dk_ref, v_ref, dv_ref, valid_ref,
                   o_ref, do_ref, lse_ref, *, spec: Spec):
  """Grid ``(B, H, Nq_pad // bq)``: o, do and lse in one online-softmax pass."""
  bq, bk = spec.block_q, spec.block_k
  qb = pl.program_id(2)
  q, dq = q_ref[...], dq_ref[...]
  kr, dkr, vr, dvr, validr = _key_rows(spec, k_ref, dk_ref, v_ref, dv_ref, valid_ref)

  def body(j, carry):
    acc_o, acc_t, mu, m, l = carry
    ks = pl.ds(j * bk, bk)
    s, ds = _block_scores(q, dq, kr, dkr, validr, ks, qb * bq, j * bk, spec)
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    m_safe = jnp.where(m_new == cm.NEG_INF, 0.0, m_new)
    alpha = jnp.exp(m - m_safe)
    p = jnp.exp(s - m_safe[:, None])
    pds = p * ds
    v, dv = vr[ks], dvr[ks]
    acc_o = alpha[:, None] * acc_o + cm.dot(p.astype(v.dtype), v)
    acc_t = (alpha[:, None] * acc_t + cm.dot(p.astype(dv.dtype), dv)
             + cm.dot(pds.astype(v.dtype), v))
    mu = alpha * mu + jnp.sum(pds, axis=1)
    return acc_o, acc_t, mu, m_new, alpha * l + jnp.sum(p, axis=1)

  d = v_ref.shape[-1]
  zrow = jnp.zeros((bq,), jnp.float32)
  init = (jnp.zeros((bq, d), jnp.float32), jnp.zeros((bq, d), jnp.float32), zrow,
          jnp.full((bq,), cm.NEG_INF, jnp.float32), zrow)
  nkb = cm.num_k_blocks(qb, bq, bk, k_ref.shape[0], spec.causal)
  acc_o, acc_t, mu, m, l = lax.fori_loop(0, nkb, body, init)
  empty = l == 0.0
  inv_l = 1.0 / jnp.where(empty, 1.0, l)
  o = acc_o * inv_l[:, None]
  o_ref[...] = o.astype(o_ref.dtype)
  do_ref[...] = (acc_t * inv_l[:, None] - (mu * inv_l)[:, None] * o).astype(do_ref.dtype)
  lse_ref[...] = jnp.where(empty, cm.POS_INF, m + jnp.log(jnp.where(empty, 1.0, l)))


def _specs(bq: int, nk_p: int, dp: int):
  return cm.seq_block(bq, dp), cm.seq_full(nk_p, dp), cm.row_block(bq), cm.valid_full(nk_p)


def _tangent(q: jax.Array, k: jax.Array, v: jax.Array, kvalid: jax.Array, o: jax.Array,
             lse: jax.Array, dq: jax.Array, dk: jax.Array, dv: jax.Array,
             spec: Spec) -> jax.Array:
  """Tangent of attention at (q, k, v) along (dq, dk, dv), given the forward's o and lse.

  q/o/dq ``(B, Nq, H, D)``, k/v/dk/dv ``(B, Nk, H, D)``, kvalid ``(B, Nk)``,
  lse ``(B, H, Nq)`` -> do ``(B, Nq, H, D)`` in q's dtype.
  """
  b, nq, h, d = q.shape
  nk = k.shape[1]
  bq, bk, dp = spec.block_q, spec.block_k, cm.padded_dim(d)
  nq_p, nk_p = cm.round_up(nq, bq), cm.round_up(nk, bk)
  qs = [cm.to_kernel(x, nq_p, dp) for x in (q, dq, o)]
  ks = [cm.to_kernel(x, nk_p, dp) for x in (k, dk, v, dv)]
  lse_p = cm.pad_rows(lse, nq_p, cm.POS_INF)
  blk_q, full_k, blk_row, valid = _specs(bq, nk_p, dp)
  do = pl.pallas_call(
      functools.partial(_tangent_kernel, spec=spec),
      grid=(b, h, nq_p // bq),
      in_specs=[blk_q, blk_q, blk_q, blk_row, full_k, full_k, full_k, full_k, valid],
      out_specs=blk_q,
      out_shape=cm.out_struct(qs[0].shape, q.dtype, qs[0]),
      interpret=spec.interpret,
      compiler_params=cm.compiler_params(spec),
      name="fmdistill_flash_tangent",
  )(*qs, lse_p, *ks, cm.key_valid(kvalid, nk_p))
  return cm.from_kernel(do, nq, d)


def _online(q: jax.Array, k: jax.Array, v: jax.Array, kvalid: jax.Array, dq: jax.Array,
            dk: jax.Array, dv: jax.Array, spec: Spec
            ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """One-pass fused JVP: -> o, do ``(B, Nq, H, D)`` and lse ``(B, H, Nq)`` float32."""
  b, nq, h, d = q.shape
  nk = k.shape[1]
  bq, bk, dp = spec.block_q, spec.block_k, cm.padded_dim(d)
  nq_p, nk_p = cm.round_up(nq, bq), cm.round_up(nk, bk)
  qs = [cm.to_kernel(x, nq_p, dp) for x in (q, dq)]
  ks = [cm.to_kernel(x, nk_p, dp) for x in (k, dk, v, dv)]
  blk_q, full_k, blk_row, valid = _specs(bq, nk_p, dp)
  like = qs[0]
  o, do, lse = pl.pallas_call(
      functools.partial(_online_kernel, spec=spec),
      grid=(b, h, nq_p // bq),
      in_specs=[blk_q, blk_q, full_k, full_k, full_k, full_k, valid],
      out_specs=[blk_q, blk_q, blk_row],
      out_shape=[cm.out_struct(like.shape, q.dtype, like),
                 cm.out_struct(like.shape, q.dtype, like),
                 cm.out_struct((b, h, nq_p), jnp.float32, like)],
      interpret=spec.interpret,
      compiler_params=cm.compiler_params(spec),
      name="fmdistill_flash_jvp_online",
  )(*qs, *ks, cm.key_valid(kvalid, nk_p))
  return cm.from_kernel(o, nq, d), cm.from_kernel(do, nq, d), lse[:, :, :nq]


def attention_jvp(q: jax.Array, k: jax.Array, v: jax.Array, dq: jax.Array, dk: jax.Array,
                  dv: jax.Array, *, key_mask: jax.Array | None = None, causal: bool = False,
                  scale: float | None = None, block_q: int = 64, block_k: int = 64,
                  interpret: bool = False) -> tuple[jax.Array, jax.Array]:
  """``(o, do) = jvp(attention, (q, k, v), (dq, dk, dv))`` in one fused online kernel.

  Shapes as ``attention``. Forward-mode only: not differentiable (use ``jax.jvp`` of
  ``fmdistill.pallas.attention`` when the result must be differentiated).
  """
  spec = cm.make_spec(q, k, causal=causal, scale=scale, block_q=block_q, block_k=block_k,
                      interpret=interpret)
  o, do, _ = _online(q, k, v, cm.default_kvalid(k, key_mask), dq, dk, dv, spec)
  return o, do
