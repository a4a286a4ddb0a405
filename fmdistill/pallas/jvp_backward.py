"""Tangent-backward kernels: the VJP of ``(o, do) = jvp(attention)`` in all six inputs.

Notation (one batch row and head; ``s`` the softmax scale; masked scores are ``-inf``)::

    S  = s q k^T,          P = softmax(S) (row-wise),      o = P v
    dS = s (dq k^T + q dk^T)                 (the score tangent, "S-dot")
    mu = rowsum(P * dS)                      (a row vector, saved by the forward)
    dP = P * (dS - mu)                       (the softmax tangent)
    do = P dv + dP v = P dv + (P * dS) v - mu * o

Given cotangents ``Go`` of ``o`` and ``Gt`` of ``do``, write ``L = <Go, o> + <Gt, do>``
and ``A = Gt dv^T``, ``Bm = Gt v^T``, ``C = Go v^T`` (all ``Nq x Nk``), ``beta =
rowsum(Gt * o)``, ``delta_o = rowsum(Go * o)``, ``delta_t = rowsum(Gt * do)``. Then::

    L = <P, C> + <P, A> + <P * dS, Bm> - <mu, beta>,   mu = rowsum(P * dS), beta = rowsum(P * Bm)

Differentiating in each intermediate:

* ``dL/dBm = P * dS - P * mu = dP``, so through ``v`` (``Bm = Gt v^T``): ``v_bar += dP^T Gt``;
  and ``dL/dC = P`` gives ``v_bar += P^T Go``.
* ``dL/dA = P``: ``dv_bar = P^T Gt``.
* ``dL/d(dS) = P * Bm - P * beta =: dS_bar = P * (Bm - beta)``. ``dS`` is bilinear in
  ``(q, k)`` and ``(dq, dk)``: ``dq_bar = s dS_bar k``, ``dk_bar = s dS_bar^T q`` and the
  second-order terms ``q_bar += s dS_bar dk``, ``k_bar += s dS_bar^T dq``.
* ``dL/dP = C + A + dS * Bm - dS * beta - mu * Bm =: P_bar`` (``beta`` and ``mu`` both
  depend on ``P``). The softmax VJP is ``S_bar = P * (P_bar - rowsum(P * P_bar))``, and
  ``rowsum(P * P_bar) = delta_o + rowsum(Gt * (P dv)) + rowsum(P dS Bm) - 2 mu beta
  = delta_o + delta_t - mu beta``, because ``rowsum(Gt * do) = rowsum(P A) + rowsum(P dS Bm)
  - mu beta``. Collecting terms::

      S_bar = P * (C + A + (dS - mu) * (Bm - beta) - delta_o - delta_t)

  and through ``S = s q k^T``: ``q_bar += s S_bar k``, ``k_bar += s S_bar^T q``.

In total::

    q_bar  = s (S_bar k + dS_bar dk)        dq_bar = s dS_bar k
    k_bar  = s (S_bar^T q + dS_bar^T dq)    dk_bar = s dS_bar^T q
    v_bar  = P^T Go + dP^T Gt               dv_bar = P^T Gt

With ``Gt = 0`` this is the flash backward (``S_bar = P * (C - delta_o)``). Every term is a
block-local function of ``P = exp(S - lse)``, ``dS`` and four row statistics (``lse``,
``mu``, ``beta``, ``delta_o + delta_t``), so two kernels compute it without an ``N x N``
buffer, like the flash backward: one per key block looping over query blocks (``k_bar``,
``v_bar``, ``dk_bar``, ``dv_bar``; 6 score matmuls + 6 accumulations per block pair) and one
per query block looping over key blocks (``q_bar``, ``dq_bar``; 6 + 3). Without ``Go`` the
``C`` and ``P^T Go`` matmuls are skipped. ``tests/pallas`` checks these kernels against
``jax.grad`` of ``jax.jvp`` of the XLA reference.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from fmdistill.pallas import _common as cm
from fmdistill.pallas._common import Spec


def _block_terms(q, dq, go, gt, k, dk, v, dv, valid, lse, mu, beta, c0, q_start, k_start,
                 spec: Spec):
  """``(P, dP, dS_bar, S_bar)`` of one ``(bq, bk)`` block, float32 (see module doc)."""
  s = cm.masked_scores(q, k, valid, q_start, k_start, spec.scale, spec.causal)
  p = jnp.exp(s - lse)  # lse = +inf on empty / padded rows -> p = 0
  sdot = (cm.dot_t(dq, k) + cm.dot_t(q, dk)) * spec.scale - mu
  bm = cm.dot_t(gt, v) - beta
  dsbar = p * bm
  inner = cm.dot_t(gt, dv) + sdot * bm - c0
  if go is not None:
    inner = inner + cm.dot_t(go, v)
  return p, p * sdot, dsbar, p * inner


def _key_kernel(*refs, spec: Spec, has_go: bool):
  """Grid ``(B, H, Nk_pad // bk)``: loops over query blocks; k_bar, v_bar, dk_bar, dv_bar."""
  (q_ref, dq_ref, go_ref, gt_ref, k_ref, dk_ref, v_ref, dv_ref, valid_ref, lse_ref, mu_ref,
   beta_ref, c0_ref, gk_ref, gv_ref, gdk_ref, gdv_ref) = _unpack(refs, has_go, 4)
  bq, bk = spec.block_q, spec.block_k
  kb = pl.program_id(2)
  k, dk, v, dv, valid = k_ref[...], dk_ref[...], v_ref[...], dv_ref[...], valid_ref[...]
  rows = [None if r is None else cm.Rows(r, spec.interpret)
          for r in (q_ref, dq_ref, go_ref, gt_ref, lse_ref, mu_ref, beta_ref, c0_ref)]

  def body(i, acc):
    gk, gv, gdk, gdv = acc
    qs = pl.ds(i * bq, bq)
    q, dq, go, gt, lse, mu, beta, c0 = (None if r is None else r[qs] for r in rows)
    p, pdot, dsbar, sbar = _block_terms(q, dq, go, gt, k, dk, v, dv, valid, lse, mu, beta,
                                        c0, i * bq, kb * bk, spec)
    gk = gk + cm.dot_tn(sbar.astype(q.dtype), q) + cm.dot_tn(dsbar.astype(dq.dtype), dq)
    gdk = gdk + cm.dot_tn(dsbar.astype(q.dtype), q)
    gv = gv + cm.dot_tn(pdot.astype(gt.dtype), gt)
    if go is not None:
      gv = gv + cm.dot_tn(p.astype(go.dtype), go)
    gdv = gdv + cm.dot_tn(p.astype(gt.dtype), gt)
    return gk, gv, gdk, gdv

  zeros = jnp.zeros((bk, k.shape[-1]), jnp.float32)
  start = cm.first_q_block(kb, bq, bk, spec.causal)
  gk, gv, gdk, gdv = lax.fori_loop(start, q_ref.shape[0] // bq, body, (zeros,) * 4)
  gk_ref[...] = (gk * spec.scale).astype(gk_ref.dtype)
  gv_ref[...] = gv.astype(gv_ref.dtype)
  gdk_ref[...] = (gdk * spec.scale).astype(gdk_ref.dtype)
  gdv_ref[...] = gdv.astype(gdv_ref.dtype)


def _query_kernel(*refs, spec: Spec, has_go: bool):
  """Grid ``(B, H, Nq_pad // bq)``: loops over key blocks; q_bar and dq_bar."""
  (q_ref, dq_ref, go_ref, gt_ref, k_ref, dk_ref, v_ref, dv_ref, valid_ref, lse_ref, mu_ref,
   beta_ref, c0_ref, gq_ref, gdq_ref) = _unpack(refs, has_go, 2)
  bq, bk = spec.block_q, spec.block_k
  qb = pl.program_id(2)
  q, dq, gt = q_ref[...], dq_ref[...], gt_ref[...]
  go = None if go_ref is None else go_ref[...]
  lse, mu, beta, c0 = lse_ref[...], mu_ref[...], beta_ref[...], c0_ref[...]
  kr, dkr, vr, dvr = (cm.Rows(r, spec.interpret) for r in (k_ref, dk_ref, v_ref, dv_ref))
  validr = cm.valid_rows(valid_ref, spec.interpret)

  def body(j, acc):
    gq, gdq = acc
    ks = pl.ds(j * bk, bk)
    k, dk = kr[ks], dkr[ks]
    _, _, dsbar, sbar = _block_terms(q, dq, go, gt, k, dk, vr[ks], dvr[ks], validr[ks], lse,
                                     mu, beta, c0, qb * bq, j * bk, spec)
    gq = gq + cm.dot(sbar.astype(k.dtype), k) + cm.dot(dsbar.astype(dk.dtype), dk)
    return gq, gdq + cm.dot(dsbar.astype(k.dtype), k)

  nkb = cm.num_k_blocks(qb, bq, bk, k_ref.shape[0], spec.causal)
  zeros = jnp.zeros((bq, q.shape[-1]), jnp.float32)
  gq, gdq = lax.fori_loop(0, nkb, body, (zeros, zeros))
  gq_ref[...] = (gq * spec.scale).astype(gq_ref.dtype)
  gdq_ref[...] = (gdq * spec.scale).astype(gdq_ref.dtype)


def _unpack(refs, has_go: bool, n_out: int) -> tuple:
  """Kernel refs with ``None`` in the ``go`` slot when there is no primal cotangent."""
  refs = list(refs)
  if not has_go:
    refs.insert(2, None)
  assert len(refs) == 13 + n_out, len(refs)
  return tuple(refs)


def jvp_backward(q: jax.Array, k: jax.Array, v: jax.Array, kvalid: jax.Array,
                 dq: jax.Array, dk: jax.Array, dv: jax.Array, o: jax.Array, do: jax.Array,
                 lse: jax.Array, mu: jax.Array, go: jax.Array | None, gt: jax.Array,
                 spec: Spec) -> tuple[jax.Array, ...]:
  """Cotangents of ``(q, k, v, dq, dk, dv)`` given those of ``(o, do)``.

  q/dq/o/do/go/gt ``(B, Nq, H, D)``, k/v/dk/dv ``(B, Nk, H, D)``, kvalid ``(B, Nk)``,
  lse/mu ``(B, H, Nq)`` float32 (from the forward); ``go=None`` means a zero primal
  cotangent. Returns ``(q_bar, k_bar, v_bar, dq_bar, dk_bar, dv_bar)`` in the inputs' dtypes.
  The row statistics ``beta``, ``delta_o + delta_t`` are O(N) XLA reductions.
  """
  g = cm.Geometry.of(q, k, spec)
  rowdot = lambda a, b: jnp.einsum("bqhd,bqhd->bhq", a.astype(jnp.float32),
                                   b.astype(jnp.float32))
  c0 = rowdot(gt, do) if go is None else rowdot(gt, do) + rowdot(go, o)
  has_go = go is not None
  qside = [g.q_in(x) for x in ((q, dq, go, gt) if has_go else (q, dq, gt))]
  kside = [g.k_in(x) for x in (k, dk, v, dv)]
  rows = [g.rows_in(lse, cm.POS_INF), g.rows_in(mu, 0.0), g.rows_in(rowdot(gt, o), 0.0),
          g.rows_in(c0, 0.0)]
  args = (*qside, *kside, g.valid_in(kvalid), *rows)
  full_q, full_k = g.seq_full(g.nq_p), g.seq_full(g.nk_p, kv=True)
  blk_q, blk_k, out_k = g.seq_block(g.bq), g.seq_block(g.bk, kv=True), g.seq_block(g.bk)
  params = dict(interpret=spec.interpret, compiler_params=cm.compiler_params(spec))
  like = qside[0]

  gk, gv, gdk, gdv = pl.pallas_call(
      functools.partial(_key_kernel, spec=spec, has_go=has_go),
      grid=g.grid_k,
      in_specs=[full_q] * len(qside) + [blk_k] * 4 + [g.valid_block(g.bk)]
      + [g.row_full(g.nq_p)] * 4,
      out_specs=[out_k] * 4,  # per query head; k_out sums shared heads
      out_shape=[cm.out_struct(g.out_shape(g.nk_p), x.dtype, like) for x in (k, v, dk, dv)],
      name="fmdistill_jvp_bwd_keys", **params,
  )(*args)
  gq, gdq = pl.pallas_call(
      functools.partial(_query_kernel, spec=spec, has_go=has_go),
      grid=g.grid_q,
      in_specs=[blk_q] * len(qside) + [full_k] * 4 + [g.valid_full(g.nk_p)]
      + [g.row_block(g.bq)] * 4,
      out_specs=[blk_q] * 2,
      out_shape=[cm.out_struct(qside[0].shape, q.dtype, like),
                 cm.out_struct(qside[1].shape, dq.dtype, like)],
      name="fmdistill_jvp_bwd_queries", **params,
  )(*args)
  return (g.q_out(gq), g.k_out(gk), g.k_out(gv), g.q_out(gdq), g.k_out(gdk), g.k_out(gdv))
