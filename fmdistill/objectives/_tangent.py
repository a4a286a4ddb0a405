"""Shared maths of the tangent family (sCM, MeanFlow, AYF, FACM, flow-map matching).

Notation (DESIGN.md; seed ``001_*``): ``f(x_t, t, s) = x_s``; in displacement form
``f = x + (s - t) F`` (``c_skip = 1``, ``c_out = s - t``). Two time derivatives of a flow map
appear in every loss here (seed ``004_*``, "forward / backward losses"):

* **Eulerian** (the backward equation): the total derivative in the *source* time along the
  ODE ``dx_t/dt = v(x_t, t)``,

      d/dt f(x_t, t, s) = d_t f + (grad_x f) v(x_t, t)  ( = 0 for the exact map ),

  computed as ``jax.jvp(f, (x, t), (v, 1))`` with ``s`` held fixed.
* **Lagrangian** (the forward equation): the partial derivative in the *target* time,

      d_s f(x_t, t, s) = v(f(x_t, t, s), s),

  computed as ``jax.jvp(f, (s,), (1,))``.

For the displacement form these give, with ``theta^-`` the stop-gradient (or EMA) weights,

    df^-/dt          = v(x_t, t) - F^- + (s - t) dF^-/dt                (Eulerian direction)
    d_s f^- - v(f^-, s) = F^- + (s - t) d_s F^- - v(f^-, s)             (Lagrangian residual)

and MeanFlow's target is ``F_tgt = F^- + df^-/dt = v - (t - s) dF^-/dt``. Seed ``003_*``
(rCM): the "semi-continuous" option replaces the time part of the JVP by a forward difference
with ``dt = 1e-4`` (``time_fd``); the spatial part stays a JVP. Networks see float32 times.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp

from fmdistill import errors
from fmdistill.errors import ConfigError
from fmdistill.objectives import _common
from fmdistill.paths import bcast

Array = jax.Array
sg = jax.lax.stop_gradient


# ----------------------------------------------------------------------------- derivatives


def eulerian_jvp(fn: Callable[[Array, Array], Array], x: Array, t: Array, v: Array, *,
                 t_dot: Array | None = None, time_fd: float = 0.0) -> tuple[Array, Array]:
  """``(fn(x, t), d/dt fn(x_t, t))`` along ``dx/dt = v``; ``x, v (B, ...)``, ``t (B,)``.

  The tangent is ``(v, t_dot)`` (``t_dot = 1`` by default; scaling both by the same per-example
  factor scales the result, which sCM uses for stability). ``time_fd > 0``: rCM's
  semi-continuous form, ``jvp`` in ``x`` plus ``t_dot (fn(x, t + dt) - fn(x, t)) / dt``.
  """
  t = t.astype(jnp.float32)
  t_dot = jnp.ones_like(t) if t_dot is None else t_dot.astype(jnp.float32)
  v = v.astype(x.dtype)
  if time_fd <= 0:
    return jax.jvp(fn, (x, t), (v, t_dot))
  out, dx = jax.jvp(lambda x_: fn(x_, t), (x,), (v,))
  t2 = t + time_fd
  dt = t2 - t  # the step actually represented in float32
  dt_part = (fn(x, t2).astype(jnp.float32) - out.astype(jnp.float32)) * bcast(t_dot / dt, out)
  return out, (dx.astype(jnp.float32) + dt_part).astype(out.dtype)


def lagrangian_jvp(fn: Callable[[Array], Array], s: Array) -> tuple[Array, Array]:
  """``(fn(s), d_s fn(s))`` for ``s (B,)``."""
  s = s.astype(jnp.float32)
  return jax.jvp(fn, (s,), (jnp.ones_like(s),))


def eulerian(fn: Callable[[Any, Array, Array], Array], params: Any, ema_params: Any,
             x: Array, t: Array, v: Array, *, fused: bool, t_dot: Array | None = None,
             time_fd: float = 0.0) -> tuple[Array, Array, Array]:
  """Student output and stop-gradient target tangent: ``(F_theta, F^-, dF^-/dt)``.

  ``fn(p, x, t) -> F``. With ``fused`` (``theta^- = stopgrad(theta)``) one ``jax.jvp`` of the
  student gives both: gradients flow through its primal output only, the tangent is under
  ``stop_gradient``. Otherwise the target tangent comes from ``ema_params``.
  """
  if fused or ema_params is None:
    out, tan = eulerian_jvp(lambda x_, t_: fn(params, x_, t_), x, t, v, t_dot=t_dot,
                            time_fd=time_fd)
    return out, sg(out), sg(tan)
  out = fn(params, x, t)
  out_m, tan = eulerian_jvp(lambda x_, t_: fn(ema_params, x_, t_), x, t, v, t_dot=t_dot,
                            time_fd=time_fd)
  return out, sg(out_m), sg(tan)


def lagrangian(fn: Callable[[Any, Array], Array], params: Any, ema_params: Any, s: Array, *,
               fused: bool) -> tuple[Array, Array, Array]:
  """``(F_theta, F^-, d_s F^-)`` with ``fn(p, s) -> F``; see ``eulerian``."""
  if fused or ema_params is None:
    out, tan = lagrangian_jvp(lambda s_: fn(params, s_), s)
    return out, sg(out), sg(tan)
  out = fn(params, s)
  out_m, tan = lagrangian_jvp(lambda s_: fn(ema_params, s_), s)
  return out, sg(out_m), sg(tan)


def flow_map_time_derivative(param, net, params: Any, x: Array, t: Array, s: Array, v: Array,
                             cond: Array | None = None) -> tuple[Array, Array]:
  """``(f, df/dt)``: the flow map of any ``Parameterization`` and its Eulerian derivative along
  ``dx/dt = v`` (``s`` fixed). The parameterisation-independent form of the helper above."""
  return eulerian_jvp(lambda x_, t_: param.apply(net, params, x_, t_, s, cond), x, t, v)


# ----------------------------------------------------------------------------- displacement form


def eulerian_direction(F_minus: Array, dF_dt: Array, v: Array, t: Array, s: Array,
                       r: Array | float = 1.0) -> Array:
  """``df^-/dt = v - F^- + r (s - t) dF^-/dt`` for ``f = x + (s - t) F`` (``r``: warmup)."""
  return (v.astype(jnp.float32) - F_minus.astype(jnp.float32)
          + r * bcast(s - t, F_minus) * dF_dt.astype(jnp.float32))


def lagrangian_residual(F_minus: Array, dF_ds: Array, v_end: Array, t: Array, s: Array,
                        r: Array | float = 1.0) -> Array:
  """``d_s f^- - v(f^-, s) = F^- + r (s - t) d_s F^- - v_end`` for ``f = x + (s - t) F``."""
  return (F_minus.astype(jnp.float32) + r * bcast(s - t, F_minus) * dF_ds.astype(jnp.float32)
          - v_end.astype(jnp.float32))


def displacement(x: Array, F: Array, t: Array, s: Array) -> Array:
  """``f = x + (s - t) F``."""
  return (x + bcast(s - t, x) * F).astype(x.dtype)


def instantaneous_velocity(F: Array, dF_dt: Array, t: Array, s: Array) -> Array:
  """``V = F + (t - s) dF/dt`` (float32): the MeanFlow identity solved for the velocity. For the
  exact map and ``dF/dt`` taken along the true ODE, ``V = v(x_t, t)`` for every ``s``
  (``V = v - df/dt``, and ``df/dt = 0``). Improved MeanFlow regresses ``V`` onto ``v``."""
  return F.astype(jnp.float32) + bcast(t - s, F) * dF_dt.astype(jnp.float32)


def terminal_velocity(F: Array, dF_ds: Array, t: Array, s: Array) -> Array:
  """``d_s f = F + (s - t) d_s F`` (float32) for ``f = x + (s - t) F``: the velocity of the map's
  end point as the terminal time ``s`` moves (FreeFlow's generating velocity at ``t = T``, TVM's
  terminal velocity). Equals ``v(f, s)`` for the exact map."""
  return F.astype(jnp.float32) + bcast(s - t, F) * dF_ds.astype(jnp.float32)


# ----------------------------------------------------------------------------- stabilisers


def normalize(g: Array, c: float, kind: str = "rms") -> Array:
  """sCM's tangent normalisation ``g / (||g|| + c)`` per example (float32).

  ``kind='l2'`` is the plain Euclidean norm as written in the sCM paper; ``'rms'`` divides it by
  ``sqrt(D)`` so ``c`` means the same at every data size (the form used by FACM's sCM code).
  ``'none'`` returns ``g``.
  """
  g = g.astype(jnp.float32)
  if kind == "none":
    return g
  flat = g.reshape(g.shape[0], -1)
  n = jnp.sqrt(jnp.sum(jnp.square(flat), axis=-1))
  if kind == "rms":
    n = n / math.sqrt(flat.shape[-1])
  elif kind != "l2":
    raise ValueError(f"tangent_norm must be 'rms', 'l2' or 'none', got {kind!r}")
  return g / bcast(n + c, g)


def warmup(step: Array | int, steps: int) -> Array:
  """sCM's tangent warmup ``r``: linear from 0 to 1 over ``steps`` updates (1 if ``steps <= 0``)."""
  if steps <= 0:
    return jnp.float32(1.0)
  return jnp.clip(jnp.asarray(step, jnp.float32) / steps, 0.0, 1.0)


def adaptive_weight(err: Array, c: float, p: float) -> Array:
  """MeanFlow's adaptive L2 weight ``stopgrad(1 / (err + c)^p)`` for per-example ``err (B,)``."""
  return sg(1.0 / (err + c) ** p)


REDUCTIONS = ("mean", "sum")


def sq_error(diff: Array, reduce: str = "mean") -> Array:
  """Per-example squared error ``(B, ...) -> (B,)`` in float32: the *mean* over the non-batch
  axes (``'mean'``, size independent) or their *sum* (``'sum'``, the official MeanFlow / iMF
  code's ``jnp.sum(loss, axis=(1, 2, 3))``). ``sum = D mean`` for ``D`` dimensions."""
  if reduce not in REDUCTIONS:
    raise ValueError(f"adaptive_reduce must be one of {list(REDUCTIONS)}, got {reduce!r}")
  if reduce == "mean":
    return _common.mean_sq(diff)
  return jnp.sum(jnp.square(diff.astype(jnp.float32)).reshape(diff.shape[0], -1), axis=-1)


def check_adaptive(o) -> None:
  """Config checks of the MeanFlow-style fields (``adaptive_reduce``, the guidance window) of
  the objective section ``o``; raises ``ConfigError`` naming the field."""
  reduce = o.get("adaptive_reduce", "mean")
  if reduce not in REDUCTIONS:
    raise errors.invalid("objective.adaptive_reduce", reduce, list(REDUCTIONS))
  lo, hi = o.get("guidance_t_min", 0.0), o.get("guidance_t_max", 1.0)
  if not 0.0 <= lo <= hi:
    raise ConfigError(f"config.objective.guidance_t_min/guidance_t_max=({lo!r}, {hi!r}) is "
                      "invalid; accepted: 0 <= guidance_t_min <= guidance_t_max")


def adaptive_loss(diff: Array, c: float, p: float, reduce: str = "mean") -> tuple[Array, Array]:
  """MeanFlow's adaptively weighted L2 loss ``mean_B[sg(1 / (e + c)^p) e]`` with
  ``e = sq_error(diff, reduce)``; returns ``(loss, e)``. With ``reduce='sum'`` over ``D``
  dimensions the loss equals ``D^(1-p)`` times the ``'mean'`` loss with the constant ``c / D``."""
  err = sq_error(diff, reduce)
  return jnp.mean(adaptive_weight(err, c, p) * err), err


# ----------------------------------------------------------------------------- learned weight


def init_weighting(key: Array, num_times: int = 1, num_freqs: int = 16) -> dict:
  """Params of sCM's learned log-weight ``w_phi``: one linear layer over fixed Fourier features
  of the time inputs, zero-initialised (``w = 0``: unit weight). ``key`` is unused (kept for
  a uniform init signature)."""
  del key
  return {"w": jnp.zeros((2 * num_freqs * num_times,), jnp.float32),
          "b": jnp.zeros((), jnp.float32)}


def log_weight(wparams: dict, times: list[Array]) -> Array:
  """``w_phi(times)`` of shape ``(B,)``; ``times`` a list of ``(B,)`` arrays (float32)."""
  nf = wparams["w"].shape[0] // (2 * len(times))
  freqs = jnp.exp(jnp.linspace(0.0, math.log(64.0), nf)) * math.pi  # pi .. 64 pi
  feats = []
  for u in times:
    a = u.astype(jnp.float32)[:, None] * freqs[None]
    feats += [jnp.cos(a), jnp.sin(a)]
  return jnp.concatenate(feats, -1) @ wparams["w"] + wparams["b"]


def learned_weighting(err: Array, logw: Array) -> Array:
  """sCM eq. (adaptive weighting): ``e^{w} err - w`` per example; ``err`` already divided by D."""
  return jnp.exp(logw) * err - logw
