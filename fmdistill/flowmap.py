"""Flow-map parameterisations ``f(x, t, s) = c_skip(t, s) x + c_out(t, s) F(c_in x, t, s)``.

Seed ``001_*`` ("ODE distillation methods"): the boundary condition ``f(x, t, t) = x`` holds
exactly when ``c_skip(t, t) = 1`` and ``c_out(t, t) = 0``. Seed ``004_*`` ("Boundary
conditions"): first-order ``x + (s - t) NN`` and second-order ``x + (s - t) v + (s - t)^2 NN``.

A network is any callable ``net(params, x, t, s, cond) -> array like x`` (DESIGN.md).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from fmdistill import paths
from fmdistill.paths import bcast

Array = jax.Array
Net = Callable[..., Array]  # net(params, x, t, s, cond)
PARAMETERIZATIONS = ("displacement", "trigflow", "edm")


@dataclasses.dataclass(frozen=True)
class Parameterization:
  """Coefficients of a flow map.

  * ``displacement`` (MeanFlow, AYF, Shortcut): ``f = x + (s - t) F``; ``F(x, t, t)`` is the
    instantaneous velocity and ``F(x, t, s)`` the average velocity over ``[s, t]``.
  * ``trigflow`` (sCM): ``f = cos(t - s) x - sin(t - s) sigma_d F(x / sigma_d, t, s)``.
  * ``edm`` (consistency models): ``c_skip = sigma_d^2 / (sigma_d^2 + (t - s)^2)``,
    ``c_out = (s - t) sigma_d / sqrt(sigma_d^2 + (t - s)^2)``.
  """
  name: str = "displacement"
  sigma_d: float = 1.0

  def __post_init__(self):
    if self.name not in PARAMETERIZATIONS:
      raise ValueError(f"unknown parameterization {self.name!r}; known: {list(PARAMETERIZATIONS)}")

  def coefficients(self, t: Array, s: Array) -> tuple[Array, Array, Array]:
    """``(c_skip, c_out, c_in)`` as arrays of the shape of ``t``."""
    d = t - s
    sd = self.sigma_d
    if self.name == "displacement":
      return jnp.ones_like(d), -d, jnp.ones_like(d)
    if self.name == "trigflow":
      return jnp.cos(d), -sd * jnp.sin(d), jnp.full_like(d, 1.0 / sd)
    r2 = sd ** 2 + d ** 2
    return sd ** 2 / r2, -d * sd / jnp.sqrt(r2), jnp.ones_like(d)

  def apply(self, net: Net, params: Any, x: Array, t: Array, s: Array,
            cond: Array | None = None) -> Array:
    """``f(x, t, s)``; ``x (B, ...)``, ``t, s (B,)``. Coefficients are computed in float32."""
    t32, s32 = t.astype(jnp.float32), s.astype(jnp.float32)
    c_skip, c_out, c_in = (bcast(c, x) for c in self.coefficients(t32, s32))
    out = net(params, (c_in * x).astype(x.dtype), t32, s32, cond)
    return (c_skip * x + c_out * out).astype(x.dtype)

  def velocity(self, net: Net, params: Any, x: Array, t: Array,
               cond: Array | None = None) -> Array:
    """Instantaneous velocity ``df(x, t, s)/ds`` at ``s = t`` in closed form.

    ``c_out(t, t) = 0`` and ``d c_skip/ds = 0`` at ``s = t`` for every parameterisation here,
    so ``v = (d c_out / ds)|_{s=t} F(c_in x, t, t)``: ``F`` (displacement, edm) or
    ``sigma_d F(x / sigma_d, t, t)`` (trigflow).
    """
    t32 = t.astype(jnp.float32)
    _, _, c_in = self.coefficients(t32, t32)
    rate = self.sigma_d if self.name == "trigflow" else 1.0
    out = net(params, (bcast(c_in, x) * x).astype(x.dtype), t32, t32, cond)
    return (rate * out).astype(x.dtype)

  def from_flow_map(self, f: Array, x: Array, t: Array, s: Array) -> Array:
    """Invert the parameterisation: the ``F`` that makes ``f(x, t, s) = f`` (for ``s != t``)."""
    c_skip, c_out, _ = (bcast(c, x) for c in self.coefficients(t, s))
    return (f - c_skip * x) / c_out


def second_order(net: Net, velocity: Callable[[Array, Array, Any], Array]) -> Net:
  """Seed ``004_*``: ``f = x + (s - t) v(x, t) + (s - t)^2 NN(x, t, s)`` as a displacement net.

  Returns a network ``G`` with ``x + (s - t) G = f``, i.e. ``G = v + (s - t) NN``, so the result
  plugs into ``Parameterization('displacement')``. ``velocity(x, t, cond)`` is the (frozen)
  teacher velocity, wrapped in ``stop_gradient``.
  """
  def g(params, x, t, s, cond=None):
    v = jax.lax.stop_gradient(velocity(x, t, cond))
    return v + bcast(s - t, x).astype(x.dtype) * net(params, x, t, s, cond)
  return g


def velocity_from_flow_map(param: Parameterization, net: Net, params: Any, x: Array,
                           t: Array, cond: Array | None = None) -> Array:
  """Instantaneous velocity ``d f(x, t, s) / ds`` at ``s = t`` via ``jax.jvp`` in ``s``."""
  fn = lambda s: param.apply(net, params, x, t, s, cond)
  return jax.jvp(fn, (t,), (jnp.ones_like(t),))[1]


def split_cond(cond) -> tuple[Array | None, Array | None]:
  """``(labels, guidance scale w)`` of a ``cond``: labels ``(B,)``, ``None``, or a dict with
  ``'label'`` and ``'w'`` (``(B,)``: per-example guidance, classifier-free-guidance students
  that take the scale as an input; ``fmdistill.models.embeddings.split_cond``)."""
  if isinstance(cond, dict):
    return cond.get("label"), cond.get("w")
  return cond, None


def in_interval(cond, t: Array, interval: tuple, T: float, guidance: float = 1.0) -> dict:
  """``{'label', 'w'}``: the scale (``cond['w']``, else ``guidance``) where ``lo T <= t <= hi T``
  and 1 elsewhere (guidance in a limited interval, Kynkaanniemi et al. 2024); ``t (B,)``."""
  label, w = split_cond(cond)
  w = jnp.full(t.shape, guidance, jnp.float32) if w is None else w
  inside = (t >= interval[0] * T) & (t <= interval[1] * T)
  return {"label": label, "w": jnp.where(inside, w, 1.0)}


def teacher_velocity(net: Net, params: Any, param: Parameterization | None = None, *,
                     guidance: float = 1.0, null_label: int | None = None
                     ) -> Callable[[Array, Array, Array | None], Array]:
  """A velocity ``v(x, t, cond)`` from a flow-matching network, with classifier-free guidance.

  ``v = df/ds|_{s=t}`` (``F(x, t, t)`` for the displacement parameterisation).
  With guidance ``w != 1`` and labels: ``v = v(x|null) + w (v(x|c) - v(x|null))``; ``w`` is
  ``guidance``, or per example ``cond['w'] (B,)`` when ``cond`` is a dict (``split_cond``).
  """
  param = param or Parameterization("displacement")

  def single(x, t, cond):
    return param.velocity(net, params, x, t, cond)

  def v(x, t, cond=None):
    label, w = split_cond(cond)
    if label is None or (w is None and guidance == 1.0):
      return single(x, t, label)
    if null_label is None:
      raise ValueError("classifier-free guidance needs the model's null label")
    w = guidance if w is None else bcast(jnp.asarray(w, jnp.float32), x)
    uncond = single(x, t, jnp.full_like(label, null_label))
    return (uncond + w * (single(x, t, label) - uncond)).astype(x.dtype)
  return v


def teacher_network(net: Net, params: Any, param: Parameterization, src_path, dst_path, *,
                    guidance: float = 1.0, null_label: int | None = None,
                    interval: tuple = ()) -> Callable:
  """Bind a frozen flow-matching teacher into ``teacher(x, t, s, cond)`` on the student's path.

  The result follows DESIGN.md's convention that a teacher velocity is ``F(x, t, t)``: it returns
  the teacher's (guided) velocity at ``(x, t)`` converted from ``src_path`` to ``dst_path`` by
  SNR matching (``fmdistill.paths.convert_velocity``), and ignores ``s``. The output is wrapped
  in ``stop_gradient``; ``teacher.with_input_grad(x, t, s, cond)`` is the same velocity
  differentiable in ``x`` (its weights still frozen), for losses that differentiate through the
  teacher's input (SiD). ``interval = (lo, hi)``: guidance only for ``lo T <= t <= hi T`` on
  ``dst_path`` (Kynkaanniemi et al. 2024, guidance in a limited interval), ``w = 1`` elsewhere.
  """
  def bound(p):
    v = teacher_velocity(net, p, param, guidance=guidance, null_label=null_label)

    def fn(x, t, s=None, cond=None):
      del s
      if interval:
        cond = in_interval(cond, t, interval, dst_path.T, guidance)
      vc = lambda x_, t_: v(x_, t_, cond)
      if src_path.name != dst_path.name or src_path.sigma_d != dst_path.sigma_d:
        vc = paths.convert_velocity(vc, src_path, dst_path)
      return vc(x, t)
    return fn

  fn = bound(params)

  def teacher(x, t, s=None, cond=None):
    return jax.lax.stop_gradient(fn(x, t, s, cond))
  teacher.with_input_grad = bound(jax.lax.stop_gradient(params))
  return teacher


@dataclasses.dataclass(frozen=True)
class FlowMapTeacher:
  """A frozen flow-map teacher, e.g. the previous stage of progressive distillation (its
  result is a few-step map, not a velocity model).

  ``jump(x, t, s, cond) = f(x, t, s)`` under ``stop_gradient``. There is no instantaneous
  velocity to offer (a distilled map is not trained at ``s = t``), so calling it like a velocity
  teacher, ``teacher(x, t, t, cond)``, raises ``TypeError`` naming the run.
  """
  jump_fn: Callable
  source: str = ""

  def jump(self, x: Array, t: Array, s: Array, cond: Array | None = None) -> Array:
    return jax.lax.stop_gradient(self.jump_fn(x, t, s, cond))

  def __call__(self, *args, **kwargs):
    raise TypeError(f"the teacher {self.source or ''} is a flow map (a few-step student), not "
                    "a velocity model; call teacher.jump(x, t, s, cond), or use a method whose "
                    "registry entry lists 'flowmap' in teacher_kinds")


def flowmap_teacher(net: Net, params: Any, param: Parameterization, source: str = ""
                    ) -> FlowMapTeacher:
  """Bind a frozen flow-map network (its parameterisation ``param``) as a ``FlowMapTeacher``."""
  return FlowMapTeacher(lambda x, t, s, cond=None: param.apply(net, params, x, t, s, cond),
                        source)


@dataclasses.dataclass(frozen=True)
class Reparameterized:
  """A network trained for one (parameterisation, path) presented in another.

  ``G = Reparameterized(net, src_param, src_path, dst_param, dst_path)`` is a raw network
  whose flow map under ``dst_param`` on ``dst_path`` is the flow map of ``net`` under
  ``src_param`` on ``src_path``, moved to ``dst_path`` by SNR matching (``paths.convert_time``,
  points scaled by ``paths.point_scale``; the ODE's trajectories are the same up to that
  scaling, so the flow map converts exactly):

      f_dst(x, t, s) = f_src(k(t) x, t', s') / k(s),   t' = conv(t), s' = conv(s),
      G(c_in x, t, s) = (f_dst(x, t, s) - c_skip x) / c_out            (|t - s| > delta),
      G(c_in x, t, t) = v_dst(x, t) / (d c_out / ds)                   (the limit s -> t),

  with ``v_dst`` the converted velocity. This is how a student on TrigFlow (sCM, rCM) starts
  from a teacher trained on the linear path (rCM's conversion of a rectified-flow teacher):
  the student keeps the teacher's architecture and weights, so at initialisation its
  consistency map is the teacher's one-step denoiser. Hashable (a jit static).
  """
  net: Any
  src: Parameterization
  src_path: Any
  dst: Parameterization
  dst_path: Any
  delta: float = 1e-4

  def __call__(self, params: Any, y: Array, t: Array, s: Array, cond: Array | None = None
               ) -> Array:
    t32, s32 = t.astype(jnp.float32), s.astype(jnp.float32)
    diag = jnp.abs(t32 - s32) < self.delta
    # a safe off-diagonal time where the branch is not used; under stop_gradient so that a
    # tangent in t never leaks into s (at s = 0 the SNR conversion's derivative is infinite
    # and 0 * inf would turn every jvp in t of a consistency map into NaN)
    alt = jax.lax.stop_gradient(jnp.where(t32 > self.delta, t32 - 2 * self.delta,
                                          t32 + 2 * self.delta))
    s_off = jnp.where(diag, alt, s32)
    c_skip, c_out, c_in = (bcast(c, y) for c in self.dst.coefficients(t32, s_off))
    x = (y.astype(jnp.float32) / c_in).astype(y.dtype)
    to_src = lambda u: paths.convert_time(u, self.dst_path, self.src_path)
    k = lambda u: paths.point_scale(u, self.dst_path, self.src_path)
    xs = (x * bcast(k(t32), x)).astype(x.dtype)
    f_src = self.src.apply(self.net, params, xs, to_src(t32), to_src(s_off), cond)
    f_dst = f_src.astype(jnp.float32) / bcast(k(s_off), x)
    g_off = (f_dst - c_skip * x.astype(jnp.float32)) / c_out
    rate = self.dst.sigma_d if self.dst.name == "trigflow" else 1.0

    def on_diagonal(_):
      v_src = lambda x_, u: self.src.velocity(self.net, params, x_, u, cond)
      v = paths.convert_velocity(v_src, self.src_path, self.dst_path)(x, t32)
      return jnp.where(bcast(diag, y), v.astype(jnp.float32) / rate, g_off)
    # the velocity branch only runs when some pair is on the diagonal (never for s = 0 maps)
    return jax.lax.cond(jnp.any(diag), on_diagonal, lambda _: g_off, None).astype(y.dtype)
