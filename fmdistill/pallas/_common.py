"""Shared pieces of the flash-attention kernels: static spec, padding, block specs, block math.

The kernels read and write the model layout ``(B, N, H, D)`` directly (block ``(bq, D)`` of
one batch row and head, as in jax's GPU attention), so no transposed copies are made.
Sequence lengths are zero-padded to a multiple of the block and the head dim to a power of
two only when needed; padded keys are switched off by an int32 key-validity row
``(B, Nk_pad)``. Row statistics (logsumexp, delta) are float32 ``(B, H, Nq_pad)``.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

NEG_INF = float("-inf")
POS_INF = float("inf")


@dataclasses.dataclass(frozen=True)
class Spec:
  """Static (hashable) configuration of one attention call."""
  scale: float
  causal: bool
  block_q: int
  block_k: int
  interpret: bool
  platform: str  # jax.default_backend() when the call was traced: 'gpu', 'tpu' or 'cpu'


def make_spec(q: jax.Array, k: jax.Array, *, causal: bool, scale: float | None,
              block_q: int, block_k: int, interpret: bool) -> Spec:
  """Validates shapes and clamps block sizes to the (rounded-up) sequence lengths."""
  if q.ndim != 4 or k.ndim != 4:
    raise ValueError(f"expected (B, N, H, D) inputs, got q {q.shape}, k {k.shape}")
  if causal and q.shape[1] != k.shape[1]:
    raise ValueError(f"causal attention needs Nq == Nk, got {q.shape[1]} and {k.shape[1]}")
  for name, b in (("block_q", block_q), ("block_k", block_k)):
    if b < 1 or b & (b - 1):
      raise ValueError(f"{name} must be a power of two, got {b}")
  scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
  return Spec(scale=scale, causal=bool(causal), block_q=_clamp(block_q, q.shape[1]),
              block_k=_clamp(block_k, k.shape[1]), interpret=bool(interpret),
              platform=jax.default_backend())


def _clamp(block: int, n: int) -> int:
  return min(block, max(16, pl.next_power_of_2(n)))


def round_up(n: int, b: int) -> int:
  return -(-n // b) * b


def padded_dim(d: int) -> int:
  """Head dim padded to a power of two (Triton block shapes must be powers of two)."""
  return max(16, pl.next_power_of_2(d))


def to_kernel(x: jax.Array, n_pad: int, d_pad: int) -> jax.Array:
  """``(B, N, H, D)`` -> zero-padded ``(B, n_pad, H, d_pad)`` (no copy when aligned)."""
  b, n, h, d = x.shape
  if n_pad != n or d_pad != d:
    x = jnp.pad(x, ((0, 0), (0, n_pad - n), (0, 0), (0, d_pad - d)))
  return x


def from_kernel(x: jax.Array, n: int, d: int) -> jax.Array:
  """``(B, N_pad, H, D_pad)`` -> ``(B, n, H, d)``."""
  return x if x.shape[1] == n and x.shape[3] == d else x[:, :n, :, :d]


# BlockSpecs for a grid ``(B, H, blocks)``: ``t`` indexes blocks along the sequence.

def seq_block(size: int, dp: int) -> pl.BlockSpec:
  """``(size, dp)`` tile ``t`` of one (batch, head) of a ``(B, N, H, D)`` array."""
  return pl.BlockSpec((None, size, None, dp), lambda b, h, t: (b, t, h, 0))


def seq_full(n: int, dp: int) -> pl.BlockSpec:
  """The whole sequence ``(n, dp)`` of one (batch, head) of a ``(B, N, H, D)`` array."""
  return pl.BlockSpec((None, n, None, dp), lambda b, h, t: (b, 0, h, 0))


def row_block(size: int) -> pl.BlockSpec:
  return pl.BlockSpec((None, None, size), lambda b, h, t: (b, h, t))


def row_full(n: int) -> pl.BlockSpec:
  return pl.BlockSpec((None, None, n), lambda b, h, t: (b, h, 0))


def valid_block(size: int) -> pl.BlockSpec:
  return pl.BlockSpec((None, size), lambda b, h, t: (b, t))


def valid_full(n: int) -> pl.BlockSpec:
  return pl.BlockSpec((None, n), lambda b, h, t: (b, 0))


def pad_rows(x: jax.Array, n_pad: int, value: float) -> jax.Array:
  """Pads the last axis of a ``(B, H, N)`` row statistic to ``n_pad``."""
  n = x.shape[-1]
  return x if n == n_pad else jnp.pad(x, ((0, 0), (0, 0), (0, n_pad - n)),
                                      constant_values=value)


def key_valid(kvalid: jax.Array, nk_pad: int) -> jax.Array:
  """``(B, Nk)`` int32 validity -> ``(B, Nk_pad)``; padded keys are invalid."""
  nk = kvalid.shape[-1]
  kvalid = kvalid.astype(jnp.int32)
  return kvalid if nk == nk_pad else jnp.pad(kvalid, ((0, 0), (0, nk_pad - nk)))


def compiler_params(spec: Spec):
  """Triton parameters on GPU (jax otherwise defaults Pallas GPU kernels to Mosaic GPU, which
  these generic kernels do not target); ``None`` on TPU (Mosaic) and in interpret mode."""
  if spec.interpret or spec.platform != "gpu":
    return None
  from jax.experimental.pallas import triton as pltriton  # noqa: PLC0415
  return pltriton.CompilerParams(num_warps=4, num_stages=2)


def out_struct(shape, dtype, like: jax.Array) -> jax.ShapeDtypeStruct:
  """Output shape for ``pallas_call`` carrying ``like``'s manual axes (for ``shard_map``)."""
  mat = jax.typeof(like).manual_axis_type
  return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=mat)


# ---- in-kernel helpers (operate on values already loaded from refs) ----

def dot_t(a: jax.Array, b: jax.Array) -> jax.Array:
  """``a @ b.T`` with float32 accumulation: ``(M, D), (N, D) -> (M, N)``."""
  return lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def dot(a: jax.Array, b: jax.Array) -> jax.Array:
  """``a @ b`` with float32 accumulation: ``(M, K), (K, N) -> (M, N)``."""
  return lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def dot_tn(a: jax.Array, b: jax.Array) -> jax.Array:
  """``a.T @ b`` with float32 accumulation: ``(K, M), (K, N) -> (M, N)``."""
  return lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def block_mask(valid: jax.Array, q_start, k_start, bq: int, bk: int,
               causal: bool) -> jax.Array:
  """``(bq, bk)`` bool: key valid (``valid`` is the ``(bk,)`` int row) and causal."""
  mask = jnp.broadcast_to((valid != 0)[None, :], (bq, bk))
  if causal:
    rows = q_start + lax.broadcasted_iota(jnp.int32, (bq, bk), 0)
    cols = k_start + lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
    mask = mask & (rows >= cols)
  return mask


def masked_scores(q: jax.Array, k: jax.Array, valid: jax.Array, q_start, k_start,
                  scale: float, causal: bool) -> jax.Array:
  """``q k^T * scale`` in float32 with masked entries set to -inf: ``(bq, bk)``."""
  s = dot_t(q, k) * scale
  mask = block_mask(valid, q_start, k_start, q.shape[0], k.shape[0], causal)
  return jnp.where(mask, s, NEG_INF)


def num_k_blocks(q_block, bq: int, bk: int, nk_pad: int, causal: bool):
  """Key blocks a query block must visit (skips blocks above the causal diagonal)."""
  total = nk_pad // bk
  if not causal:
    return total
  return jnp.minimum(lax.div((q_block + 1) * bq + bk - 1, bk), total)


def first_q_block(k_block, bq: int, bk: int, causal: bool):
  """First query block that can see key block ``k_block``."""
  return lax.div(k_block * bk, bq) if causal else 0


def cdiv(a: int, b: int) -> int:
  return math.ceil(a / b)


def default_kvalid(k: jax.Array, key_mask: jax.Array | None) -> jax.Array:
  """``(B, Nk)`` int32 key validity from an optional bool ``key_mask``."""
  b, nk = k.shape[:2]
  if key_mask is None:
    # Derived from k (not a constant) so that it carries k's manual axes under shard_map.
    return jnp.zeros_like(k[:, :, 0, 0], dtype=jnp.int32) + 1
  if key_mask.shape != (b, nk):
    raise ValueError(f"key_mask must have shape {(b, nk)}, got {key_mask.shape}")
  return key_mask.astype(jnp.int32)


class Rows:
  """Reads row blocks ``x[start:start + size]`` of a kernel input inside a ``fori_loop``.

  Compiled kernels slice the ref in the loop (Triton cannot dynamically slice register
  values). In interpret mode the whole input block is loaded once and the value is sliced:
  the HLO interpreter turns refs read inside a loop into loop carries, which loses their
  varying manual axes and trips ``shard_map``'s default ``check_vma``.
  """

  def __init__(self, ref, interpret: bool):
    self.ref = ref
    self.value = ref[...] if interpret else None

  def __getitem__(self, ds: pl.Slice) -> jax.Array:
    if self.value is None:
      return self.ref[ds]
    return lax.dynamic_slice_in_dim(self.value, ds.start, ds.size, axis=0)
