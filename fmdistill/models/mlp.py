"""MLP flow-map network for low-dimensional data: ``F(x, t, s, cond) -> (B, d)``."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from fmdistill.models.embeddings import (GuidanceEmbed, LabelEmbed, MODULATIONS, TimeEmbed,
                                         condition, pnorm, record)

Array = jax.Array


class MLP(nnx.Module):
  """Residual MLP with time conditioning of its pre-norm blocks.

  ``x (B, d)``, ``t, s (B,)`` float32, optional ``cond`` (labels ``(B,)`` int, or a dict with
  ``'label'`` and, with ``guidance_embed``, the guidance scale ``'w'``; ``embeddings.split_cond``).
  Hidden layers run in ``dtype``; the output is cast back to the dtype of ``x``. The last layer is
  zero-initialised so an untrained flow map is the identity plus zero displacement.

  ``modulation`` (``config.model.modulation``):

  * ``'adn'`` (default): sCM's adaptive double normalisation (Lu & Song 2024, Sec. 4.1 "network
    architecture"): ``z = LN(h) * pnorm(s(c)) + pnorm(b(c))`` with ``pnorm`` the RMS
    normalisation over channels, so the time/label modulation has unit RMS whatever the weights;
    the output layer reads ``silu(LN(h) * pnorm(s_f(c)) + pnorm(b_f(c)))``, a final layer
    modulated the same way (as DiT's final adaLN layer), so its inputs stay normalised (a
    residual stream that drifts to large negative values cannot silence it) while their scale
    can still depend on the time. (An unmodulated final norm was measured to slow training from
    random initialisation badly: FACM's 400-step 1-step RMSE .81 vs .20 modulated, .09 FiLM.)
  * ``'film'``: the network of checkpoints written before (``LN(h) (1 + s(c)) + b(c)``, learned
    LayerNorm affine, no final norm): its modulation is unbounded, which is how JVP-trained
    students died (docs/health.md).
  """

  def __init__(self, dim: int, width: int = 256, depth: int = 4, num_classes: int = 0,
               dtype: jnp.dtype = jnp.float32, *, time: dict | None = None,
               modulation: str = "adn", guidance_embed: bool = False,
               guidance_interval: bool = False, rngs: nnx.Rngs):
    if modulation not in MODULATIONS:
      raise ValueError(f"modulation must be one of {MODULATIONS}, got {modulation!r}")
    self.depth, self.dtype, self.modulation = depth, dtype, modulation
    self.time = TimeEmbed(width, **(time or {}), rngs=rngs)
    self.label = LabelEmbed(num_classes, width, rngs=rngs) if num_classes else None
    self.guidance = (GuidanceEmbed(width, interval=guidance_interval, rngs=rngs)
                     if guidance_embed else None)
    kw = dict(dtype=dtype, param_dtype=jnp.float32)
    affine = modulation == "film"
    self.inp = nnx.Linear(dim, width, rngs=rngs, **kw)
    for i in range(depth):
      setattr(self, f"film{i}", nnx.Linear(width, 2 * width, rngs=rngs, **kw))
      setattr(self, f"fc{i}a", nnx.Linear(width, width, rngs=rngs, **kw))
      setattr(self, f"fc{i}b", nnx.Linear(width, width, rngs=rngs, **kw))
      setattr(self, f"norm{i}", nnx.LayerNorm(width, use_scale=affine, use_bias=affine,
                                              rngs=rngs, dtype=dtype, param_dtype=jnp.float32))
    if not affine:
      self.final_norm = nnx.LayerNorm(width, use_scale=False, use_bias=False, rngs=rngs,
                                      dtype=dtype, param_dtype=jnp.float32)
      self.final_mod = nnx.Linear(width, 2 * width, rngs=rngs, **kw)
    self.out = nnx.Linear(width, dim, rngs=rngs, kernel_init=nnx.initializers.zeros, **kw)

  def __call__(self, x: Array, t: Array, s: Array, cond=None) -> Array:
    return self.forward(x, t, s, cond)

  def forward(self, x: Array, t: Array, s: Array, cond=None, stats: dict | None = None,
              features: bool = False) -> Array:
    """The network; ``stats`` (a dict) collects health probes (``models.probe``), ``features``
    returns the last hidden layer ``(B, width)`` instead of the output."""
    c = nnx.silu(condition(self, t, s, cond)).astype(self.dtype)
    h = self.inp(x.astype(self.dtype))
    for i in range(self.depth):
      scale, shift = jnp.split(getattr(self, f"film{i}")(c), 2, axis=-1)
      if self.modulation == "adn":
        scale, shift = pnorm(scale), pnorm(shift)
      else:
        scale = 1 + scale
      record(stats, "mod", scale)
      z = getattr(self, f"norm{i}")(h) * scale + shift
      a = getattr(self, f"fc{i}a")(nnx.silu(z))
      record(stats, "preact", a)
      h = h + getattr(self, f"fc{i}b")(nnx.silu(a))
    record(stats, "resid", h)
    if self.modulation == "adn":
      fs, fb = jnp.split(self.final_mod(c), 2, axis=-1)
      h = self.final_norm(h) * pnorm(fs) + pnorm(fb)
    record(stats, "preact", h)
    if features:
      return h
    return self.out(nnx.silu(h)).astype(x.dtype)
