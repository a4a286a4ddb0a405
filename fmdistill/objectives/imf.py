"""Improved MeanFlow (iMF; Geng, Lu, Wu, Shechtman, Kolter & He, "Improved Mean Flows: On the
Challenges of Fastforward Generative Models", arXiv 2512.02012; seed ``001_*`` "MeanFlow").

Linear path ``z_t = (1 - t) x + t e`` (the paper's and ours: ``t = 0`` data), displacement flow
map ``f(z_t, t, s) = z_t + (s - t) u_theta(z_t, t, s)`` with ``u`` the average velocity over
``[s, t]`` (the paper's ``r`` is our ``s``). The MeanFlow identity solved for the
*instantaneous* velocity (the paper's "MF as a v-loss", its compound function ``V_theta``):

    v(z_t, t) = u(z_t, t, s) + (t - s) d/dt u(z_t, t, s),     d/dt u = (d_z u) v + d_t u,

    V_theta(z_t) = u_theta(z_t, t, s) + (t - s) JVP_sg(u_theta; v_theta),
    v_theta(z_t, t) = u_theta(z_t, t, t)                       (the boundary condition),

    L = E[ w || V_theta - (e - x) ||^2 ],   w = sg(1 / (||Delta||^2 + c)^p).

The JVP tangent is the network's own predicted *marginal* velocity ``v_theta`` (not the
conditional ``e - x`` of MeanFlow), so ``V_theta`` is a function of ``z_t`` alone and the
regression target ``e - x`` does not depend on the network: a standard flow-matching-style
regression whose minimiser is ``V_theta = E[e - x | z_t]``. ``(u, du/dt)`` is one ``jax.jvp`` of
the student along ``(v_theta, 1, 0)`` in ``(z, t, s)``.

Gradient through the tangent. The paper writes ``JVP_sg`` (and its official code stops the
gradient of ``du/dt``): the gradient flows through ``u`` only; that is the default
(``tangent_grad=False``), and at ``s = t`` the loss is flow matching. ``tangent_grad=True``
differentiates the whole compound ``V_theta`` -- through ``du/dt`` and through the tangent
``v_theta`` (grad-of-jvp; with ``model.attn_impl='pallas'`` the tangent-backward kernels of
``fmdistill.pallas``). It is the exact gradient of the regression above; its expected gradient
also vanishes at the exact map (the residual's conditional mean is zero there).

Classifier-free guidance. Two forms. (1) As the paper does, guidance as a network input
(``guidance_input=True``, needs ``model.guidance_embed``; the official code's
``imf.py``/``configs``): every labelled example draws a scale ``omega`` in ``guidance_range``
(``guidance_power = b > 0``: the official power law, density ``~ omega^-b``, log-uniform on
``[1, 8]`` in its config; ``0``: uniform) and, with ``guidance_interval_input=True`` (needs
``model.guidance_interval``), an interval ``[lo, hi]`` (fractions of ``T``): ``[0, 1]`` on the
``s = t`` rows, otherwise ``lo ~ U[0, 1/2]``, ``hi ~ U[1/2, 1]``. Both enter the network
through ``cond`` (``{'label', 'w', 'interval'}``). The instantaneous velocity at ``t`` is
queried with the effective scale ``omega_t`` (``omega`` inside the interval, 1 outside) and the
full interval (``velocity_cond``); it is the JVP tangent, and the target is the paper's

    v~ = v + (1 - 1/omega_t)(v_theta(z_t | c, omega_t) - v_theta(z_t | null, 1))

under ``stop_gradient`` (``guided_velocity_input``). Its fixed point is ``v_theta(null) +
omega_t (v_c* - v_theta(null))``: the CFG field, with the network's own unconditional field
(``tests/objectives/test_guidance.py``). Scale and interval are chosen at sampling time
(``evaluate.generate(..., guidance=, guidance_interval=)``, ``--guidance`` and
``--config.eval.guidance_interval``). Without the interval input the window is the config's
fixed ``[guidance_t_min, guidance_t_max]``. Dropped labels get ``omega = 1`` (the official code
keeps the drawn scale with the null label; the target is ``v`` either way), and their JVP
tangent is the network's own null-label velocity ``v_theta(z_t | null, 1)`` (the official code's
tangent for those rows is the conditional ``v_c``, computed before the labels are dropped).
(2) Folded into the target with a fixed ``omega`` as the paper's MF baseline does (its CFG
equation, with MeanFlow's ``kappa``): ``v~ = omega v + kappa v_theta(z_t | c) + (1 - omega - kappa)
v_theta(z_t | null)`` under ``stop_gradient``, applied for ``t`` in ``[guidance_t_min,
guidance_t_max]`` (``omega = 1`` outside, and for dropped labels); ``guidance`` /
``guidance_kappa``, no network input.

Changes from the paper: the single-network boundary condition instead of the paper's auxiliary
``v``-head (the paper offers both; our networks have one output); ``||Delta||^2`` is the
per-example *mean* over dimensions by default (the official code sums:
``adaptive_reduce='sum'``, as ``experiments/imagenet.py:imf`` sets; ``c`` is then size
independent, see ``meanflow``); no in-context conditioning (an architecture change): the scale
and the interval are embedded and added to the time/label conditioning
(``models.embeddings.GuidanceEmbed``). ``velocity='teacher'`` replaces ``e - x`` by a frozen
teacher's velocity (then ``V_theta - v`` is zero at the exact map, not only in expectation;
used by the oracle tests).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from fmdistill import objectives
from fmdistill.errors import ConfigError
from fmdistill.objectives import _common, _tangent
from fmdistill.paths import bcast

sg = jax.lax.stop_gradient


def defaults():
  cfg = _common.base_config(time_sampler="logit_normal", time_mean=-0.4, time_std=1.0,
                            label_dropout=0.1)
  cfg.velocity = "conditional"  # or 'teacher'
  cfg.equal_ratio = 0.5         # fraction of pairs with s = t (the paper's code: 50%)
  cfg.adaptive_p = 1.0
  cfg.adaptive_c = 0.01
  cfg.adaptive_reduce = "mean"  # 'mean' or 'sum' (the official code) over dimensions
  cfg.tangent_grad = False      # True: differentiate du/dt and the tangent too (grad-of-jvp)
  cfg.guidance = 1.0            # omega (1 = no CFG), folded into the target
  cfg.guidance_kappa = 0.0
  cfg.guidance_t_min = 0.0
  cfg.guidance_t_max = 1.0
  _common.guidance_fields(cfg)  # guidance_input, guidance_range: omega as a network input
  cfg.guidance_interval_input = False  # also the interval [lo, hi] as a network input
  return cfg


def compound_velocity(net, params, x_t, t, s, cond=None, *, tangent_grad: bool = False,
                      tangent_cond=None):
  """``(V_theta, u, du/dt, v_theta)``, each ``x_t.shape`` (``V`` in float32).

  ``v_theta = u_theta(x_t, t, t)``; ``(u, du/dt)`` from one ``jax.jvp`` along ``(v_theta, 1)``
  in ``(x, t)`` with ``s`` fixed; ``V = u + (t - s) du/dt``. Without ``tangent_grad`` the
  tangent and ``du/dt`` are under ``stop_gradient`` (the paper's ``JVP_sg``). ``tangent_cond``:
  the condition of the ``v_theta`` query if not ``cond`` (``velocity_cond``)."""
  v_hat = net(params, x_t, t, t, cond if tangent_cond is None else tangent_cond)
  tangent = v_hat if tangent_grad else sg(v_hat)
  u, du = _tangent.eulerian_jvp(lambda x_, t_: net(params, x_, t_, s, cond), x_t, t, tangent)
  if not tangent_grad:
    du = sg(du)
  return _tangent.instantaneous_velocity(u, du, t, s), u, du, v_hat


def guided_velocity(v, v_c, v_u, omega, kappa=0.0):
  """CFG folded into the target, no guidance input: ``omega v + kappa v_c + (1 - omega - kappa)
  v_u``; ``omega`` (and ``kappa``) ``(B,)`` per example, ``v`` the conditional flow-matching
  velocity."""
  w = bcast(omega, v)
  k = bcast(jnp.broadcast_to(jnp.asarray(kappa, jnp.float32), omega.shape), v)
  return w * v + k * v_c + (1.0 - w - k) * v_u


def guided_velocity_input(v, v_c, v_u, omega):
  """The paper's target when ``omega`` is a network input: ``v + (1 - 1/omega)(v_c - v_u)``,
  ``v_c = v_theta(z | c, omega)``, ``v_u = v_theta(z | null, 1)`` (the network then predicts the
  guided field itself, so ``v_c - v_u = omega (v(z|c) - v(z))``)."""
  w = bcast(omega, v)
  return v + (1.0 - 1.0 / w) * (v_c - v_u)


def _guided_target(net, params, x_t, t, v, v_hat, cond, cfg):
  """The regression target with CFG folded in (module docstring, form 2); ``v`` where labels
  are null, outside the guidance interval, or without guidance."""
  if cond is None or (cfg.guidance == 1.0 and cfg.guidance_kappa == 0.0):
    return v
  null = jnp.full_like(cond, cfg.num_classes)
  v_u = sg(net(sg(params), x_t, t, t, null))
  inside = (t >= cfg.guidance_t_min) & (t <= cfg.guidance_t_max)
  omega = jnp.where(inside, cfg.guidance, 1.0)
  kappa = jnp.where(inside, cfg.guidance_kappa, 0.0)
  vg = guided_velocity(v, sg(v_hat), v_u, omega, kappa)
  return sg(jnp.where(bcast(cond == cfg.num_classes, v), v, vg))


def with_interval(key, cond: dict, full) -> dict:
  """``cond`` (``{'label', 'w'}``, from ``_common.drop_labels`` with ``guidance_input``) plus a
  guidance interval per example, ``'interval' (B, 2)``: ``[0, 1]`` where ``full (B,)`` (the
  ``s = t`` rows, as the official code does), otherwise ``lo ~ U[0, 1/2]``, ``hi ~ U[1/2, 1]``."""
  k_lo, k_hi = jax.random.split(key)
  b = cond["label"].shape[0]
  lo = jnp.where(full, 0.0, jax.random.uniform(k_lo, (b,), maxval=0.5))
  hi = jnp.where(full, 1.0, jax.random.uniform(k_hi, (b,), minval=0.5, maxval=1.0))
  return dict(cond, interval=jnp.stack([lo, hi], -1))


def velocity_cond(cond: dict, t, cfg) -> dict:
  """The condition under which the instantaneous velocity at ``t`` is queried (the JVP tangent
  and ``v_c`` of the target; the official code's ``v_cond_fn``): the effective scale
  ``omega_t = omega`` inside the example's interval (or the config's fixed window), 1 outside,
  and the full interval ``[0, 1]`` -- at time ``t`` only whether ``t`` is inside matters."""
  if "interval" in cond:
    lo, hi = cond["interval"][:, 0], cond["interval"][:, 1]
  else:
    lo, hi = cfg.guidance_t_min, cfg.guidance_t_max
  out = dict(cond, w=jnp.where((t >= lo) & (t <= hi), cond["w"], 1.0))  # linear path: T = 1
  if "interval" in cond:
    out["interval"] = jnp.broadcast_to(jnp.array([0.0, 1.0]), cond["interval"].shape)
  return out


def _input_guided_target(net, params, x_t, t, v, v_c, vcond, cfg):
  """Form 1's target ``v + (1 - 1/omega_t)(v_c - v_theta(z | null, 1))`` with ``v_c`` the
  network's velocity under ``vcond = velocity_cond(...)`` (which carries ``omega_t``); ``v`` for
  dropped labels."""
  label, omega_t = vcond["label"], vcond["w"]
  null = dict(vcond, label=jnp.full_like(label, cfg.num_classes), w=jnp.ones_like(omega_t))
  v_u = sg(net(sg(params), x_t, t, t, null))
  vg = guided_velocity_input(v, sg(v_c), v_u, omega_t)
  return sg(jnp.where(bcast(label == cfg.num_classes, v), v, vg))


def imf_loss(params, batch, key, *, net, teacher=None, ema_params=None, step=0, cfg=None):
  """Improved MeanFlow (module docstring). ``batch['x'] (B, ...)``, optional ``'cond'``.
  Metrics: loss, raw MSE of ``V - v``, the flow-matching part (``s = t``) and the RMS of
  ``du/dt`` (a JVP-health signal: it blows up before the loss does)."""
  del ema_params, step
  cfg = cfg or defaults()
  _common.require(cfg, param="displacement", path="linear", method="improved MeanFlow")
  t, s, x_t, v_cond, cond = _common.noised_pairs(batch, key, cfg)  # guidance_input: a dict
  vcond = cond
  if isinstance(cond, dict):
    if cfg.get("guidance_interval_input", False):
      cond = with_interval(jax.random.fold_in(key, 7), cond, s == t)
    vcond = velocity_cond(cond, t, cfg)
  V, _, du, v_hat = compound_velocity(net, params, x_t, t, s, cond, tangent_cond=vcond,
                                      tangent_grad=bool(cfg.tangent_grad))
  v = _common.target_velocity(cfg, teacher, x_t, t, v_cond, cond)
  if cfg.velocity == "conditional" and isinstance(cond, dict):
    v = _input_guided_target(net, params, x_t, t, v, v_hat, vcond, cfg)
  elif cfg.velocity == "conditional":
    v = _guided_target(net, params, x_t, t, v, v_hat, cond, cfg)
  diff = V - sg(v).astype(jnp.float32)
  loss, _ = _tangent.adaptive_loss(diff, cfg.adaptive_c, cfg.adaptive_p,
                                   cfg.get("adaptive_reduce", "mean"))
  err = _common.mean_sq(diff)
  diag = (s == t).astype(jnp.float32)
  fm = jnp.sum(diag * err) / jnp.maximum(jnp.sum(diag), 1.0)
  return loss, {"loss": loss, "mse": jnp.mean(err), "fm_mse": fm,
                "tangent_rms": jnp.sqrt(jnp.mean(_common.mean_sq(du)))}


def _check(o) -> None:
  """Config checks: the MeanFlow-style fields, and one guidance form at a time."""
  _tangent.check_adaptive(o)
  if o.get("guidance_input", False) and (o.guidance != 1.0 or o.guidance_kappa != 0.0):
    raise ConfigError("config.objective.guidance/guidance_kappa fold a fixed scale into the "
                      "target; with objective.guidance_input=True the scale is a network input: "
                      "leave guidance=1.0, guidance_kappa=0.0")
  if o.get("guidance_interval_input", False) and not o.get("guidance_input", False):
    raise ConfigError("config.objective.guidance_interval_input=True needs "
                      "objective.guidance_input=True")


objectives.register(objectives.Objective(
    name="imf", loss=imf_loss, defaults=defaults, tangent=True,
    check=lambda c: _check(c.objective),
    doc="improved MeanFlow from scratch: u + (t - s) du/dt regressed onto e - x, the jvp "
        "tangent the network's own velocity u(z, t, t)"))
