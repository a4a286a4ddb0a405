"""Training health: cheap statistics of the student network, logged by the train step of every
method to ``metrics.jsonl`` (``health/*``), so that a network that is dying shows it before the
loss does (docs/health.md).

JVP-trained students (sCM, MeanFlow, rCM) die in a recognisable way: the time modulation grows,
the residual stream drifts to large negative values, hidden units stop firing for every input,
and the output becomes a constant. ``metrics`` runs one forward pass of the student on a small
probe batch (data noised on the network's own path, at the times its method queries) and
reports (``models.Network.probe``):

* ``health/dead_frac``: fraction of hidden units below ``models.DEAD_BELOW`` on the whole batch;
* ``health/mod_scale``: the largest RMS of a multiplicative time modulation (1 with
  ``model.modulation='adn'``, unbounded with ``'film'``);
* ``health/resid_rms``: RMS of the residual stream before the output layers;
* ``health/alarm``: 1 when the dead fraction or the modulation crosses ``THRESHOLDS`` (a
  warning, not a stop; the residual RMS alone is not alarming: behind the final norm of
  ``'adn'`` a large residual stream is harmless).
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from fmdistill import flowmap, models, objectives, paths

Array = jax.Array
PROBE = 64  # examples in the probe batch
# levels past which a network is in trouble (measured on dying and healthy runs, docs/health.md)
THRESHOLDS = {"dead_frac": 0.2, "mod_scale": 3.0}
NAMES = ("dead_frac", "mod_scale", "resid_rms", "alarm")


def _native(config: ml_collections.ConfigDict, net: Any):
  """``(network, parameterisation, path)`` the weights are trained for (a ``Reparameterized``
  student is probed as the network it wraps), or ``None`` if it cannot be probed."""
  o = config.objective
  param, path = flowmap.Parameterization(o.param, o.sigma_d), paths.get_path(o.path, o.sigma_d)
  while isinstance(net, flowmap.Reparameterized):
    net, param, path = net.net, net.src, net.src_path
  return (net, param, path) if isinstance(net, models.Network) else None


def metrics(config: ml_collections.ConfigDict, net: Any, params: Any, batch: dict, key: Array
            ) -> dict[str, Array]:
  """``{'health/<name>': scalar}`` for the student ``params`` on a probe batch drawn from
  ``batch['x']`` (empty when the network is not a ``models.Network``)."""
  native = _native(config, net)
  if native is None or "x" not in batch:
    return {}
  inner, param, path = native
  x0 = batch["x"][:PROBE]
  n = x0.shape[0]
  kt, ks, ke = jax.random.split(key, 3)
  t = jax.random.uniform(kt, (n,), minval=0.02, maxval=0.98) * path.T
  entry = objectives.entry(config.method)
  if entry.sampler == "ode":
    s = t
  elif entry.consistency:
    s = jnp.zeros_like(t)
  else:
    s = t * jax.random.uniform(ks, (n,))
  x = path.sample(x0, jax.random.normal(ke, x0.shape, x0.dtype), t)
  c_in = paths.bcast(param.coefficients(t, s)[2], x)
  cond = batch.get("cond")
  stats = inner.probe(params, (c_in * x).astype(x.dtype), t, s,
                      None if cond is None else cond[:PROBE])
  alarm = jnp.zeros((), jnp.bool_)
  for k, limit in THRESHOLDS.items():
    alarm = alarm | (stats[k] > limit)
  stats["alarm"] = alarm.astype(jnp.float32)
  return {f"health/{k}": v.astype(jnp.float32) for k, v in stats.items()}


def when(log: Array, config, net, params, batch, key) -> dict[str, Array]:
  """``metrics`` when ``log`` (a traced bool) is true, NaNs otherwise (one ``lax.cond``: the
  probe runs only on the steps that are logged)."""
  if _native(config, net) is None or "x" not in batch:
    return {}
  nan = {f"health/{k}": jnp.full((), jnp.nan, jnp.float32) for k in NAMES}
  return jax.lax.cond(log, lambda: metrics(config, net, params, batch, key), lambda: nan)
