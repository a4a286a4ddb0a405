"""Networks: the one signature, dtypes, float32 time embeddings, clear shape errors."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fmdistill import models
from fmdistill.config import base
from fmdistill.models import embeddings


def _cfg(**kw):
  c = base("flow_matching").model
  c.update(kw)
  return c


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_mlp_signature_and_dtype(dtype):
  net, params = models.build(_cfg(width=32, depth=2, dtype=dtype), (3,), 5, jax.random.key(0))
  x = jnp.ones((4, 3))
  t = jnp.linspace(0.1, 0.9, 4)
  out = jax.jit(net)(params, x, t, t * 0.5, jnp.array([0, 1, 5, 2]))
  assert out.shape == x.shape and out.dtype == x.dtype
  # zero-initialised output layer: an untrained net outputs exactly zero
  assert float(jnp.abs(out).max()) == 0.0
  assert all(l.dtype == jnp.float32 for l in jax.tree_util.tree_leaves(params))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_dit_signature(dtype):
  net, params = models.build(_cfg(name="dit", width=32, depth=2, heads=2, dtype=dtype),
                             (8, 8, 1), 10, jax.random.key(0))
  x = jax.random.normal(jax.random.key(1), (2, 8, 8, 1))
  t = jnp.array([0.3, 0.8])
  out = jax.jit(net)(params, x, t, t * 0.1, jnp.array([3, 10]))
  assert out.shape == x.shape and out.dtype == x.dtype


def test_dit_depends_on_time_and_label_after_training_step():
  """Perturb the zero-initialised layers: the output then depends on t, s and the label."""
  net, params = models.build(_cfg(name="dit", width=32, depth=1, heads=2), (8, 8, 1), 10,
                             jax.random.key(0))
  params = jax.tree_util.tree_map(
      lambda p: p + 0.05 * jax.random.normal(jax.random.key(2), p.shape), params)
  x = jax.random.normal(jax.random.key(1), (1, 8, 8, 1))
  f = lambda t, s, c: net(params, x, jnp.array([t]), jnp.array([s]), jnp.array([c]))
  assert float(jnp.abs(f(0.5, 0.2, 1) - f(0.6, 0.2, 1)).max()) > 1e-4
  assert float(jnp.abs(f(0.5, 0.2, 1) - f(0.5, 0.3, 1)).max()) > 1e-4
  assert float(jnp.abs(f(0.5, 0.2, 1) - f(0.5, 0.2, 2)).max()) > 1e-4


def test_time_embedding_is_float32_and_resolves_small_time_steps():
  t = jnp.array([0.5], jnp.bfloat16)
  e = embeddings.sinusoidal(t, 64)
  assert e.dtype == jnp.float32
  d = embeddings.sinusoidal(jnp.array([0.5 + 1e-4]), 64) - embeddings.sinusoidal(
      jnp.array([0.5]), 64)
  assert float(jnp.abs(d).max()) > 1e-3  # a 1e-4 time step is visible in float32 features


def test_bad_shapes_and_names():
  with pytest.raises(ValueError, match="does not divide the image"):
    models.build(_cfg(name="dit", patch=3), (8, 8, 1), 0, jax.random.key(0))
  with pytest.raises(ValueError, match="takes vectors"):
    models.build(_cfg(name="mlp"), (8, 8, 1), 0, jax.random.key(0))
  with pytest.raises(ValueError, match="model.name"):
    models.build(_cfg(name="unet"), (2,), 0, jax.random.key(0))
