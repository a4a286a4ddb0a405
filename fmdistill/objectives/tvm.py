"""Terminal Velocity Matching (TVM; Zhou, Parger, Haque & Song, Luma AI, "Terminal Velocity
Matching", arXiv 2511.19797; seed ``001_*`` "Flow maps", seed ``004_*`` "Forward loss").

Linear path ``x_t = (1 - t) x + t e`` (``t = 0`` data, as in the paper), displacement flow map
``f(x_t, t, s) = x_t + (s - t) F_theta(x_t, t, s)`` (the paper's parameterisation: the network
sees ``t`` and ``t - s``; ours sees ``(t, s)`` with a ``t - s`` branch, the same function
class). Flow matching regularises the map at its *initial* time (``F(x, t, t) = v``); TVM
regularises it at its *terminal* time ``s``: the exact map satisfies

    d/ds f(x_t, t, s) = v(f(x_t, t, s), s),       d/ds f = F + (s - t) d_s F,

and the loss (the paper's terminal-velocity objective plus its flow-matching term, which also
provides the velocity at the terminal point) is

    L = E[ || F + (s - t) d_s F - sg(F^-(f, s, s)) ||^2 ]  +  E[ || F(x_s', s', s') - v~ ||^2 ],

``(F, d_s F)`` from one ``jax.jvp`` of the student in ``s`` (tangent ``(0, 0, 1)`` in
``(x, t, s)``), the **gradient taken through d_s F** (the paper backpropagates through the JVP;
``tangent_grad=False`` stops it, for comparison). ``F^-(f, s, s)`` is the velocity at the map's
end point from the target network (the paper: an EMA with decay 0.99, ``target_ema``;
default ``''`` = ``sg(theta)``), with ``f`` under ``stop_gradient``. The paper proves this
bounds the 2-Wasserstein distance between model and data when the map is Lipschitz.

Times as in the paper's code: gap ``t - s = sigmoid(N(gap_mean, gap_std))``,
``s ~ logit-normal(s_mean, s_std)`` truncated to ``[0, 1 - gap]``, ``t = s + gap``; the
flow-matching term at an independent ``s' ~ logit-normal(s_mean, s_std)`` on the same noise.
Both terms are per-example means over dimensions, unweighted; the terminal term is zero where
``s = t``. CFG: ``v~ = omega v + (1 - omega) F^-(x_s', s', s' | null)`` (label dropout 0.1).

Changes from the paper: ``omega`` is fixed and not a network input (the paper feeds
``1/omega`` to the network; its released ImageNet config fixes ``cfg = 2``); its output scaling
by ``omega`` and loss scaling by ``1/omega^2`` (``do_scale_param``) are omitted -- in its code
they apply to labelled rows only (dropped-label rows get scale 1), so measured in our output
units it weighs labelled rows ``1/omega^2`` against unconditional ones (1/4 at ``omega = 2``),
where every row weighs the same here: the same fixed point, different training dynamics; the paper's
semi-Lipschitz DiT changes (modulated normalisation, spectral initialisation) are not in our
models (``model.qk_norm=True`` is, and the digits config uses it); the fused Flash-attention
JVP kernel with backward is ``fmdistill.pallas`` (``model.attn_impl='pallas'``).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.scipy.special import ndtr, ndtri

from fmdistill import objectives
from fmdistill.objectives import _common, _tangent
from fmdistill.paths import bcast

sg = jax.lax.stop_gradient


def defaults():
  cfg = _common.base_config(label_dropout=0.1)
  cfg.s_mean, cfg.s_std = -0.4, 1.0       # logit-normal of the terminal time s
  cfg.gap_mean, cfg.gap_std = -0.8, 1.0   # logit-normal of the gap t - s
  cfg.fm_weight = 1.0
  cfg.guidance = 1.0                      # omega, folded into the flow-matching target
  cfg.tangent_grad = True                 # the paper: gradient through d_s F
  return cfg


def sample_times(key, n: int, cfg) -> tuple[jax.Array, jax.Array, jax.Array]:
  """``(t, s, s')`` of shape ``(n,)``: ``0 <= s < t <= 1`` (module docstring) and ``s'`` for
  the flow-matching term."""
  kg, ks, kp = jax.random.split(key, 3)
  gap = jax.nn.sigmoid(cfg.gap_mean + cfg.gap_std * jax.random.normal(kg, (n,)))
  s_max = jnp.clip(1.0 - gap, 1e-6, 1.0 - 1e-6)
  # inverse-CDF draw of N(s_mean, s_std) truncated to logit(s) < logit(s_max)
  top = ndtr((jnp.log(s_max / (1.0 - s_max)) - cfg.s_mean) / cfg.s_std)
  u = jnp.clip(jax.random.uniform(ks, (n,)) * top, 1e-12, 1.0 - 1e-7)
  s = jax.nn.sigmoid(cfg.s_mean + cfg.s_std * ndtri(u))
  s = jnp.minimum(s, s_max)
  t = jnp.minimum(s + gap, 1.0)
  s_prime = jax.nn.sigmoid(cfg.s_mean + cfg.s_std * jax.random.normal(kp, (n,)))
  return t, s, s_prime


def terminal_residual(net, params, target_params, x_t, t, s, cond=None, *,
                      tangent_grad: bool = True):
  """``(d_s f - sg(F^-(f, s, s)), d_s F)`` (float32, ``x_t.shape``): the terminal-velocity
  residual of the student's map ``f = x_t + (s - t) F`` and its tangent; differentiable through
  ``F`` and (with ``tangent_grad``) through ``d_s F``."""
  F, dF = _tangent.lagrangian_jvp(lambda s_: net(params, x_t, t, s_, cond), s)
  if not tangent_grad:
    dF = sg(dF)
  f = sg(_tangent.displacement(x_t, F, t, s))
  v_end = sg(net(target_params, f, s, s, cond))
  return _tangent.lagrangian_residual(F, dF, v_end, t, s), dF


def tvm_loss(params, batch, key, *, net, teacher=None, ema_params=None, step=0, cfg=None):
  """TVM (module docstring). ``batch['x'] (B, ...)``, optional ``'cond'``. Metrics: loss, the
  terminal and flow-matching terms, and the RMS of ``d_s F`` (a JVP-health signal)."""
  del teacher, step
  cfg = cfg or defaults()
  _common.require(cfg, param="displacement", path="linear", method="TVM")
  path = _common.path_of(cfg)
  x0 = batch["x"]
  kt, kn, kd = jax.random.split(key, 3)
  t, s, s2 = sample_times(kt, x0.shape[0], cfg)
  eps = jax.random.normal(kn, x0.shape, x0.dtype)
  x_t, x_s2 = path.sample(x0, eps, t), path.sample(x0, eps, s2)
  cond = _common.drop_labels(kd, batch.get("cond"), cfg)
  target = sg(ema_params if cfg.target_ema and ema_params is not None else params)
  res, dF = terminal_residual(net, params, target, x_t, t, s, cond,
                              tangent_grad=bool(cfg.tangent_grad))
  terminal = jnp.where(s < t, _common.mean_sq(res), 0.0)
  v = path.velocity(x0, eps, s2).astype(jnp.float32)
  if cond is not None and cfg.guidance != 1.0:
    v_u = sg(net(target, x_s2, s2, s2, jnp.full_like(cond, cfg.num_classes))).astype(jnp.float32)
    guided = cfg.guidance * v + (1.0 - cfg.guidance) * v_u
    v = jnp.where(bcast(cond == cfg.num_classes, v), v, guided)
  fm = _common.mean_sq(net(params, x_s2, s2, s2, cond).astype(jnp.float32) - sg(v))
  loss = jnp.mean(terminal + cfg.fm_weight * fm)
  return loss, {"loss": loss, "terminal": jnp.mean(terminal), "fm": jnp.mean(fm),
                "tangent_rms": jnp.sqrt(jnp.mean(_common.mean_sq(dF)))}


def check(config) -> None:
  """Config checks (run by ``config.validate``)."""
  o = config.objective
  _common.check_fields(config, [("s_std", o.s_std >= 0, ">= 0"),
                                ("gap_std", o.gap_std >= 0, ">= 0"),
                                ("fm_weight", o.fm_weight >= 0, ">= 0")])


objectives.register(objectives.Objective(
    name="tvm", loss=tvm_loss, defaults=defaults, tangent=True, check=check,
    doc="terminal velocity matching from scratch: d/ds f(x_t, t, s) = v(f, s), gradient "
        "through the jvp tangent, plus flow matching"))
