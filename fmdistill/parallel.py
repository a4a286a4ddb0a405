"""The one place that knows about devices: meshes, partition rules, sharded arrays.

* ``make_mesh(cfg)``: named axes ``('data', 'fsdp', 'tensor')`` over all devices of all hosts;
  a size of ``-1`` takes the rest.
* Partition rules (maxtext style): ``(regex, spec)`` pairs matched against a leaf's path such as
  ``params/block0/qkv/kernel`` or ``opt_state/1/0/mu/block0/qkv/kernel``; the first match wins.
  ``spec`` is a tuple of mesh-axis names / ``None`` per array axis, or ``'fsdp'``: shard the
  largest axis that ``fsdp`` divides if the array has at least ``fsdp_min_size`` elements, else
  replicate. Rules apply to params, EMA params, optimiser state and critics alike.
* Batches are sharded over ``('data', 'fsdp')`` on their leading axis.
* ``attention``: wraps the Pallas kernel in ``shard_map`` over batch and heads when a mesh is set
  (XLA's reference is left to the compiler's sharding propagation).
* ``initialize()``: ``jax.distributed.initialize()`` when the environment describes a multi-process
  job (``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID``, or a TPU pod /
  SLURM cluster that jax detects itself with ``FMDISTILL_DISTRIBUTED=1``); a no-op otherwise.
"""
from __future__ import annotations

import math
import os
import re
from typing import Any, Sequence

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from fmdistill import pallas
from fmdistill.errors import ConfigError

AXES = ("data", "fsdp", "tensor")
BATCH = ("data", "fsdp")

# Tensor-parallel rules for the DiT (Megatron style: column-parallel in, row-parallel out),
# each matrix's other axis FSDP-sharded; then FSDP for everything else big enough. Used when
# ``mesh.rules`` is empty.
DEFAULT_RULES = (
    (r".*block\d+/qkv/kernel$", ("fsdp", "tensor")),
    (r".*block\d+/qkv/bias$", ("tensor",)),
    (r".*block\d+/fc1/kernel$", ("fsdp", "tensor")),
    (r".*block\d+/fc1/bias$", ("tensor",)),
    (r".*block\d+/proj/kernel$", ("tensor", "fsdp")),
    (r".*block\d+/fc2/kernel$", ("tensor", "fsdp")),
    (r".*", "fsdp"),
)


def mesh_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, fsdp_min_size=2 ** 14,
                                        rules=()))


def mesh_shape(cfg: ml_collections.ConfigDict, num_devices: int) -> tuple[int, int, int]:
  """Resolve ``-1`` and check that the axes multiply to the device count."""
  sizes = [int(cfg[a]) for a in AXES]
  if any(s == 0 or s < -1 for s in sizes) or sizes.count(-1) > 1:
    raise ConfigError(f"config.mesh sizes {dict(zip(AXES, sizes))} are invalid; accepted: "
                      "positive integers, at most one -1 (= the rest of the devices)")
  known = math.prod(s for s in sizes if s != -1)
  if num_devices % known:
    raise ConfigError(f"config.mesh {dict(zip(AXES, sizes))} does not divide the "
                      f"{num_devices} devices; accepted: sizes whose product divides "
                      f"{num_devices}")
  sizes = [num_devices // known if s == -1 else s for s in sizes]
  if math.prod(sizes) != num_devices:
    raise ConfigError(f"config.mesh {dict(zip(AXES, sizes))} uses {math.prod(sizes)} of "
                      f"{num_devices} devices; accepted: a product equal to {num_devices} "
                      "(set one axis to -1)")
  return tuple(sizes)


def make_mesh(cfg: ml_collections.ConfigDict, devices: Sequence | None = None) -> Mesh:
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(cfg, len(devices))
  return Mesh(np.asarray(devices).reshape(shape), AXES)


def path_str(keypath) -> str:
  """A pytree key path as ``'params/block0/qkv/kernel'`` (dict keys, dataclass fields and
  sequence indices alike): what partition rules match and checkpoint messages name."""
  parts = []
  for k in keypath:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
    else:
      parts.append(str(k))
  return "/".join(parts)


def _fsdp_spec(shape: tuple, mesh: Mesh, min_size: int) -> P:
  n = mesh.shape["fsdp"]
  if n == 1 or math.prod(shape) < min_size:
    return P()
  for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
    if shape[axis] % n == 0:
      return P(*[("fsdp" if a == axis else None) for a in range(len(shape))])
  return P()


def spec_for(path: str, shape: tuple, mesh: Mesh, rules, min_size: int) -> P:
  """The ``PartitionSpec`` of one leaf (first matching rule; axes that do not divide the
  dimension are dropped rather than failing)."""
  for pattern, spec in rules:
    if re.fullmatch(pattern, path):
      if spec == "fsdp":
        return _fsdp_spec(shape, mesh, min_size)
      spec = tuple(spec)[: len(shape)]
      if len(spec) != len(shape):
        continue
      return P(*[ax if ax is None or shape[i] % mesh.shape[ax] == 0 else None
                 for i, ax in enumerate(spec)])
  return P()


def state_shardings(tree: Any, mesh: Mesh, cfg: ml_collections.ConfigDict) -> Any:
  """A ``NamedSharding`` for every leaf of ``tree`` (arrays or ShapeDtypeStructs)."""
  rules = tuple(tuple(r) for r in cfg.rules) or DEFAULT_RULES
  return jax.tree_util.tree_map_with_path(
      lambda kp, x: NamedSharding(mesh, spec_for(path_str(kp), tuple(np.shape(x)), mesh, rules,
                                                 cfg.fsdp_min_size)), tree)


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def global_batch(local: dict, mesh: Mesh, global_size: int) -> dict:
  """Assemble host-local rows into global arrays sharded over ``('data', 'fsdp')``."""
  def one(x):
    x = np.asarray(x)
    return jax.make_array_from_process_local_data(batch_sharding(mesh, x.ndim), x,
                                                  (global_size,) + x.shape[1:])
  return {k: one(v) for k, v in local.items()}


def check_batch(batch_size: int, mesh: Mesh) -> None:
  n = mesh.shape["data"] * mesh.shape["fsdp"]
  if batch_size % n:
    raise ConfigError(f"config.train.batch_size={batch_size} does not divide over the "
                      f"data x fsdp = {n} batch shards; accepted: a multiple of {n}")


def attention(q, k, v, *, impl: str = "auto", key_mask=None, **kw):
  """``fmdistill.pallas.attention`` that runs the Pallas kernel per (batch, head) shard under
  ``shard_map`` when a mesh with our axes is set (``jax.set_mesh``). Elsewhere (no mesh, or the
  XLA reference, which GSPMD partitions by itself) it is the plain call."""
  impl = pallas.resolve_impl(impl)
  mesh = jax.sharding.get_abstract_mesh()
  if impl != "pallas" or mesh.empty or not set(AXES) <= set(mesh.axis_names):
    return pallas.attention(q, k, v, impl=impl, key_mask=key_mask, **kw)
  rows = BATCH if q.shape[0] % (mesh.shape["data"] * mesh.shape["fsdp"]) == 0 else None
  heads = "tensor" if q.shape[2] % mesh.shape["tensor"] == 0 else None
  spec = P(rows, None, heads, None)
  if key_mask is None:
    fn = lambda q_, k_, v_: pallas.attention(q_, k_, v_, impl=impl, **kw)
    return jax.shard_map(fn, mesh=mesh, in_specs=(spec,) * 3, out_specs=spec)(q, k, v)
  fn = lambda q_, k_, v_, m_: pallas.attention(q_, k_, v_, key_mask=m_, impl=impl, **kw)
  return jax.shard_map(fn, mesh=mesh, in_specs=(spec, spec, spec, P(rows, None)),
                       out_specs=spec)(q, k, v, key_mask)


def initialize() -> None:
  """Multi-process start-up from the environment; a no-op for a single process."""
  if jax.distributed.is_initialized():
    return
  env = os.environ
  if env.get("JAX_COORDINATOR_ADDRESS"):
    jax.distributed.initialize(
        coordinator_address=env["JAX_COORDINATOR_ADDRESS"],
        num_processes=int(env.get("JAX_NUM_PROCESSES", "1")),
        process_id=int(env.get("JAX_PROCESS_ID", "0")))
  elif env.get("FMDISTILL_DISTRIBUTED") == "1":
    jax.distributed.initialize()  # TPU pods, SLURM, ... detected by jax
