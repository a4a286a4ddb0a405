"""MeanFlow's official-code options (issue 17 item 5): the sum-reduced adaptive weight and the
guidance time window, checked against the formulas of Gsunshine/meanflow ``meanflow.py``."""
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fmdistill import config as config_lib, models, objectives
from fmdistill.errors import ConfigError
from fmdistill.objectives import _tangent, imf, meanflow

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "experiments"))
import toy2d  # noqa: E402


def _official(diff: np.ndarray, c: float, p: float) -> float:
  """The official loss: per-example SUM of squares ``e``, ``mean_B(e / (e + c)^p)``."""
  e = np.sum(np.square(diff.astype(np.float64)).reshape(diff.shape[0], -1), axis=-1)
  return float(np.mean(e / (e + c) ** p))


@pytest.mark.parametrize("p", [1.0, 0.75])
def test_sum_reduced_loss_is_the_official_one_and_the_mean_one_with_c_over_d(p):
  """``reduce='sum'`` is the official ``loss.sum(axis=(1, 2, 3))`` weighting; it equals
  ``D^(1-p)`` times the ``'mean'`` loss with ``c / D`` -- and differs from ``'mean'`` with the
  same ``c`` (so the option is not a no-op)."""
  diff = jax.random.normal(jax.random.key(0), (6, 4, 4, 3)) * jnp.linspace(0.01, 2.0, 6)[
      :, None, None, None]
  d, c = 4 * 4 * 3, 0.01
  summed, e_sum = _tangent.adaptive_loss(diff, c, p, "sum")
  mean_scaled, e_mean = _tangent.adaptive_loss(diff, c / d, p, "mean")
  np.testing.assert_allclose(float(summed), _official(np.asarray(diff), c, p), rtol=1e-5)
  np.testing.assert_allclose(float(summed), d ** (1 - p) * float(mean_scaled), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(e_sum), d * np.asarray(e_mean), rtol=1e-5)
  same_c, _ = _tangent.adaptive_loss(diff, c, p, "mean")
  assert abs(float(same_c) * d ** (1 - p) - float(summed)) > 1e-3 * float(summed)
  # the weights, per example: w_sum(c) = D^-p w_mean(c / D)
  np.testing.assert_allclose(np.asarray(_tangent.adaptive_weight(e_sum, c, p)),
                             d ** -p * np.asarray(_tangent.adaptive_weight(e_mean, c / d, p)),
                             rtol=1e-5)


@pytest.mark.parametrize("name", ["meanflow", "imf"])
def test_the_losses_use_the_reduction(name):
  """Through ``meanflow_loss`` / ``imf_loss`` on a real network: ``adaptive_reduce='sum'``
  with ``c`` gives the ``'mean'`` loss with ``c / D`` (``p = 1``, same key, same draw)."""
  net, params = models.build(config_lib.base(name).model, (3,), 0, jax.random.key(0))
  batch = {"x": jax.random.normal(jax.random.key(1), (32, 3))}
  loss_fn = objectives.get(name)

  def loss(reduce, c):
    cfg = objectives.default_config(name)
    cfg.update(adaptive_reduce=reduce, adaptive_c=c, adaptive_p=1.0)
    return float(loss_fn(params, batch, jax.random.key(2), net=net, teacher=None,
                         ema_params=params, step=0, cfg=cfg)[0])

  np.testing.assert_allclose(loss("sum", 0.3), loss("mean", 0.1), rtol=1e-5)
  assert abs(loss("sum", 0.3) - loss("mean", 0.3)) > 1e-4


def _net(p, x, t, s, cond):
  """A fake ``u(x, t, s | c)`` that depends on the label, so guidance changes the target."""
  return jnp.broadcast_to((0.1 * cond + t)[:, None].astype(x.dtype), x.shape)


def test_guidance_outside_the_window_is_unguided():
  """The official ``guidance_fn``: ``omega v + kappa u_c + (1 - omega - kappa) u_null`` for
  ``t`` in ``[t_start, t_end]``, ``v`` outside it (``omega = 1, kappa = 0``) and for dropped
  labels."""
  cfg = objectives.default_config("meanflow")
  cfg.update(num_classes=10, guidance=0.2, guidance_kappa=0.92, guidance_t_min=0.3,
             guidance_t_max=0.75)
  t = jnp.array([0.1, 0.3, 0.5, 0.75, 0.9, 0.5])
  cond = jnp.array([1, 2, 3, 4, 5, 10])  # the last label is dropped (null = 10)
  x, v = jnp.ones((6, 2)), jnp.full((6, 2), 3.0)
  out = np.asarray(meanflow.guided_velocity(_net, None, x, t, v, cond, cfg))
  u_c, u_n = np.asarray(_net(None, x, t, t, cond)), np.asarray(_net(None, x, t, t, cond * 0 + 10))
  guided = 0.2 * 3.0 + 0.92 * u_c + (1 - 0.2 - 0.92) * u_n
  inside = np.array([False, True, True, True, False, False])
  want = np.where(inside[:, None], guided, 3.0)
  np.testing.assert_allclose(out, want, rtol=1e-6)
  assert not np.allclose(guided[inside], 3.0)  # guidance does change the target inside


def test_the_default_window_guides_every_time_as_before():
  """Defaults ``[0, 1]``: every ``t`` is guided (the behaviour before the window existed)."""
  cfg = objectives.default_config("meanflow")
  cfg.update(num_classes=10, guidance=1.0, guidance_kappa=0.5)
  t = jnp.array([0.0, 0.4, 1.0])
  cond = jnp.array([1, 2, 3])
  x, v = jnp.ones((3, 2)), jnp.full((3, 2), 3.0)
  out = np.asarray(meanflow.guided_velocity(_net, None, x, t, v, cond, cfg))
  u_c, u_n = np.asarray(_net(None, x, t, t, cond)), np.asarray(_net(None, x, t, t, cond * 0 + 10))
  np.testing.assert_allclose(out, 3.0 + 0.5 * u_c - 0.5 * u_n, rtol=1e-6)
  assert objectives.default_config("meanflow").adaptive_reduce == "mean"
  assert objectives.default_config("meanflow").adaptive_c == 1e-3  # toy defaults unchanged
  assert imf.defaults().adaptive_reduce == "mean"


@pytest.mark.parametrize("field,value", [("adaptive_reduce", "max"),
                                         ("guidance_t_min", 1.5)])
def test_bad_values_are_refused_by_validate(field, value):
  c = toy2d.get_config("meanflow")
  c.objective[field] = value
  with pytest.raises(ConfigError, match=field.split("_t_")[0]):
    config_lib.validate(c)
