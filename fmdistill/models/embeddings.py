"""Time and label embeddings. Time features are always computed in float32 (DESIGN.md;
seed ``003_*``: half-precision time embeddings lose the time derivative to rounding)."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

Array = jax.Array


def sinusoidal(t: Array, dim: int, max_period: float = 10_000.0, scale: float = 1000.0) -> Array:
  """``(B,) -> (B, dim)`` float32 sin/cos features of ``scale * t`` (DDPM/DiT style)."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = scale * t.astype(jnp.float32)[:, None] * freqs[None]
  emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


class TimeEmbed(nnx.Module):
  """Embeds ``t`` and ``t - s`` (MeanFlow's choice of time inputs): sinusoidal features of
  each, summed after a float32 two-layer MLP. Output ``(B, width)`` float32."""

  def __init__(self, width: int, freq_dim: int = 128, *, scale: float = 1000.0,
               rngs: nnx.Rngs):
    self.freq_dim = freq_dim
    self.scale = scale  # t -> sinusoidal(scale * t); tangent methods need a small scale (~1)
    f32 = dict(dtype=jnp.float32, param_dtype=jnp.float32)
    self.t1 = nnx.Linear(freq_dim, width, rngs=rngs, **f32)
    self.t2 = nnx.Linear(width, width, rngs=rngs, **f32)
    self.d1 = nnx.Linear(freq_dim, width, rngs=rngs, **f32)
    self.d2 = nnx.Linear(width, width, rngs=rngs, **f32)

  def __call__(self, t: Array, s: Array) -> Array:
    t = t.astype(jnp.float32)
    s = s.astype(jnp.float32)
    et = self.t2(nnx.silu(self.t1(sinusoidal(t, self.freq_dim, scale=self.scale))))
    ed = self.d2(nnx.silu(self.d1(sinusoidal(t - s, self.freq_dim, scale=self.scale))))
    return et + ed


class LabelEmbed(nnx.Module):
  """Class labels ``(B,)`` int -> ``(B, width)``; row ``num_classes`` is the null label used
  for classifier-free guidance (labels are dropped to it during training)."""

  def __init__(self, num_classes: int, width: int, *, rngs: nnx.Rngs):
    self.num_classes = num_classes
    self.table = nnx.Embed(num_classes + 1, width, rngs=rngs)

  def __call__(self, cond: Array) -> Array:
    return self.table(cond.astype(jnp.int32))
