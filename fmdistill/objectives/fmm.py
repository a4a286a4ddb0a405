"""Flow-map matching: forward (Lagrangian) and backward (Eulerian) losses (Boffi, Albergo &
Vanden-Eijnden, "Flow map matching" and "How to build a consistency model: learning flow maps
via self-distillation"; seed ``004_*`` "Forward / backward losses", "Boundary conditions").

In our notation ``f(x_t, t, s) = x_s`` (the seed's ``Phi_{t -> s}``), displacement form
``f = x + (s - t) G`` with the boundary parameterisations of seed ``004_*``:

* ``order = 1``: ``G = NN_theta``           (``f = x + (s - t) NN``),
* ``order = 2``: ``G = v(x, t) + (s - t) NN_theta`` (``f = x + (s - t) v + (s - t)^2 NN``, with
  the frozen teacher velocity ``v``; ``flowmap.second_order``). The velocity is taken at the
  jump's source time ``t``; the seed writes ``v_t`` at its target time (our ``s``): both have
  ``d_s f = v`` at ``s = t``, and the source-time form needs no ``d_s v`` of the teacher (which
  a stop-gradient teacher's JVP would silently zero). Pairs drawn with ``s = t``
  (``equal_ratio``) carry no loss at this order (``G = v`` there).

Seed ``004_*`` losses, with the map's residuals computed by ``jax.jvp``:

    forward  (Lagrangian):  d_s f(x_t, t, s) - v(f(x_t, t, s), s) = 0,
    backward (Eulerian):    d/dt f(x_t, t, s) = d_t f + (grad_x f) v(x_t, t) = 0.

Used in the seed's "finite difference + stop gradient" spirit but continuous: each residual
is turned into a regression target for ``G`` under ``stop_gradient`` (``theta^- = sg(theta)``),

    backward:  G_tgt = v(x_t, t) - (t - s) dG^-/dt,
    forward:   G_tgt = v(f^-, s) - (s - t) d_s G^-,     L = E || G_theta - G_tgt ||^2,

so ``G_theta - G_tgt`` equals minus the backward residual / the forward residual at
``theta = theta^-`` (plain MSE, no normalisation or weighting: that is what distinguishes these
from AYF). Deviation from Boffi et al.'s code: there the gradient flows through the time
derivative (their ``lsd``/``esd`` terms regress ``d_t X`` / ``d_s X`` onto the stop-gradient
velocity) and each term is scaled by a learned weight ``exp(-w) L + w``; here the derivative is
under ``stop_gradient`` and the gradient flows through ``G`` only (MeanFlow-style): the same
fixed point, without the ``(s - t) d_theta(d_s G)`` part of the gradient, and unweighted.
Distillation (``fmm_forward``, ``fmm_backward``) uses the teacher's velocity; self-distillation
(``*_self``, no teacher) uses the student's own instantaneous velocity
``v^ = sg(NN_theta(x, t, t))`` and adds the flow-matching loss ``||NN(x_t, t, t) - v(x_t|x_0)||^2``
on the diagonal. Limits: the second-order form needs a teacher and the forward loss (its
backward residual would need the teacher's own time derivative, which the train loop's
stop-gradient teacher does not expose). A second-order run samples through ``sampling_net``
(the registry's ``samples_with_teacher`` and ``sampling_net`` traits): ``teacher.sampling_run``
and the train loop's evaluation bind the run's own teacher (at the step it trained with), so a
jump costs two network calls; the sampler refuses the raw network of such a run.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from fmdistill import flowmap, objectives
from fmdistill.objectives import _common, _tangent

sg = jax.lax.stop_gradient


def defaults():
  cfg = _common.base_config(time_sampler="uniform")
  cfg.velocity = "teacher"
  cfg.order = 1                 # boundary parameterisation: 1 or 2 (seed 004)
  cfg.equal_ratio = 0.1
  cfg.time_fd = 0.0
  return cfg


def self_defaults():
  cfg = defaults()
  cfg.velocity = "conditional"  # velocity of the diagonal flow-matching term
  cfg.equal_ratio = 0.0
  cfg.fm_weight = 1.0
  return cfg


def displacement_net(net, teacher, order: int):
  """``G(params, x, t, s, cond)`` of the boundary parameterisation (module docstring)."""
  if order == 1:
    return net
  if order == 2:
    if teacher is None:
      raise ValueError("order=2 (x + (s-t) v + (s-t)^2 NN) needs a teacher velocity")
    return flowmap.second_order(net, lambda x, t, cond: teacher(x, t, t, cond))
  raise ValueError(f"order must be 1 or 2, got {order}")


def samples_with_teacher(cfg) -> bool:
  """``order = 2`` maps sample through the frozen teacher's velocity (``sampling_net``)."""
  return int(cfg.order) == 2


def sampling_net(net, teacher, cfg):
  """The ``order = 2`` flow map's displacement network for sampling, ``G = v + (s - t) NN``
  with the frozen teacher's velocity ``teacher(teacher_params, x, t, t, cond)``: each jump
  costs one teacher and one student evaluation. Returns ``g(params, teacher_params, x, t, s,
  cond)`` (the registry wraps it in ``objectives.SamplingNet``)."""
  def g(params, teacher_params, x, t, s, cond=None):
    bound = lambda x_, t_, s_, c_: teacher(teacher_params, x_, t_, s_, c_)
    return displacement_net(net, bound, cfg.order)(params, x, t, s, cond)
  return g


def backward_target(G, params, ema_params, x_t, t, s, v, cond=None, *, fused=True,
                    time_fd=0.0):
  """``(G_theta, G_tgt)``, ``G_tgt = G^- + df^-/dt = v - (t - s) dG^-/dt`` (stop-gradient)."""
  fn = lambda p, x, t_: G(p, x, t_, s, cond)
  out, out_m, dG = _tangent.eulerian(fn, params, ema_params, x_t, t, v, fused=fused,
                                     time_fd=time_fd)
  tgt = out_m.astype(jnp.float32) + _tangent.eulerian_direction(out_m, dG, v, t, s)
  return out, sg(tgt)


def forward_target(G, params, ema_params, velocity, x_t, t, s, cond=None, *, fused=True):
  """``(G_theta, G_tgt)``, ``G_tgt = G^- - (d_s f^- - v(f^-, s))`` (stop-gradient);
  ``velocity(x, s) -> v`` is evaluated at the map's output ``f^- = x_t + (s - t) G^-``."""
  fn = lambda p, s_: G(p, x_t, t, s_, cond)
  out, out_m, dGs = _tangent.lagrangian(fn, params, ema_params, s, fused=fused)
  v_end = sg(velocity(_tangent.displacement(x_t, out_m, t, s), s))
  tgt = out_m.astype(jnp.float32) - _tangent.lagrangian_residual(out_m, dGs, v_end, t, s)
  return out, sg(tgt)


def _mse(a, b):
  return jnp.mean(_common.mean_sq(a.astype(jnp.float32) - b))


def _loss(direction: str, self_distill: bool):
  def loss_fn(params, batch, key, *, net, teacher=None, ema_params=None, step=0, cfg=None):
    del step
    cfg = cfg or (self_defaults() if self_distill else defaults())
    _common.require(cfg, param="displacement", method="flow-map matching")
    fused = not cfg.target_ema
    t, s, x_t, v_cond, cond = _common.noised_pairs(batch, key, cfg)
    metrics = {}
    if self_distill:
      if cfg.order != 1:
        raise ValueError("self-distillation uses order=1 (the second order needs a teacher)")
      G = net
      p_m = sg(params) if fused or ema_params is None else ema_params
      diag = net(params, x_t, t, t, cond)
      v_fm = _common.target_velocity(cfg, teacher, x_t, t, v_cond, cond)
      fm = _mse(diag, v_fm)
      metrics["fm"] = fm
      v_hat = lambda x, u: net(p_m, x, u, u, cond)
      v = sg(diag) if fused else sg(v_hat(x_t, t))
    else:
      G = displacement_net(net, teacher, cfg.order)
      v_hat = lambda x, u: teacher(x, u, u, cond)
      v = _common.target_velocity(cfg, teacher, x_t, t, v_cond, cond)
    if direction == "backward":
      if cfg.order != 1:
        raise ValueError("the backward loss supports order=1 only (module docstring)")
      out, tgt = backward_target(G, params, ema_params, x_t, t, s, v, cond, fused=fused,
                                 time_fd=cfg.time_fd)
    else:
      out, tgt = forward_target(G, params, ema_params, v_hat, x_t, t, s, cond, fused=fused)
    consistency = _mse(out, tgt)
    loss = consistency + (cfg.fm_weight * metrics["fm"] if self_distill else 0.0)
    metrics.update(loss=loss, consistency=consistency)
    return loss, metrics
  loss_fn.__name__ = f"fmm_{direction}{'_self' if self_distill else ''}_loss"
  loss_fn.__doc__ = (f"Flow-map matching, {direction} loss"
                     f"{' with self-distillation' if self_distill else ''} (module docstring).")
  return loss_fn


fmm_forward_loss = _loss("forward", False)
fmm_backward_loss = _loss("backward", False)
fmm_forward_self_loss = _loss("forward", True)
fmm_backward_self_loss = _loss("backward", True)

def _check(direction: str, self_distill: bool):
  """Config checks (``config.validate``): the combinations the losses cannot honour."""
  def check(config) -> None:
    o = config.objective
    _common.check_fields(config, [
        ("order", o.order == 1 or (direction == "forward" and not self_distill),
         "1 (the second order needs a teacher and the forward loss)"),
        ("velocity", self_distill or direction == "backward" or o.velocity == "teacher",
         "'teacher' (the forward loss follows the teacher's velocity at the map's endpoint; "
         "'conditional' would be ignored)")])
  return check


for _name, _fn, _self in (("fmm_forward", fmm_forward_loss, False),
                          ("fmm_backward", fmm_backward_loss, False),
                          ("fmm_forward_self", fmm_forward_self_loss, True),
                          ("fmm_backward_self", fmm_backward_self_loss, True)):
  objectives.register(objectives.Objective(
      name=_name, loss=_fn, defaults=self_defaults if _self else defaults,
      needs_teacher=not _self, tangent=True, check=_check(_name.split("_")[1], _self),
      samples_with_teacher=None if _self else samples_with_teacher,
      sampling_net=None if _self else sampling_net,
      doc=_fn.__doc__))
