"""Shared inputs and checks for the Pallas attention tests (small shapes: interpret mode)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

# Sequence lengths deliberately not multiples of the 16-wide test blocks.
B, N, H, D = 2, 40, 2, 16
BLOCK = 16
TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}


def qkv(seed: int = 0, shape=(B, N, H, D), nk: int | None = None, dtype=jnp.float32,
        n: int = 3):
  """``n`` normal arrays; the 2nd and 3rd (k, v) get ``nk`` tokens if given."""
  keys = jax.random.split(jax.random.PRNGKey(seed), n)
  out = []
  for i, key in enumerate(keys):
    s = shape if nk is None or i % 3 == 0 else shape[:1] + (nk,) + shape[2:]
    out.append(jax.random.normal(key, s, jnp.float32).astype(dtype))
  return out


def key_mask(seed: int, b: int, nk: int) -> jax.Array:
  """Random padding mask; the last batch row masks every key (output must be zeros)."""
  m = jax.random.bernoulli(jax.random.PRNGKey(seed), 0.7, (b, nk))
  return m.at[-1].set(False) if b > 1 else m


def assert_close(a, b, tol: float):
  """Pytree-wise ``max|a - b| <= tol * max(1, max|b|)`` (error relative to each leaf's scale)."""
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(la) == len(lb)
  for x, y in zip(la, lb):
    assert x.shape == y.shape and x.dtype == y.dtype, (x.shape, x.dtype, y.shape, y.dtype)
    x, y = np.asarray(x, np.float32), np.asarray(y, np.float32)
    assert np.all(np.isfinite(x)), "non-finite values"
    err, scale = float(np.max(np.abs(x - y))), max(1.0, float(np.max(np.abs(y))))
    assert err <= tol * scale, f"max abs error {err:.3g} > {tol:g} * {scale:.3g}"


def init_net(seed: int, dim: int = 32) -> dict:
  """Params of a tiny 2-block attention net (plain jnp, no Flax)."""
  keys = iter(jax.random.split(jax.random.PRNGKey(seed), 16))
  w = lambda i, o: jax.random.normal(next(keys), (i, o)) / np.sqrt(i)
  blocks = [dict(qkv=w(dim, 3 * dim), out=w(dim, dim), mlp=w(dim, dim)) for _ in range(2)]
  return dict(blocks=blocks, t=w(1, dim))


def net(params: dict, x: jax.Array, t: jax.Array, attn, heads: int = 2) -> jax.Array:
  """x ``(B, N, C)``, t ``(B,)`` -> ``(B, N, C)``; ``attn(q, k, v)`` on ``(B, N, H, D)``."""
  h = heads
  x = x + t[:, None, None] * params["t"][0]
  for blk in params["blocks"]:
    b, n, c = x.shape
    y = x / jnp.sqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6)
    q, k, v = jnp.split((y @ blk["qkv"]).reshape(b, n, 3 * h, c // h), 3, axis=2)
    x = x + attn(q, k, v).reshape(b, n, c) @ blk["out"]
    x = x + jnp.tanh(x @ blk["mlp"])
  return x
