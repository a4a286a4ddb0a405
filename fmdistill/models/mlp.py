"""MLP flow-map network for low-dimensional data: ``F(x, t, s, cond) -> (B, d)``."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from fmdistill.models.embeddings import LabelEmbed, TimeEmbed

Array = jax.Array


class MLP(nnx.Module):
  """Residual MLP with FiLM-style time conditioning.

  ``x (B, d)``, ``t, s (B,)`` float32, optional ``cond (B,)`` int. Hidden layers run in
  ``dtype``; the output is cast back to the dtype of ``x``. The last layer is zero-initialised
  so an untrained flow map is the identity plus zero displacement.
  """

  def __init__(self, dim: int, width: int = 256, depth: int = 4, num_classes: int = 0,
               dtype: jnp.dtype = jnp.float32, *, time: dict | None = None, rngs: nnx.Rngs):
    self.depth = depth
    self.dtype = dtype
    self.time = TimeEmbed(width, **(time or {}), rngs=rngs)
    self.label = LabelEmbed(num_classes, width, rngs=rngs) if num_classes else None
    kw = dict(dtype=dtype, param_dtype=jnp.float32)
    self.inp = nnx.Linear(dim, width, rngs=rngs, **kw)
    for i in range(depth):
      setattr(self, f"film{i}", nnx.Linear(width, 2 * width, rngs=rngs, **kw))
      setattr(self, f"fc{i}a", nnx.Linear(width, width, rngs=rngs, **kw))
      setattr(self, f"fc{i}b", nnx.Linear(width, width, rngs=rngs, **kw))
      setattr(self, f"norm{i}", nnx.LayerNorm(width, rngs=rngs, dtype=dtype,
                                              param_dtype=jnp.float32))
    self.out = nnx.Linear(width, dim, rngs=rngs, kernel_init=nnx.initializers.zeros, **kw)

  def __call__(self, x: Array, t: Array, s: Array, cond: Array | None = None) -> Array:
    c = self.time(t, s)
    if self.label is not None and cond is not None:
      c = c + self.label(cond)
    c = nnx.silu(c).astype(self.dtype)
    h = self.inp(x.astype(self.dtype))
    for i in range(self.depth):
      scale, shift = jnp.split(getattr(self, f"film{i}")(c), 2, axis=-1)
      z = getattr(self, f"norm{i}")(h) * (1 + scale) + shift
      h = h + getattr(self, f"fc{i}b")(nnx.silu(getattr(self, f"fc{i}a")(nnx.silu(z))))
    return self.out(nnx.silu(h)).astype(x.dtype)
