"""Flash attention forward (online softmax, saves logsumexp) and backward (dQ; dK, dV) kernels.

Kernels read the model layout ``(B, N, H, D)`` (zero-padded only when unaligned; see
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
  """Grid ``(B, H, Nq_pad // bq)``; q/o tiles ``(bq, D)``, k/v whole ``(Nk_pad, D)``."""
  bq, bk = spec.block_q, spec.block_k
  qb = pl.program_id(2)
  q = q_ref[...]
  k_rows, v_rows, valid_rows = (cm.Rows(r, spec.interpret) for r in (k_ref, v_ref, valid_ref))

  def body(j, carry):
    acc, m, l = carry
    ks = pl.ds(j * bk, bk)
    s = cm.masked_scores(q, k_rows[ks], valid_rows[ks], qb * bq, j * bk,
                         spec.scale, spec.causal)
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    m_safe = jnp.where(m_new == cm.NEG_INF, 0.0, m_new)  # all-masked so far: keep p = 0
    alpha = jnp.exp(m - m_safe)
    p = jnp.exp(s - m_safe[:, None])
    v = v_rows[ks]
    acc = alpha[:, None] * acc + cm.dot(p.astype(v.dtype), v)
    return acc, m_new, alpha * l + jnp.sum(p, axis=1)

  init = (jnp.zeros((bq, v_ref.shape[-1]), jnp.float32),
          jnp.full((bq,), cm.NEG_INF, jnp.float32), jnp.zeros((bq,), jnp.float32))
  nkb = cm.num_k_blocks(qb, bq, bk, k_ref.shape[0], spec.causal)
  acc, m, l = lax.fori_loop(0, nkb, body, init)
  empty = l == 0.0  # every key masked: output 0, lse +inf (so exp(s - lse) = 0 later)
  l_safe = jnp.where(empty, 1.0, l)
  o_ref[...] = (acc / l_safe[:, None]).astype(o_ref.dtype)
  lse_ref[...] = jnp.where(empty, cm.POS_INF, m + jnp.log(l_safe))


def _forward(q: jax.Array, k: jax.Array, v: jax.Array, kvalid: jax.Array,
             spec: Spec) -> tuple[jax.Array, jax.Array]:
  """q ``(B, Nq, H, D)``, k/v ``(B, Nk, H, D)``, kvalid ``(B, Nk)`` ->
  o ``(B, Nq, H, D)`` (q's dtype), lse ``(B, H, Nq)`` float32."""
  b, nq, h, d = q.shape
  nk = k.shape[1]
  bq, bk, dp = spec.block_q, spec.block_k, cm.padded_dim(d)
  nq_p, nk_p = cm.round_up(nq, bq), cm.round_up(nk, bk)
  qp, kp, vp = cm.to_kernel(q, nq_p, dp), cm.to_kernel(k, nk_p, dp), cm.to_kernel(v, nk_p, dp)
  valid = cm.key_valid(kvalid, nk_p)
  o, lse = pl.pallas_call(
      functools.partial(_fwd_kernel, spec=spec),
      grid=(b, h, nq_p // bq),
      in_specs=[cm.seq_block(bq, dp), cm.seq_full(nk_p, dp), cm.seq_full(nk_p, dp),
                cm.valid_full(nk_p)],
      out_specs=[cm.seq_block(bq, dp), cm.row_block(bq)],
      out_shape=[cm.out_struct(qp.shape, q.dtype, qp),
                 cm.out_struct((b, h, nq_p), jnp.float32, qp)],
      interpret=spec.interpret,
      compiler_params=cm.compiler_params(spec),
      name="fmdistill_flash_fwd",
  )(qp, kp, vp, valid)
  return cm.from_kernel(o, nq, d), lse[:, :, :nq]


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
    p = jnp.exp(s - lse_rows[qs][:, None])
    dv = dv + cm.dot_tn(p.astype(do.dtype), do)
    ds = p * (cm.dot_t(do, v) - delta_rows[qs][:, None])
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
  k_rows, v_rows, valid_rows = (cm.Rows(r, spec.interpret) for r in (k_ref, v_ref, valid_ref))

  def body(j, dq):
    ks = pl.ds(j * bk, bk)
    k = k_rows[ks]
    s = cm.masked_scores(q, k, valid_rows[ks], qb * bq, j * bk, spec.scale, spec.causal)
    p = jnp.exp(s - lse[:, None])
    ds = p * (cm.dot_t(do, v_rows[ks]) - delta[:, None])
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
  b, nq, h, d = q.shape
  nk = k.shape[1]
  bq, bk, dp = spec.block_q, spec.block_k, cm.padded_dim(d)
  nq_p, nk_p = cm.round_up(nq, bq), cm.round_up(nk, bk)
  delta = jnp.einsum("bqhd,bqhd->bhq", o.astype(jnp.float32), do.astype(jnp.float32))
  if dlse is not None:
    delta = delta - dlse
  qp, dop = cm.to_kernel(q, nq_p, dp), cm.to_kernel(do, nq_p, dp)
  kp, vp = cm.to_kernel(k, nk_p, dp), cm.to_kernel(v, nk_p, dp)
  valid = cm.key_valid(kvalid, nk_p)
  lse_p, delta_p = cm.pad_rows(lse, nq_p, cm.POS_INF), cm.pad_rows(delta, nq_p, 0.0)
  args = (qp, kp, vp, valid, dop, lse_p, delta_p)

  full_q, full_k = cm.seq_full(nq_p, dp), cm.seq_full(nk_p, dp)
  blk_q, blk_k = cm.seq_block(bq, dp), cm.seq_block(bk, dp)
  full_row, blk_row = cm.row_full(nq_p), cm.row_block(bq)

  dk, dv = pl.pallas_call(
      functools.partial(_dkdv_kernel, spec=spec),
      grid=(b, h, nk_p // bk),
      in_specs=[full_q, blk_k, blk_k, cm.valid_block(bk), full_q, full_row, full_row],
      out_specs=[blk_k, blk_k],
      out_shape=[cm.out_struct(kp.shape, k.dtype, qp), cm.out_struct(vp.shape, v.dtype, qp)],
      interpret=spec.interpret,
      compiler_params=cm.compiler_params(spec),
      name="fmdistill_flash_bwd_dkdv",
  )(*args)
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, spec=spec),
      grid=(b, h, nq_p // bq),
      in_specs=[blk_q, full_k, full_k, cm.valid_full(nk_p), blk_q, blk_row, blk_row],
      out_specs=blk_q,
      out_shape=cm.out_struct(qp.shape, q.dtype, qp),
      interpret=spec.interpret,
      compiler_params=cm.compiler_params(spec),
      name="fmdistill_flash_bwd_dq",
  )(*args)
  return cm.from_kernel(dq, nq, d), cm.from_kernel(dk, nk, d), cm.from_kernel(dv, nk, d)


# ---------------------------------------------------------------- differentiable wrapper


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def flash_forward(q: jax.Array, k: jax.Array, v: jax.Array, kvalid: jax.Array,
                  spec: Spec) -> tuple[jax.Array, jax.Array]:
  """(o, lse) of the flash forward kernel; reverse mode runs the flash backward kernels."""
  return _forward(q, k, v, kvalid, spec)


def _flash_forward_fwd(q, k, v, kvalid, spec):
  o, lse = _forward(q, k, v, kvalid, spec)
  return (o, lse), (q, k, v, kvalid, o, lse)


def _flash_forward_bwd(spec, res, cts):
  q, k, v, kvalid, o, lse = res
  do, dlse = cts
  dq, dk, dv = _backward(q, k, v, kvalid, o, lse, do, dlse, spec)
  return dq, dk, dv, None


flash_forward.defvjp(_flash_forward_fwd, _flash_forward_bwd)


def flash_attention(q: jax.Array, k: jax.Array, v: jax.Array, *,
                    key_mask: jax.Array | None = None, causal: bool = False,
                    scale: float | None = None, block_q: int = 64, block_k: int = 64,
                    interpret: bool = False) -> jax.Array:
  """Flash attention, reverse-mode differentiable (no JVP rule; see ``flash_jvp``).

  q ``(B, Nq, H, D)``, k/v ``(B, Nk, H, D)``, key_mask ``(B, Nk)`` bool -> ``(B, Nq, H, D)``.
  """
  spec = cm.make_spec(q, k, causal=causal, scale=scale, block_q=block_q, block_k=block_k,
                      interpret=interpret)
  kvalid = cm.default_kvalid(k, key_mask)
  return flash_forward(q, k, v, kvalid, spec)[0]
