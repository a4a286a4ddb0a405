"""Interpolation distillation with a fake score: VSD (integrated KL) and SiD (Fisher divergence).

Seed ``004_*`` ("Interpolation distillation"): a generator ``x_0^theta`` is trained so that its
interpolation ``x_t = alpha(t) x_0^theta + sigma(t) eps`` matches the data's, through

    L_KL     = int w_t KL(rho_t^theta || rho_t^data) dt              (VSD, Diff-Instruct, DMD),
    L_Fisher = int w_t E || grad log rho_t^theta - grad log rho_t^data ||^2 dt         (SiD),

with the generator's score from the ``critic`` part (a copy of the teacher trained by flow
matching on the generator's samples; the machinery of ``_score``, shared with DMD). With
denoisers ``D`` and ``Delta = D_fake - D_real = sigma^2 / alpha (s_fake - s_real)``:

* ``vsd`` (Wang et al. 2023, "ProlificDreamer", variational score distillation): the KL
  gradient in the epsilon form ``omega(t) (eps_real - eps_fake) dx_t/dtheta`` with
  DreamFusion's ``omega(t) = sigma(t)^2``; as ``eps = (x_t - alpha D) / sigma`` this is the
  data-space gradient ``alpha(t) sigma(t) Delta`` (the seed's ``w_t = sigma^3 / alpha``),
  realised by the surrogate ``1/2 || x_0 - sg(x_0 - alpha sigma Delta) ||^2``. Noise levels
  ``U[0.02, 0.98] T``, fake score 1:1.
* ``sid`` (Zhou et al. 2024, "Score identity Distillation"): the loss of its official code,
  per example

      L_SiD = mean( (D_real - D_fake) * ((D_real - x_0) - alpha_sid (D_real - D_fake)) ) / w,
      w = sg(mean |x_0 - D_real|),   alpha_sid = 1.2,

  differentiated through ``x_0`` AND through both denoisers' inputs ``x_t(x_0)`` (their weights
  frozen: the teacher's ``with_input_grad``, the critic's partial). Noise levels: EDM's Karras
  grid at ``u ~ U[0, 0.8]`` (SiD's ``tmax = 800``), fake score 1:1.

Both use the student's rollout (1 step by default) and are consistency-style students (flow map
to ``s = 0``, consistency multistep sampling). Deviations: the fake score is trained by velocity
flow matching at the generator's noise-level distribution (ProlificDreamer: LoRA diffusion loss;
SiD: EDM's loss and log-normal noise), VSD's noise range is not annealed, and VSD's
``omega(t) = sigma(t)^2`` is the student's path's (DreamFusion's is the VP one, at the same SNR
``sigma^2 / (alpha^2 + sigma^2)``: on the linear path ours is that times ``alpha^2 + sigma^2``,
a re-weighting by a factor in ``[0.5, 1]``).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from fmdistill import objectives
from fmdistill.objectives import _common, _score
from fmdistill.paths import bcast

sg = jax.lax.stop_gradient


def vsd_defaults():
  return _score.add_fields(_common.base_config())


def sid_defaults():
  cfg = _score.add_fields(_common.base_config(), noise_time="karras", noise_min=0.0,
                          noise_max=0.8)
  cfg.sid_alpha = 1.2
  return cfg


def vsd_loss(params, batch, key, *, net, teacher, critic, ema_params=None, step=0, cfg=None):
  """VSD's generator loss (module docstring)."""
  del ema_params, step
  cfg = cfg or vsd_defaults()
  _score.check(cfg)
  path = _common.path_of(cfg)
  x0, cond, t, xt = _score.generate_and_noise(params, key, batch, net=net, cfg=cfg, path=path)
  d_real, d_fake = (sg(d) for d in _score.denoisers(xt, t, cond, teacher=teacher, critic=critic,
                                                   path=path))
  grad = bcast(path.alpha(t) * path.sigma(t), x0) * (d_fake - d_real)
  loss = _score.surrogate(x0, grad, 0.5)
  return loss, {"loss": loss, "score_gap": jnp.mean(_common.mean_sq(d_fake - d_real))}


def sid_loss(params, batch, key, *, net, teacher, critic, ema_params=None, step=0, cfg=None):
  """SiD's generator loss (module docstring): the gradient flows through the generator's
  sample and through the inputs of the teacher's and the critic's denoisers."""
  del ema_params, step
  cfg = cfg or sid_defaults()
  _score.check(cfg)
  path = _common.path_of(cfg)
  x0, cond, t, xt = _score.generate_and_noise(params, key, batch, net=net, cfg=cfg, path=path,
                                               detach=False)  # x_t carries the gradient
  real = getattr(teacher, "with_input_grad", teacher)  # bound teachers stop the gradient
  d_real, d_fake = _score.denoisers(xt, t, cond, teacher=real, critic=critic, path=path)
  flat = lambda a: a.reshape(a.shape[0], -1).astype(jnp.float32)
  w = sg(jnp.maximum(jnp.mean(jnp.abs(flat(x0 - d_real)), -1), 1e-5))
  gap = flat(d_real - d_fake)
  per = jnp.mean(gap * (flat(d_real - x0) - cfg.sid_alpha * gap), -1) / w
  loss = jnp.mean(per)
  return loss, {"loss": loss, "score_gap": jnp.mean(jnp.square(gap))}


CRITIC = objectives.Part(init=_score.init_critic, network=_score.critic_network,
                         loss=_score.part_critic_loss, optimizer=(("lr", 1e-3),))

objectives.register(objectives.Objective(
    name="vsd", loss=vsd_loss, defaults=vsd_defaults, needs_teacher=True,
    check=_score.check_config, parts={"critic": CRITIC}, consistency=True,
    doc="VSD: integrated-KL score distillation, eps-weighting sigma^2, fake score 1:1"))
objectives.register(objectives.Objective(
    name="sid", loss=sid_loss, defaults=sid_defaults, needs_teacher=True,
    check=_score.check_config, parts={"critic": CRITIC}, consistency=True,
    doc="SiD: Fisher-divergence score identity distillation (alpha = 1.2), fake score 1:1"))
