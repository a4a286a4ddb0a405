"""A small DiT (Peebles & Xie 2023) flow-map network for images: ``F(x, t, s, cond)``.

``x (B, H, W, C)`` -> patches of ``patch x patch`` -> ``depth`` transformer blocks with
adaptive-norm conditioning on ``TimeEmbed(t, t - s) + LabelEmbed(cond)`` (``+ GuidanceEmbed(w)``
with ``guidance_embed``) -> unpatchify. Attention goes through ``fmdistill.parallel.attention``
(the Pallas kernel, in ``shard_map`` when a mesh is set) so that the fused kernel (and its JVP
rule) is used by every objective unchanged.

``modulation='adn'`` (default): sCM's adaptive double normalisation (Lu & Song 2024, Sec. 4.1):
shift and scale of every adaptive norm are ``pnorm``-ed (unit RMS over channels), and the
residual gates of adaLN-zero are bounded, ``tanh(g(c))`` (still zero at initialisation, so
every block starts as the identity). ``'film'``: DiT's adaLN-zero as in checkpoints written
before (``x (1 + scale) + shift``, unbounded gates).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from einops import rearrange
from flax import nnx

from fmdistill import errors, parallel
from fmdistill.errors import ConfigError
from fmdistill.models.embeddings import (GuidanceEmbed, LabelEmbed, MODULATIONS, TimeEmbed,
                                         condition, pnorm, record)

Array = jax.Array


def pos_embed_2d(h: int, w: int, dim: int) -> np.ndarray:
  """Fixed 2-D sin/cos position embedding ``(h * w, dim)``."""
  def one_d(pos, d):
    omega = 1.0 / 10_000 ** (np.arange(d // 2) / (d // 2))
    out = pos.reshape(-1)[:, None] * omega[None]
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)
  gy, gx = np.meshgrid(np.arange(h, dtype=np.float32), np.arange(w, dtype=np.float32),
                       indexing="ij")
  return np.concatenate([one_d(gy, dim // 2), one_d(gx, dim // 2)], axis=1).astype(np.float32)


def modulate(x: Array, shift: Array, scale: Array) -> Array:
  """``x * scale + shift`` per example (``scale`` already multiplicative: ``1 + s`` for FiLM)."""
  return x * scale[:, None] + shift[:, None]


class Block(nnx.Module):
  """Pre-norm transformer block with adaLN-zero (shift, scale, gate for attention and MLP).

  ``qk_norm``: RMSNorm (learned scale, initialised to 1) on q and k of every head over the
  head dim, before attention; this bounds the attention logits, which users of JVP-trained
  models report to cure loss spikes. Without it the block has no extra parameters.
  """

  def __init__(self, width: int, heads: int, mlp_ratio: float, dtype, attn_impl: str, *,
               qk_norm: bool = False, modulation: str = "adn", rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=jnp.float32)
    self.heads, self.attn_impl, self.qk_norm = heads, attn_impl, qk_norm
    self.modulation = modulation
    if qk_norm:
      self.q_norm = nnx.RMSNorm(width // heads, epsilon=1e-6, rngs=rngs, **kw)
      self.k_norm = nnx.RMSNorm(width // heads, epsilon=1e-6, rngs=rngs, **kw)
    self.norm1 = nnx.LayerNorm(width, use_scale=False, use_bias=False, rngs=rngs, **kw)
    self.norm2 = nnx.LayerNorm(width, use_scale=False, use_bias=False, rngs=rngs, **kw)
    self.qkv = nnx.Linear(width, 3 * width, rngs=rngs, **kw)
    self.proj = nnx.Linear(width, width, rngs=rngs, **kw)
    hidden = int(width * mlp_ratio)
    self.fc1 = nnx.Linear(width, hidden, rngs=rngs, **kw)
    self.fc2 = nnx.Linear(hidden, width, rngs=rngs, **kw)
    if modulation == "adn":  # shift/scale (pnorm needs a non-zero start) and zero-init gates
      self.ada = nnx.Linear(width, 4 * width, rngs=rngs, **kw)
      self.gate = nnx.Linear(width, 2 * width, rngs=rngs, kernel_init=nnx.initializers.zeros,
                             **kw)
    else:
      self.ada = nnx.Linear(width, 6 * width, rngs=rngs, kernel_init=nnx.initializers.zeros,
                            **kw)

  def _modulation(self, c: Array) -> tuple[Array, ...]:
    """``(shift1, scale1, gate1, shift2, scale2, gate2)``, scales multiplicative."""
    if self.modulation == "adn":
      sh1, sc1, sh2, sc2 = (pnorm(a) for a in jnp.split(self.ada(c), 4, axis=-1))
      g1, g2 = jnp.split(jnp.tanh(self.gate(c)), 2, axis=-1)
      return sh1, sc1, g1, sh2, sc2, g2
    sh1, sc1, g1, sh2, sc2, g2 = jnp.split(self.ada(c), 6, axis=-1)
    return sh1, 1 + sc1, g1, sh2, 1 + sc2, g2

  def __call__(self, x: Array, c: Array, stats: dict | None = None) -> Array:
    sh1, sc1, g1, sh2, sc2, g2 = self._modulation(nnx.silu(c))
    for m in (sc1, g1, sc2, g2):
      record(stats, "mod", m)
    q, k, v = jnp.split(self.qkv(modulate(self.norm1(x), sh1, sc1)), 3, axis=-1)
    q, k, v = (rearrange(a, "b n (h d) -> b n h d", h=self.heads) for a in (q, k, v))
    if self.qk_norm:
      q, k = self.q_norm(q), self.k_norm(k)
    a = parallel.attention(q, k, v, impl=self.attn_impl)
    x = x + g1[:, None] * self.proj(rearrange(a, "b n h d -> b n (h d)"))
    a = self.fc1(modulate(self.norm2(x), sh2, sc2))
    record(stats, "preact", a.reshape(-1, a.shape[-1]))
    return x + g2[:, None] * self.fc2(nnx.gelu(a, approximate=True))


class DiT(nnx.Module):
  """Diffusion transformer; ``num_classes = 0`` means unconditional; ``qk_norm`` as in
  ``Block`` (``config.model.qk_norm``, default off); ``modulation`` and ``guidance_embed`` as in
  the module docstring (``config.model.modulation``, ``config.model.guidance_embed``)."""

  def __init__(self, image_shape: tuple[int, int, int], patch: int = 2, width: int = 128,
               depth: int = 4, heads: int = 4, mlp_ratio: float = 4.0, num_classes: int = 0,
               dtype: jnp.dtype = jnp.float32, attn_impl: str = "auto", *,
               time: dict | None = None, qk_norm: bool = False, modulation: str = "adn",
               guidance_embed: bool = False, guidance_interval: bool = False,
               rngs: nnx.Rngs):
    h, w, ch = image_shape
    if h % patch or w % patch:
      raise ConfigError(f"config.model.patch={patch} does not divide the image size {h}x{w}")
    if width % heads:
      raise ConfigError(f"config.model.heads={heads} does not divide model.width={width}")
    if modulation not in MODULATIONS:
      raise errors.invalid("model.modulation", modulation, list(MODULATIONS))
    self.patch, self.grid, self.channels, self.depth, self.dtype = patch, (h // patch, w // patch), ch, depth, dtype
    self.modulation = modulation
    kw = dict(dtype=dtype, param_dtype=jnp.float32)
    self.embed = nnx.Linear(patch * patch * ch, width, rngs=rngs, **kw)
    self.width = width
    self.time = TimeEmbed(width, **(time or {}), rngs=rngs)
    self.label = LabelEmbed(num_classes, width, rngs=rngs) if num_classes else None
    self.guidance = (GuidanceEmbed(width, interval=guidance_interval, rngs=rngs)
                     if guidance_embed else None)
    for i in range(depth):
      setattr(self, f"block{i}", Block(width, heads, mlp_ratio, dtype, attn_impl,
                                       qk_norm=qk_norm, modulation=modulation, rngs=rngs))
    self.final_norm = nnx.LayerNorm(width, use_scale=False, use_bias=False, rngs=rngs, **kw)
    init = {} if modulation == "adn" else dict(kernel_init=nnx.initializers.zeros)
    self.final_ada = nnx.Linear(width, 2 * width, rngs=rngs, **init, **kw)
    self.final = nnx.Linear(width, patch * patch * ch, rngs=rngs,
                            kernel_init=nnx.initializers.zeros, **kw)

  def __call__(self, x: Array, t: Array, s: Array, cond=None) -> Array:
    return self.forward(x, t, s, cond)

  def forward(self, x: Array, t: Array, s: Array, cond=None, stats: dict | None = None,
              features: bool = False) -> Array:
    """The network; ``stats`` (a dict) collects health probes (``models.probe``), ``features``
    returns the mean-pooled last hidden layer ``(B, width)`` instead of the output."""
    p = self.patch
    gh, gw = self.grid
    c = condition(self, t, s, cond).astype(self.dtype)
    z = rearrange(x.astype(self.dtype), "b (gh p1) (gw p2) c -> b (gh gw) (p1 p2 c)", p1=p, p2=p)
    z = self.embed(z) + jnp.asarray(pos_embed_2d(gh, gw, self.width), self.dtype)[None]
    for i in range(self.depth):
      z = getattr(self, f"block{i}")(z, c, stats)
    record(stats, "resid", z.reshape(-1, z.shape[-1]))
    shift, scale = jnp.split(self.final_ada(nnx.silu(c)), 2, axis=-1)
    shift, scale = (pnorm(shift), pnorm(scale)) if self.modulation == "adn" else (shift, 1 + scale)
    record(stats, "mod", scale)
    z = modulate(self.final_norm(z), shift, scale)
    if features:
      return jnp.mean(z, axis=1)
    z = self.final(z)
    out = rearrange(z, "b (gh gw) (p1 p2 c) -> b (gh p1) (gw p2) c", gh=gh, gw=gw, p1=p, p2=p)
    return out.astype(x.dtype)
