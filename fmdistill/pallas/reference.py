"""Plain XLA softmax attention: the oracle for the Pallas kernels and the CPU fallback.

Layout is ``(B, N, H, D)`` (batch, tokens, heads, head dim) for q, k and v; the scores are
accumulated in float32 whatever the input dtype, and the output has the dtype of ``q``.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def attention_reference(q: jax.Array, k: jax.Array, v: jax.Array, *,
                        key_mask: jax.Array | None = None, causal: bool = False,
                        scale: float | None = None) -> jax.Array:
  """softmax(q k^T * scale + mask) v.

  Args:
    q: ``(B, Nq, H, D)``; k, v: ``(B, Nk, Hkv, D)`` with ``H`` a multiple of ``Hkv``
      (grouped-query attention: query head ``i`` uses key/value head ``i // (H // Hkv)``).
    key_mask: optional ``(B, Nk)`` bool, True where a key may be attended to.
    causal: mask keys with index > query index (requires Nq == Nk).
    scale: softmax scale, default ``D ** -0.5``.
  Returns:
    ``(B, Nq, H, D)`` in q's dtype.
  """
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  if k.shape[2] != q.shape[2]:
    rep = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, rep, axis=2), jnp.repeat(v, rep, axis=2)
  s = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
  mask = _mask(q.shape[1], k.shape[1], key_mask, causal)
  if mask is not None:
    s = jnp.where(mask, s, -jnp.inf)
  # Rows with every key masked give zeros rather than NaN.
  m = jnp.max(s, axis=-1, keepdims=True)
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  p = jnp.exp(s - m)
  l = jnp.sum(p, axis=-1, keepdims=True)
  p = p / jnp.where(l == 0, 1.0, l)
  o = jnp.einsum("bhqk,bkhd->bqhd", p, v.astype(jnp.float32))
  return o.astype(q.dtype)


def _mask(nq: int, nk: int, key_mask, causal: bool):
  mask = None
  if key_mask is not None:
    mask = key_mask[:, None, None, :]
  if causal:
    c = jnp.arange(nq)[:, None] >= jnp.arange(nk)[None, :]
    mask = c[None, None] if mask is None else mask & c[None, None]
  return mask
