"""rCM: score-regularised continuous-time consistency (Zheng et al. 2025, "Large Scale Diffusion
Distillation via Score-Regularized Continuous-Time Consistency"; seed ``003_*``, seed ``000_*``
section 4): the sCM distillation loss plus a DMD term as a long-jump regulariser,

    L_rCM(theta) = L_sCM(theta) + lambda * 1[step >= dmd_start] * L_DMD(theta),

    L_sCM = || F_theta - F^- - g / (||g||_2 + c) ||^2       (``scm.py``, plain sum: no w_phi),
    L_DMD = || x_0^theta - sg(x_0^theta - (D_fake - D_real) / w) ||^2   (``_score``, no 1/2),

both per-example means over dimensions (the paper sums; the common factor ``D`` only rescales
the learning rate). The defaults are the paper's recipe; where each value comes from:

* ``dmd_weight = 0.01`` (lambda): seed ``003_*`` ("lambda = 0.01 ... across all models"); the
  official code realises it as ``loss_scale = 100`` on the sCM sum and ``loss_scale_dmd = 1``.
  lambda is relative to sCM's L2-normalised tangent, so ``tangent_norm='l2'`` (with ``'rms'`` the
  same lambda would weigh the DMD term ``sqrt(D)`` times less).
* ``adaptive_weight = False``: the official code sums the two terms with constant weights (no
  learned ``w_phi``, whose drift would change the effective lambda).
* ``time_mean, time_std = -0.8, 1.6``: sCM times ``t = arctan(e^{P_mean + P_std n} / sigma_d)``
  (official config ``sde: p_mean=-0.8, p_std=1.6``; sCM's ImageNet setting).
* DMD and fake-score noise levels: rectified-flow times shifted by ``noise_shift = 5``,
  ``r = 5u / (1 + 4u)``, ``u ~ U(0, 1)``, at the matching SNR on TrigFlow (official
  ``timestep_shift = 5``, ``draw_training_time_D``); ``noise_time='uniform'`` gives DMD2's
  ``U[0.02, 0.98] T``.
* Rollout: ``N ~ U{1..4}`` steps (official ``max_simulation_steps_fake = 4``) of consistency
  multistep sampling -- denoise to 0, re-noise with fresh noise -- at rCM's random times
  ``t_{i+1} = min(t_i, t_D)`` (``rollout_times='random'``; ``'uniform'`` is the evaluation's
  grid), gradient through the last step (seed ``003_*`` "rollout").
* Critic : student = 4 : 1 after the tangent warmup (official ``student_update_freq = 5``: the
  student updates on every 5th iteration, the fake score on the other four; before the warmup
  only the student trains): ``parts.critic.updates = 4``, ``parts.critic.start = 1000`` =
  ``dmd_start`` = ``tangent_warmup``. Keep the three equal when changing one.
* Fake-score optimiser ``b1 = 0`` (official ``betas=[0, 0.999]``).
* Tangent warmup: the official form ``g = -cos t sqrt(1 - r^2 sin^2 t)(sigma_d F^- - v) - r cos t
  sin t (x_t + sigma_d dF^-/dt)`` (``warmup_form='rcm'``; ``'scm'`` is the sCM paper's
  ``-cos^2 t (...)``); both equal at ``r = 1``.
* Guidance: rCM's teacher guidance ``w`` means ``v_c + w (v_c - v_u)``; this library's
  ``teacher.guidance = g`` means ``v_u + g (v_c - v_u)``, so rCM's ``w`` is ``g = w + 1`` here
  (rCM's default ``teacher_guidance = 5`` is ``--config.teacher.guidance=6``).

Remaining deviations: the rollout's step count is drawn at random per step (the official code
cycles ``N = 1..4`` with the iteration count); the fake score is trained by velocity flow
matching, which on TrigFlow equals the official ``||x_0 - D_fake||^2 / sin^2 t`` for any
``sigma_d`` (``D = cos t x_t - sin t v``, so a velocity error is the denoiser's over
``sin t``); the student is updated on every
step (the official loop alternates iterations, so per student update it sees 4 critic updates,
as here); no NaN masking of examples (the train step skips a non-finite update as a whole).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from fmdistill import objectives
from fmdistill.objectives import _score, dmd, scm


def defaults():
  cfg = scm.cd_defaults()
  cfg.update(time_mean=-0.8, time_std=1.6, adaptive_weight=False, tangent_norm="l2",
             warmup_form="rcm")
  cfg.dmd_weight = 0.01     # lambda
  cfg.dmd_start = 1000      # student steps before the DMD term (= tangent_warmup)
  _score.add_fields(cfg, rollout_steps=4, rollout_times="random", noise_time="shift",
                    noise_min=0.0, noise_max=1.0, noise_shift=5.0)
  return cfg


def rcm_loss(params, batch, key, *, net, teacher, critic, ema_params=None, step=0, cfg=None,
             weighting=None):
  """``L_sCM + lambda L_DMD`` (module docstring); metrics of both terms. The sCM term uses
  ``key`` itself (so ``dmd_weight = 0`` gives exactly ``scm_cd``'s loss and gradient for the
  same key), the DMD term ``fold_in(key, 1)``."""
  cfg = cfg or defaults()
  _score.check(cfg)
  l_scm, m_scm = scm.scm_loss(params, batch, key, net=net, teacher=teacher,
                              ema_params=ema_params, step=step, cfg=cfg, weighting=weighting)
  if cfg.dmd_weight == 0:
    return l_scm, {**m_scm, "scm_loss": l_scm}
  l_dmd, m_dmd, _, _ = dmd.dm_loss(params, batch, jax.random.fold_in(key, 1), net=net,
                                teacher=teacher, critic=critic, cfg=cfg, scale=1.0)
  on = (jnp.asarray(step) >= cfg.dmd_start).astype(jnp.float32)
  loss = l_scm + cfg.dmd_weight * on * l_dmd
  return loss, {**m_scm, "loss": loss, "scm_loss": l_scm, "dmd_loss": l_dmd, **m_dmd}


CRITIC = objectives.Part(init=_score.init_critic, network=_score.critic_network,
                         loss=_score.part_critic_loss, updates=4, start=1000,
                         optimizer=(("lr", 1e-3), ("b1", 0.0)))

objectives.register(objectives.Objective(
    name="rcm", loss=rcm_loss, defaults=defaults, needs_teacher=True,
    check=_score.check_config, parts={"weighting": scm.WEIGHTING, "critic": CRITIC},
    tangent=True, consistency=True,
    doc="rCM: sCM distillation + 0.01 x DMD, fake score 4:1 after the tangent warmup"))
