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


TIME_EMBEDDINGS = ("positional", "legacy")
MODULATIONS = ("adn", "film")


def pnorm(a: Array, eps: float = 1e-4) -> Array:
  """Pixel normalisation over the last axis, ``a / sqrt(mean(a^2) + eps)`` (computed in float32,
  returned in ``a``'s dtype): sCM's ``pnorm`` in adaptive double normalisation."""
  a32 = a.astype(jnp.float32)
  return (a32 * jax.lax.rsqrt(jnp.mean(jnp.square(a32), -1, keepdims=True) + eps)).astype(a.dtype)


def record(stats: dict | None, name: str, value: Array) -> None:
  """Append ``value`` to ``stats[name]`` when a health probe is collecting (``stats`` a dict)."""
  if stats is not None:
    stats.setdefault(name, []).append(value)


class TimeEmbed(nnx.Module):
  """Embeds ``t`` and ``d = t - s`` (MeanFlow's choice of time inputs), each by sinusoidal
  features of ``scale * time`` and a float32 two-layer MLP; output ``(B, width)`` float32.

  ``kind='positional'`` (the default for every network, teacher and student alike) is sCM's
  stable time conditioning (its section on time embeddings: positional features of
  ``c_noise(t) = t`` instead of ``1000 t`` or large-scale Fourier features), ``scale = 1``, so
  ``d/dt`` of the embedding stays O(1) and ``jax.jvp`` tangents are usable. The ``d`` branch is
  exactly zero at ``d = 0`` by construction (features ``[sin(d f), cos(d f) - 1]`` and
  bias-free layers) and its output layer starts at zero: a flow-matching teacher (trained only
  at ``s = t``) leaves it untouched, and a student initialised from the teacher starts as
  ``F(x, t, s) = v(x, t)`` for every ``s`` (the Euler jump). ``kind='legacy'`` is the embedding
  of checkpoints written before this change (``scale = 1000``, plain sin/cos ``d`` branch with
  biases).
  """

  def __init__(self, width: int, freq_dim: int = 128, *, scale: float = 1.0,
               kind: str = "positional", rngs: nnx.Rngs):
    if kind not in TIME_EMBEDDINGS:
      raise ValueError(f"time embedding must be one of {TIME_EMBEDDINGS}, got {kind!r}")
    self.freq_dim, self.scale, self.kind = freq_dim, scale, kind
    f32 = dict(dtype=jnp.float32, param_dtype=jnp.float32)
    self.t1 = nnx.Linear(freq_dim, width, rngs=rngs, **f32)
    self.t2 = nnx.Linear(width, width, rngs=rngs, **f32)
    if kind == "legacy":
      self.d1 = nnx.Linear(freq_dim, width, rngs=rngs, **f32)
      self.d2 = nnx.Linear(width, width, rngs=rngs, **f32)
    else:
      self.d1 = nnx.Linear(freq_dim, width, use_bias=False, rngs=rngs, **f32)
      self.d2 = nnx.Linear(width, width, use_bias=False, kernel_init=nnx.initializers.zeros,
                           rngs=rngs, **f32)

  def __call__(self, t: Array, s: Array) -> Array:
    t = t.astype(jnp.float32)
    d = t - s.astype(jnp.float32)
    et = self.t2(nnx.silu(self.t1(sinusoidal(t, self.freq_dim, scale=self.scale))))
    feats = sinusoidal(d, self.freq_dim, scale=self.scale)
    if self.kind == "positional":  # [cos - 1, sin]: exactly zero at d = 0
      half = self.freq_dim // 2
      feats = feats - jnp.concatenate([jnp.ones((1, half)), jnp.zeros((1, feats.shape[1] - half))],
                                      axis=1)
    return et + self.d2(nnx.silu(self.d1(feats)))


class LabelEmbed(nnx.Module):
  """Class labels ``(B,)`` int -> ``(B, width)``; row ``num_classes`` is the null label used
  for classifier-free guidance (labels are dropped to it during training)."""

  def __init__(self, num_classes: int, width: int, *, rngs: nnx.Rngs):
    self.num_classes = num_classes
    self.table = nnx.Embed(num_classes + 1, width, rngs=rngs)

  def __call__(self, cond: Array) -> Array:
    return self.table(cond.astype(jnp.int32))


def split_cond(cond) -> tuple[Array | None, Array | None]:
  """``(labels, guidance scale w)`` from a network's ``cond``: labels ``(B,)`` int, ``None``, or
  a dict ``{'label': (B,) int or None, 'w': (B,) float}`` (classifier-free-guidance students
  that take the scale as an input; ``fmdistill.flowmap`` binds teachers the same way)."""
  if isinstance(cond, dict):
    return cond.get("label"), cond.get("w")
  return cond, None


def guidance_interval(cond) -> Array | None:
  """The guidance interval ``(B, 2)`` (``[lo, hi]`` in units of ``T``) a ``cond`` dict carries
  under ``'interval'`` (improved MeanFlow's interval condition), else ``None``."""
  return cond.get("interval") if isinstance(cond, dict) else None


def condition(net: nnx.Module, t: Array, s: Array, cond) -> Array:
  """The conditioning vector ``(B, width)`` of a network with modules ``time`` (``TimeEmbed``),
  ``label`` and ``guidance`` (each ``None`` when absent): the time embedding of ``(t, s)``
  plus the label's and the guidance scale's (and interval's) embeddings where ``cond`` has
  them (``split_cond``)."""
  label, w = split_cond(cond)
  c = net.time(t, s)
  if net.label is not None and label is not None:
    c = c + net.label(label)
  if net.guidance is not None:
    c = c + net.guidance(w, c.shape[0], guidance_interval(cond))
  return c


def _centred(a: Array, at: float, dim: int) -> Array:
  """Sinusoidal features of ``a - at`` minus their value at ``a = at``: exactly zero there."""
  half = dim // 2
  zero = jnp.concatenate([jnp.ones((1, half)), jnp.zeros((1, dim - half))], axis=1)
  return sinusoidal(a - at, dim, scale=1.0) - zero


class GuidanceEmbed(nnx.Module):
  """The guidance scale ``w (B,)`` as a ``(B, width)`` embedding added to the time/label
  conditioning (``config.model.guidance_embed``). Features ``[cos((w - 1) f) - 1, sin((w - 1)
  f)]`` and bias-free layers make the embedding exactly zero at ``w = 1`` (and when no ``w`` is
  given); the output layer starts at zero, so a student built from an unguided teacher starts
  as that teacher for every ``w``.

  ``interval=True`` (``config.model.guidance_interval``) adds a second branch for the guidance
  interval ``[lo, hi] (B, 2)`` (improved MeanFlow conditions on it as well as on ``w``): the
  same centred features of ``lo`` and ``hi - 1``, zero for the full interval ``[0, 1]`` (and
  when none is given), its output layer also zero at initialisation."""

  def __init__(self, width: int, freq_dim: int = 64, *, interval: bool = False,
               rngs: nnx.Rngs):
    self.freq_dim = freq_dim
    f32 = dict(dtype=jnp.float32, param_dtype=jnp.float32)
    self.w1 = nnx.Linear(freq_dim, width, use_bias=False, rngs=rngs, **f32)
    self.w2 = nnx.Linear(width, width, use_bias=False, kernel_init=nnx.initializers.zeros,
                         rngs=rngs, **f32)
    if interval:
      self.i1 = nnx.Linear(2 * freq_dim, width, use_bias=False, rngs=rngs, **f32)
      self.i2 = nnx.Linear(width, width, use_bias=False, kernel_init=nnx.initializers.zeros,
                           rngs=rngs, **f32)
    else:
      self.i1 = self.i2 = None

  def __call__(self, w: Array | None, batch: int, interval: Array | None = None) -> Array:
    w = jnp.ones((batch,), jnp.float32) if w is None else jnp.asarray(w, jnp.float32)
    w = jnp.broadcast_to(w, (batch,))
    out = self.w2(nnx.silu(self.w1(_centred(w, 1.0, self.freq_dim))))
    if self.i1 is not None:
      iv = jnp.broadcast_to(jnp.asarray((0.0, 1.0) if interval is None else interval,
                                        jnp.float32), (batch, 2))
      feats = jnp.concatenate([_centred(iv[:, 0], 0.0, self.freq_dim),
                               _centred(iv[:, 1], 1.0, self.freq_dim)], axis=-1)
      out = out + self.i2(nnx.silu(self.i1(feats)))
    return out
