"""Run as a script (own process: fake CPU devices must be set before jax is imported).

Checks that Pallas attention (interpret mode on CPU, or compiled on an accelerator with
enough devices) under ``jax.shard_map`` over batch and heads -- with the default
``check_vma=True`` -- equals the unsharded call for forward, jvp, grad, the MeanFlow pattern
and the gradient through the tangent (improved MeanFlow). Prints ``OK <max error>`` on success, raises otherwise.
"""
import os

if __name__ == "__main__":
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + " --xla_force_host_platform_device_count=4")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from fmdistill.pallas import attention  # noqa: E402


def run(q, k, v, mask, dq, dk, dv, interpret: bool):
  f = lambda q, k, v: attention(q, k, v, key_mask=mask, impl="pallas", block_q=16,
                                block_k=16, interpret=interpret)
  o, do = jax.jvp(f, (q, k, v), (dq, dk, dv))
  g = jax.grad(lambda q, k, v: jnp.sum(jnp.sin(f(q, k, v))), argnums=(0, 1, 2))(q, k, v)

  def meanflow(q, k, v):
    o, do = jax.jvp(f, (q, k, v), (dq, dk, dv))
    return jnp.sum((o - jax.lax.stop_gradient(jnp.cos(o) + 0.3 * do)) ** 2)

  def imf(q, k, v, dv):
    o, do = jax.jvp(f, (q, k, v), (dq, dk, dv))
    return jnp.sum(jnp.sin(do)) + jnp.sum(o ** 2)

  # No key mask (the kernel's validity row is derived from k) and causal.
  fc = lambda q, k, v: attention(q, k, v, causal=True, impl="pallas", block_q=16,
                                 block_k=16, interpret=interpret)
  oc, doc = jax.jvp(fc, (q, k, v), (dq, dk, dv))
  gc = jax.grad(lambda q: jnp.sum(jnp.sin(fc(q, k, v))))(q)
  return ((o, do) + g + jax.grad(meanflow, argnums=(0, 1, 2))(q, k, v)
          + jax.grad(imf, argnums=(0, 1, 2, 3))(q, k, v, dv) + (oc, doc, gc))


def main():
  interpret = jax.default_backend() == "cpu"
  if len(jax.devices()) < 4:
    raise SystemExit(f"need 4 devices, have {jax.devices()}")
  keys = jax.random.split(jax.random.PRNGKey(0), 7)
  shape = (2, 40, 4, 16)  # B, N, H, D: N is not a multiple of the block
  q, k, v, dq, dk, dv = (jax.random.normal(key, shape) for key in keys[:6])
  mask = jax.random.bernoulli(keys[6], 0.7, shape[:2])
  mesh = jax.make_mesh((2, 2), ("b", "h"))
  spec, mspec = P("b", None, "h", None), P("b", None)
  put = lambda x, s: jax.device_put(x, NamedSharding(mesh, s))
  sharded = jax.jit(jax.shard_map(
      lambda *a: run(*a, interpret=interpret), mesh=mesh,
      in_specs=(spec, spec, spec, mspec, spec, spec, spec), out_specs=spec))
  got = sharded(put(q, spec), put(k, spec), put(v, spec), put(mask, mspec),
                put(dq, spec), put(dk, spec), put(dv, spec))
  want = jax.jit(lambda *a: run(*a, interpret=interpret))(q, k, v, mask, dq, dk, dv)
  err = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / max(1.0, np.max(np.abs(b))))
            for a, b in zip(got, want))
  if not err <= 1e-5:
    raise SystemExit(f"shard_map result differs from unsharded: {err}")
  print(f"OK {err:.3g}")


if __name__ == "__main__":
  main()
