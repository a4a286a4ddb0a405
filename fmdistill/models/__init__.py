"""Networks with the one call signature ``F(params, x, t, s, cond) -> array like x``.

Modules are written in ``flax.nnx`` and split once into ``(graphdef, params)``; ``params`` is a
plain nested dict of arrays (``nnx.to_pure_dict``), so losses, EMA, sharding rules and orbax all
see an ordinary pytree and ``Network.__call__`` is a pure function of it.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from fmdistill import errors
from fmdistill.errors import ConfigError
from flax import nnx

from fmdistill.models.dit import DiT
from fmdistill.models.embeddings import MODULATIONS, TIME_EMBEDDINGS
from fmdistill.models.mlp import MLP

Array = jax.Array
MODELS = ("mlp", "dit")
# model fields that define the function a set of weights computes (a student initialised from
# a teacher must agree with it on all of them); dtype and attention impl only change precision
FUNCTION_FIELDS = ("name", "width", "depth", "patch", "heads", "mlp_ratio", "time_embedding",
                   "time_scale", "qk_norm", "modulation")
# what a config written before a field existed means (its network is rebuilt as it was trained)
LEGACY = {"time_embedding": "legacy", "time_scale": 1000.0, "qk_norm": False,
          "modulation": "film", "guidance_embed": False, "guidance_interval": False}
DEAD_BELOW = -4.0  # a unit whose pre-activation stays below this on a whole probe batch is dead
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class Network:
  """A pure network: ``net(params, x, t, s, cond=None)``; hashable, so usable as a jit static."""
  graphdef: Any

  def __call__(self, params: Any, x: Array, t: Array, s: Array, cond: Array | None = None
               ) -> Array:
    return nnx.merge(self.graphdef, params)(x, t, s, cond)

  def features(self, params: Any, x: Array, t: Array, s: Array, cond=None) -> Array:
    """The last hidden layer, ``(B, width)`` (mean over tokens for the DiT): the features a
    discriminator head reads (DMD2's GAN term on its critic)."""
    return nnx.merge(self.graphdef, params).forward(x, t, s, cond, features=True)

  def probe(self, params: Any, x: Array, t: Array, s: Array, cond=None) -> dict[str, Array]:
    """Training-health statistics of one forward pass (scalars, float32):

    * ``dead_frac``: fraction of hidden units (the pre-activations of the hidden layers' and the
      output layer's non-linearities) that stay below ``DEAD_BELOW`` for every example;
    * ``mod_scale``: the largest RMS (over channels, mean over the batch) of any multiplicative
      time modulation (``1 + scale`` and gates for ``'film'``; ``pnorm(scale)``, i.e. 1, and
      ``tanh`` gates for ``'adn'``);
    * ``resid_rms``: RMS of the residual stream before the output layers.
    """
    stats: dict = {}
    nnx.merge(self.graphdef, params).forward(x, t, s, cond, stats=stats)
    f32 = lambda a: a.astype(jnp.float32)
    dead = [jnp.max(f32(a), axis=0) < DEAD_BELOW for a in stats["preact"]]
    units = sum(d.size for d in dead)
    rms = lambda a: jnp.sqrt(jnp.mean(jnp.square(f32(a)), axis=-1))
    return {"dead_frac": sum(jnp.sum(d) for d in dead).astype(jnp.float32) / units,
            "mod_scale": jnp.max(jnp.stack([jnp.mean(rms(m)) for m in stats["mod"]])),
            "resid_rms": jnp.mean(jnp.stack([jnp.sqrt(jnp.mean(jnp.square(f32(r))))
                                             for r in stats["resid"]]))}


def build(cfg: ml_collections.ConfigDict, data_shape: tuple[int, ...], num_classes: int,
          key: Array) -> tuple[Network, dict]:
  """Build ``cfg.name`` for examples of shape ``data_shape`` (no batch axis).

  Returns the pure network and its float32 params (nested dict).
  """
  if cfg.name not in MODELS:
    raise ConfigError(f"config.model.name must be one of {list(MODELS)}, got {cfg.name!r}")
  if cfg.dtype not in DTYPES:
    raise ConfigError(f"config.model.dtype must be one of {list(DTYPES)}, got {cfg.dtype!r}")
  rngs = nnx.Rngs(params=key)
  dtype = DTYPES[cfg.dtype]
  # configs written before a field existed rebuild the network they were trained with (LEGACY)
  field = lambda k: cfg.get(k, LEGACY[k])
  time = dict(kind=field("time_embedding"), scale=float(field("time_scale")))
  if time["kind"] not in TIME_EMBEDDINGS:
    raise errors.invalid("model.time_embedding", time["kind"], list(TIME_EMBEDDINGS))
  if field("modulation") not in MODULATIONS:
    raise errors.invalid("model.modulation", field("modulation"), list(MODULATIONS))
  extra = dict(modulation=field("modulation"), guidance_embed=bool(field("guidance_embed")),
               guidance_interval=bool(field("guidance_interval")))
  if cfg.name == "mlp":
    if len(data_shape) != 1:
      raise ConfigError(f"model 'mlp' takes vectors (d,), the data has shape {data_shape}; "
                       "use model.name='dit' for images")
    module = MLP(data_shape[0], cfg.width, cfg.depth, num_classes, dtype, time=time, **extra,
                 rngs=rngs)
  else:
    if len(data_shape) != 3:
      raise ConfigError(f"model 'dit' takes images (H, W, C), the data has shape {data_shape}")
    module = DiT(tuple(data_shape), cfg.patch, cfg.width, cfg.depth, cfg.heads, cfg.mlp_ratio,
                 num_classes, dtype, cfg.attn_impl, qk_norm=bool(field("qk_norm")),
                 time=time, **extra, rngs=rngs)
  graphdef, state = nnx.split(module)
  return Network(graphdef), nnx.to_pure_dict(state)


def param_count(params: Any) -> int:
  return sum(int(x.size) for x in jax.tree_util.tree_leaves(params))
