"""Attention for fmdistill models: ``attention(q, k, v, ...)`` with layout ``(B, N, H, D)``.

Today only the XLA reference is behind this name (the Pallas flash kernel with a fused JVP
rule is tracked in issue 5); ``impl='pallas'`` raises rather than silently falling back.
"""
from __future__ import annotations

import jax

from fmdistill.pallas.reference import attention_reference

IMPLS = ("auto", "xla", "pallas")


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, key_mask: jax.Array | None = None,
              causal: bool = False, scale: float | None = None, impl: str = "auto") -> jax.Array:
  """Softmax attention, ``(B, N, H, D)`` in and out. See ``attention_reference``."""
  if impl not in IMPLS:
    raise ValueError(f"attention impl must be one of {IMPLS}, got {impl!r}")
  if impl == "pallas":
    raise NotImplementedError("the Pallas attention kernel is not built yet (issue 5)")
  return attention_reference(q, k, v, key_mask=key_mask, causal=causal, scale=scale)


__all__ = ["attention", "attention_reference", "IMPLS"]
