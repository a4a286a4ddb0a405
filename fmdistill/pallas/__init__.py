"""Attention for fmdistill models: ``attention(q, k, v, ...)`` with layout ``(B, N, H, D)``.

``impl`` selects the implementation:

* ``'xla'``: the plain XLA reference (``attention_reference``); materialises ``N x N`` scores.
* ``'pallas'``: the Pallas flash kernels with a custom JVP rule (design and limits in
  ``fused_attention``): ``jax.grad`` runs the flash backward kernels, ``jax.jvp`` the
  one-pass JVP kernel, and ``jax.grad`` of ``o, do = jax.jvp(...)`` -- through ``o``
  (MeanFlow/sCM), through ``do`` (improved MeanFlow, TVM) or both -- runs that kernel and
  the tangent-backward kernels, all in O(N) memory.
  On CPU there is no Pallas backend, so ``impl='pallas'`` runs the kernels with
  ``interpret=True`` (slow; for tests). It never falls back to XLA.
* ``'auto'``: ``'pallas'`` when the default backend is GPU or TPU, ``'xla'`` on CPU.
"""
from __future__ import annotations

import jax

from fmdistill.pallas.fused_attention import attention_jvp, pallas_attention
from fmdistill.pallas.reference import attention_reference

IMPLS = ("auto", "xla", "pallas")


def resolve_impl(impl: str) -> str:
  """``'auto'`` -> ``'pallas'`` on GPU/TPU, ``'xla'`` on CPU; validates the name."""
  if impl not in IMPLS:
    raise ValueError(f"attention impl must be one of {IMPLS}, got {impl!r}")
  if impl == "auto":
    return "pallas" if jax.default_backend() in ("gpu", "tpu") else "xla"
  return impl


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, key_mask: jax.Array | None = None,
              causal: bool = False, scale: float | None = None, impl: str = "auto",
              block_q: int | None = None, block_k: int | None = None,
              interpret: bool | None = None) -> jax.Array:
  """Softmax attention: q ``(B, Nq, H, D)``, k/v ``(B, Nk, Hkv, D)`` -> ``(B, Nq, H, D)``.

  ``Hkv`` divides ``H`` (grouped-query attention; ``Hkv = H`` is multi-head attention).

  key_mask: optional ``(B, Nk)`` bool, True where a key may be attended to; causal masks
  keys after the query (Nq == Nk); scale defaults to ``D ** -0.5``. Rows with every key
  masked give zeros. ``block_q``/``block_k`` (powers of two; default 128 on TPU, else 64)
  and ``interpret`` (default: True exactly when the backend is CPU) only affect
  ``impl='pallas'``.
  """
  impl = resolve_impl(impl)
  if impl == "xla":
    return attention_reference(q, k, v, key_mask=key_mask, causal=causal, scale=scale)
  if interpret is None:
    interpret = jax.default_backend() == "cpu"
  return pallas_attention(q, k, v, key_mask=key_mask, causal=causal, scale=scale,
                          block_q=block_q, block_k=block_k, interpret=interpret)


__all__ = ["attention", "attention_reference", "attention_jvp", "pallas_attention",
           "resolve_impl", "IMPLS"]
