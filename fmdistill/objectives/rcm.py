"""rCM: score-regularised continuous-time consistency (Zheng et al. 2025; seed ``003_*``, seed
``000_*`` section 4): the sCM distillation loss plus a DMD term as a long-jump regulariser,

    L_rCM(theta) = L_sCM(theta) + lambda * 1[step >= dmd_start] * L_DMD(theta),

with ``lambda = 0.01`` (the paper's value for every model) and the DMD term switched on after
the tangent warmup. The DMD student samples by a rollout of ``N ~ U{1..rollout_steps}`` TrigFlow
consistency jumps with the gradient through the last jump only; the fake-score critic (a copy of
the teacher) is trained by flow matching on those samples, alternately with the student
(``fmdistill.objectives.dmd``). See ``scm.py`` and ``dmd.py`` for the two terms.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from fmdistill import objectives
from fmdistill.objectives import dmd, scm


def defaults():
  cfg = scm.cd_defaults()
  cfg.dmd_weight = 0.01     # lambda
  cfg.dmd_start = 1000      # student steps before the DMD term (rCM: after the tangent warmup)
  cfg.rollout_steps = 2
  cfg.dmd_t_min = 0.02      # DMD noise levels, as fractions of T
  cfg.dmd_t_max = 0.98
  return cfg


def _dmd_cfg(cfg):
  """The DMD term's view of the config (its own noise-level range)."""
  sub = cfg.copy_and_resolve_references()
  with sub.unlocked():
    sub.t_min, sub.t_max = cfg.dmd_t_min, cfg.dmd_t_max
  return sub


def rcm_loss(params, batch, key, *, net, teacher, critic, ema_params=None, step=0, cfg=None,
             weighting=None):
  """``L_sCM + lambda L_DMD`` (module docstring); metrics of both terms."""
  cfg = cfg or defaults()
  k_scm, k_dmd = jax.random.split(key)
  l_scm, m_scm = scm.scm_loss(params, batch, k_scm, net=net, teacher=teacher,
                              ema_params=ema_params, step=step, cfg=cfg, weighting=weighting)
  l_dmd, m_dmd = dmd.dmd_loss(params, batch, k_dmd, net=net, teacher=teacher, critic=critic,
                              step=step, cfg=_dmd_cfg(cfg))
  on = (jnp.asarray(step) >= cfg.dmd_start).astype(jnp.float32)
  loss = l_scm + cfg.dmd_weight * on * l_dmd
  return loss, {"loss": loss, "scm_loss": l_scm, "dmd_loss": l_dmd,
                "score_gap": m_dmd["score_gap"], "residual": m_scm["residual"]}


def critic_loss(critic_params, student_params, batch, key, *, net, apply, teacher=None,
                parts=None, step=0, cfg=None):
  return dmd.critic_loss(critic_params, student_params, batch, key, net=net, apply=apply,
                         teacher=teacher, parts=parts, step=step, cfg=_dmd_cfg(cfg))


objectives.register(objectives.Objective(
    name="rcm", loss=rcm_loss, defaults=defaults, needs_teacher=True,
    parts={"weighting": scm.WEIGHTING,
           "critic": objectives.Part(init="teacher", network="teacher", loss=critic_loss,
                                     optimizer=(("lr", 1e-3),))},
    tangent=True, consistency=True,
    doc="rCM: sCM distillation + 0.01 x DMD with a fake-score critic"))
