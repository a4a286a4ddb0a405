"""Shared pieces of the flash-attention kernels: static spec, geometry (layout, padding,
block specs) and in-kernel block math.

Kernel layout. On GPU (Triton) and in interpret mode the kernels read and write the model
layout ``(B, N, H, D)`` in place (tile ``(bq, D)`` of one batch row and head, as in jax's
GPU attention), so no transposed copies are made. Mosaic (TPU) needs the last two block
dims to be (8k, 128k) or full, which a squeezed head axis is not, so on TPU the wrapper
transposes to head-major ``(B, H, N, D)`` (O(N) copies). Sequences are zero-padded to a
multiple of the block and the head dim to a power of two only when needed. Row statistics
(logsumexp, delta) are float32 ``(B, H, N_pad, 1)`` and the key validity is int32
``(B, 1, Nk_pad)`` (0 = masked or padded key): 2-D tiles ``(bq, 1)`` / ``(1, bk)`` suit
both Triton and Mosaic.
"""
from __future__ import annotations

import dataclasses

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
  head_major: bool  # kernel layout (B, H, N, D) instead of the model's (B, N, H, D)


def make_spec(q: jax.Array, k: jax.Array, *, causal: bool, scale: float | None,
              block_q: int | None, block_k: int | None, interpret: bool,
              head_major: bool | None = None) -> Spec:
  """Validates shapes and clamps block sizes to the (rounded-up) sequence lengths.

  ``None`` picks per platform: blocks of 128 (lane width) and the head-major layout on TPU,
  blocks of 64 and the model layout elsewhere.
  """
  platform = jax.default_backend()
  block_q = (128 if platform == "tpu" else 64) if block_q is None else block_q
  block_k = (128 if platform == "tpu" else 64) if block_k is None else block_k
  if q.ndim != 4 or k.ndim != 4:
    raise ValueError(f"expected (B, N, H, D) inputs, got q {q.shape}, k {k.shape}")
  if q.shape[2] % k.shape[2]:
    raise ValueError(f"q heads ({q.shape[2]}) must be a multiple of k/v heads ({k.shape[2]})")
  if causal and q.shape[1] != k.shape[1]:
    raise ValueError(f"causal attention needs Nq == Nk, got {q.shape[1]} and {k.shape[1]}")
  for name, b in (("block_q", block_q), ("block_k", block_k)):
    if b < 1 or b & (b - 1):
      raise ValueError(f"{name} must be a power of two, got {b}")
  scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
  head_major = platform == "tpu" if head_major is None else bool(head_major)
  return Spec(scale=scale, causal=bool(causal), block_q=_clamp(block_q, q.shape[1]),
              block_k=_clamp(block_k, k.shape[1]), interpret=bool(interpret),
              platform=platform, head_major=head_major)


def _clamp(block: int, n: int) -> int:
  return min(block, max(16, pl.next_power_of_2(n)))


def round_up(n: int, b: int) -> int:
  return -(-n // b) * b


def compiler_params(spec: Spec):
  """Triton parameters on GPU (jax otherwise defaults Pallas GPU kernels to Mosaic GPU, which
  these generic kernels do not target); ``None`` on TPU (Mosaic) and in interpret mode."""
  if spec.interpret or spec.platform != "gpu":
    return None
  from jax.experimental.pallas import triton as pltriton  # noqa: PLC0415
  return pltriton.CompilerParams(num_warps=4, num_stages=2)


@dataclasses.dataclass(frozen=True)
class Geometry:
  """Shapes of one call and conversions between model and kernel layouts.

  ``h`` query heads share ``hkv`` key/value heads (GQA; ``hkv = h`` is plain multi-head
  attention): query head ``i`` reads key/value head ``i // (h // hkv)``. Grids run over
  query heads; key-side BlockSpecs (``kv=True``) map to the shared head in place. Key-side
  cotangents are computed per query head and summed over each group by ``k_out``.
  """
  b: int
  h: int
  hkv: int
  nq: int
  nk: int
  d: int
  bq: int
  bk: int
  head_major: bool

  @staticmethod
  def of(q: jax.Array, k: jax.Array, spec: Spec) -> "Geometry":
    b, nq, h, d = q.shape
    return Geometry(b, h, k.shape[2], nq, k.shape[1], d, spec.block_q, spec.block_k,
                    spec.head_major)

  rep = property(lambda self: self.h // self.hkv)

  nq_p = property(lambda self: round_up(self.nq, self.bq))
  nk_p = property(lambda self: round_up(self.nk, self.bk))
  # Head dim padded to a power of two (Triton block shapes must be powers of two).
  dp = property(lambda self: max(16, pl.next_power_of_2(self.d)))
  grid_q = property(lambda self: (self.b, self.h, self.nq_p // self.bq))
  grid_k = property(lambda self: (self.b, self.h, self.nk_p // self.bk))

  def to_kernel(self, x: jax.Array, n_pad: int) -> jax.Array:
    """``(B, N, H, D)`` -> kernel layout, zero-padded to ``n_pad`` tokens and ``dp``."""
    n, d = x.shape[1], x.shape[3]
    if self.head_major:
      x = jnp.transpose(x, (0, 2, 1, 3))
      pads = ((0, 0), (0, 0), (0, n_pad - n), (0, self.dp - d))
    else:
      pads = ((0, 0), (0, n_pad - n), (0, 0), (0, self.dp - d))
    return x if n_pad == n and self.dp == d else jnp.pad(x, pads)

  def q_in(self, x: jax.Array) -> jax.Array:
    return self.to_kernel(x, self.nq_p)

  def k_in(self, x: jax.Array) -> jax.Array:
    return self.to_kernel(x, self.nk_p)

  def from_kernel(self, x: jax.Array, n: int) -> jax.Array:
    """Kernel layout -> ``(B, n, H, d)``."""
    if self.head_major:
      return jnp.transpose(x[:, :, :n, :self.d], (0, 2, 1, 3))
    return x if x.shape[1] == n and x.shape[3] == self.d else x[:, :n, :, :self.d]

  def q_out(self, x: jax.Array) -> jax.Array:
    return self.from_kernel(x, self.nq)

  def k_out(self, x: jax.Array) -> jax.Array:
    """Per-query-head key-side result -> ``(B, Nk, Hkv, d)``, summed over head groups."""
    x = self.from_kernel(x, self.nk)
    if self.rep == 1:
      return x
    b, n, _, d = x.shape
    x32 = x.reshape(b, n, self.hkv, self.rep, d).astype(jnp.float32)
    return x32.sum(axis=3).astype(x.dtype)

  def rows_in(self, x: jax.Array, value: float) -> jax.Array:
    """Row statistic ``(B, H, Nq)`` -> ``(B, H, Nq_pad, 1)`` padded with ``value``."""
    x = x[..., None]
    n = x.shape[2]
    return x if n == self.nq_p else jnp.pad(x, ((0, 0), (0, 0), (0, self.nq_p - n), (0, 0)),
                                            constant_values=value)

  def rows_out(self, x: jax.Array) -> jax.Array:
    return x[:, :, :self.nq, 0]

  def valid_in(self, kvalid: jax.Array) -> jax.Array:
    """``(B, Nk)`` validity -> int32 ``(B, 1, Nk_pad)``; padded keys are invalid."""
    kvalid = kvalid.astype(jnp.int32)[:, None, :]
    return kvalid if self.nk == self.nk_p else jnp.pad(
        kvalid, ((0, 0), (0, 0), (0, self.nk_p - self.nk)))

  # BlockSpecs for a grid ``(B, H, blocks)``; ``t`` indexes blocks along the sequence.

  def seq_block(self, size: int, kv: bool = False) -> pl.BlockSpec:
    """Tile ``t`` ``(size, dp)`` of one (batch, head) of a q/k/v-like array; ``kv``: of the
    key/value head shared by query head ``h``."""
    hd = self._head_of(kv)
    if self.head_major:
      return pl.BlockSpec((None, None, size, self.dp), lambda b, h, t: (b, hd(h), t, 0))
    return pl.BlockSpec((None, size, None, self.dp), lambda b, h, t: (b, t, hd(h), 0))

  def seq_full(self, n: int, kv: bool = False) -> pl.BlockSpec:
    """The whole sequence ``(n, dp)`` of one (batch, head); ``kv`` as in ``seq_block``."""
    hd = self._head_of(kv)
    if self.head_major:
      return pl.BlockSpec((None, None, n, self.dp), lambda b, h, t: (b, hd(h), 0, 0))
    return pl.BlockSpec((None, n, None, self.dp), lambda b, h, t: (b, 0, hd(h), 0))

  def _head_of(self, kv: bool):
    """Block index map of the head axis: query head ``h`` or its shared key/value head
    (``lax.div``: ``//`` on a traced int lowers through ``sign``, which Mosaic rejects)."""
    if not kv or self.rep == 1:
      return lambda h: h
    return lambda h: lax.div(h, self.rep)

  def out_shape(self, n: int):
    return (self.b, self.h, n, self.dp) if self.head_major else (self.b, n, self.h, self.dp)

  @staticmethod
  def row_block(size: int) -> pl.BlockSpec:
    return pl.BlockSpec((None, None, size, 1), lambda b, h, t: (b, h, t, 0))

  @staticmethod
  def row_full(n: int) -> pl.BlockSpec:
    return pl.BlockSpec((None, None, n, 1), lambda b, h, t: (b, h, 0, 0))

  @staticmethod
  def valid_block(size: int) -> pl.BlockSpec:
    return pl.BlockSpec((None, 1, size), lambda b, h, t: (b, 0, t))

  @staticmethod
  def valid_full(n: int) -> pl.BlockSpec:
    return pl.BlockSpec((None, 1, n), lambda b, h, t: (b, 0, 0))


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
  """``(bq, bk)`` bool: key valid (``valid`` is the ``(1, bk)`` int row) and causal."""
  mask = jnp.broadcast_to(valid != 0, (bq, bk))
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
  """Reads blocks ``x[start:start + size]`` along ``axis`` of a kernel input in a loop.

  Compiled kernels slice the ref in the loop (Triton cannot dynamically slice register
  values). In interpret mode the whole input block is loaded once and the value is sliced:
  the HLO interpreter turns refs read inside a loop into loop carries, which loses their
  varying manual axes and trips ``shard_map``'s default ``check_vma``.
  """

  def __init__(self, ref, interpret: bool, axis: int = 0):
    self.ref, self.axis = ref, axis
    self.value = ref[...] if interpret else None

  def __getitem__(self, ds: pl.Slice) -> jax.Array:
    if self.value is None:
      return self.ref[ds] if self.axis == 0 else self.ref[:, ds]
    return lax.dynamic_slice_in_dim(self.value, ds.start, ds.size, axis=self.axis)


def valid_rows(ref, interpret: bool) -> Rows:
  """Column blocks ``(1, bk)`` of the ``(1, Nk_pad)`` key-validity row."""
  return Rows(ref, interpret, axis=1)
