"""Distribution matching distillation: DMD (Yin et al. 2024, "One-step Diffusion with
Distribution Matching Distillation") and DMD2 (Yin et al. 2024, "Improved Distribution Matching
Distillation for Fast Image Synthesis").

Seed ``004_*`` ("Interpolation distillation": the integrated KL loss
``int w_t KL(rho_t^theta || rho_t^data) dt``, DMD / Diff-Instruct), seed ``000_*`` section 4
and seed ``003_*`` (the DMD term of rCM). The generator is the student's flow map to ``s = 0``
(a consistency-style x0-predictor; multistep sampling denoises and re-noises, the
``consistency`` trait): ``x_0^theta`` comes from ``_score.rollout`` (``N ~ U{1..rollout_steps}``
steps of the student's own sampler, gradient through the last). With ``x_t = alpha x_0^theta +
sigma eps``, ``t`` from ``_score.sample_noise_time``, the generator loss is

    L_DM(theta) = 1/2 || x_0^theta - sg(x_0^theta - (D_fake(x_t) - D_real(x_t)) / w) ||^2,
    w = mean |x_0^theta - D_real(x_t)|   (per example, stop-gradient),

whose gradient in ``x_0^theta`` is ``(D_fake - D_real) / w``, proportional to the difference of
the two scores at ``x_t`` (the KL gradient). ``D_real`` comes from the frozen teacher (guided as
bound), ``D_fake`` from the ``critic`` part (a copy of the teacher trained by flow matching on
the generator's samples, ``_score.critic_loss``).

* ``dmd``: ``L_DM`` alone, 1-step generator, critic 5 updates per student step.
* ``dmd_v1`` (DMD): ``L_DM + reg_weight * || f(z, T, 0) - y ||^2`` on cached teacher pairs
  ``(z, y)`` (noise and the teacher's ODE output, ``batch='teacher_pairs'``; DMD's regression
  loss, ``lambda_reg = 0.25``), critic 1:1.
* ``dmd2`` (DMD2): no regression loss; the two-time-scale update rule (``parts.critic.updates =
  5`` fake-score updates per generator update, DMD2's ``dfake_gen_update_ratio``); backward
  simulation for multistep generators (``rollout_steps > 1``: the generator's input at
  ``t_i`` comes from its own sampler; ``backward_simulation=False`` noises real data to
  ``t_i`` instead); the GAN term (``gan_weight``, default 3e-3; 0 turns it off): a
  discriminator head (the ``disc`` part) on the critic's last hidden layer at noised inputs
  (``t ~ U[0, gan_t_max] T`` in path time: DMD2's diffusion GAN, see Deviations), non-saturating
  losses: generator
  ``gan_weight * softplus(-l(x_fake))``,
  head ``softplus(l(x_fake)) + softplus(-l(x_real))``, and the critic's features trained by the
  same classification loss weighted ``gan_critic_weight`` next to its flow matching (DMD2 trains
  head and fake score jointly: ImageNet ``3e-3`` / ``1e-2``).

Deviations: the regression loss of ``dmd_v1`` is the plain L2 distance (DMD uses LPIPS on
images); the critic is trained by velocity flow matching at the generator's noise-level
distribution (DMD2: EDM weighting over the whole schedule); noise levels are uniform in path
time by default (``noise_time='karras'`` gives DMD2's EDM grid indexing); DMD2 updates the
head and the fake score jointly (one optimiser step, the same generator samples, the head's
loss weighted ``cls_loss_weight``), here the head is its own part (``disc``: 5 updates per
student step with its own rollouts and optimiser, loss weight 1) and the critic's update
carries the classification loss through its features with the head frozen; the GAN's noise
times are uniform in path time up to ``gan_t_max T`` (DMD2 draws a uniform index on its Karras
sigma grid up to ``diffusion_gan_max_timestep``: a different distribution of noise levels).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from fmdistill import objectives
from fmdistill.objectives import _common, _score

sg = jax.lax.stop_gradient


def defaults():
  cfg = _score.add_fields(_common.base_config())
  cfg.reg_weight = 0.0        # dmd_v1: weight of the regression loss on teacher pairs
  cfg.pair_steps = 1          # grid steps of the cached teacher trajectories (dmd_v1)
  cfg.gan_weight = 0.0        # dmd2: generator GAN weight (0 = off; DMD2 ImageNet 3e-3)
  cfg.gan_critic_weight = 0.01  # dmd2: classification loss of the critic's features
  cfg.gan_t_max = 1.0         # dmd2: discriminator inputs noised at t ~ U[0, gan_t_max] T
  return cfg


def dmd2_defaults():
  cfg = defaults()
  cfg.gan_weight = 3e-3       # DMD2 ImageNet: gen_cls_loss_weight 3e-3, cls_loss_weight 1e-2
  return cfg


def v1_defaults():
  cfg = defaults()
  cfg.reg_weight = 0.25       # DMD's lambda_reg
  return cfg


def dm_loss(params, batch, key, *, net, teacher, critic, cfg, scale: float = 0.5):
  """``(scale * L_DM, metrics, x_0^theta, cond)`` (module docstring; DMD2's ``0.5``)."""
  path = _common.path_of(cfg)
  x0, cond, t, xt = _score.generate_and_noise(params, key, batch, net=net, cfg=cfg, path=path)
  d_real, d_fake = (sg(d) for d in _score.denoisers(xt, t, cond, teacher=teacher, critic=critic,
                                                   path=path))
  grad = _score.dmd_grad(x0, d_real, d_fake)
  loss = _score.surrogate(x0, grad, scale)
  return loss, {"score_gap": jnp.mean(_common.mean_sq(d_fake - d_real))}, x0, cond


def _gan_inputs(key, x, cfg, path):
  t = jax.random.uniform(key, (x.shape[0],), maxval=cfg.gan_t_max * path.T)
  eps = jax.random.normal(jax.random.fold_in(key, 1), x.shape, x.dtype)
  return path.sample(x, eps, t), t


def dmd_loss(params, batch, key, *, net, teacher, critic, ema_params=None, step=0, cfg=None,
             disc=None):
  """The generator loss of ``dmd`` / ``dmd_v1`` / ``dmd2`` (module docstring); ``critic(x, t,
  cond)`` is the frozen fake score's velocity, ``teacher(x, t, t, cond)`` the real one,
  ``disc`` the discriminator head's parameters (``gan_weight > 0``)."""
  del ema_params, step
  cfg = cfg or defaults()
  _score.check(cfg)
  path = _common.path_of(cfg)
  k_dm, k_gan = jax.random.split(key)
  loss, metrics, x0, cond = dm_loss(params, batch, k_dm, net=net, teacher=teacher,
                                    critic=critic, cfg=cfg)
  metrics["dm_loss"] = loss
  if cfg.reg_weight > 0:
    traj = batch["traj"]
    b = traj.shape[0]
    pred = _common.param_of(cfg).apply(net, params, traj[:, 0], jnp.full((b,), path.T),
                                       jnp.zeros((b,)), batch.get("cond"))
    reg = jnp.mean(_common.mean_sq(pred - sg(traj[:, -1])))
    loss, metrics["reg_loss"] = loss + cfg.reg_weight * reg, reg
  if cfg.gan_weight > 0:
    if disc is None:
      raise ValueError("gan_weight > 0 needs disc= (the discriminator head, the 'disc' part)")
    xt, t = _gan_inputs(k_gan, x0, cfg, path)
    logits = _score.head_logits(disc, critic.features(xt, t, cond))
    gan = jnp.mean(jax.nn.softplus(-logits))
    loss, metrics["gan_loss"] = loss + cfg.gan_weight * gan, gan
  return loss, {"loss": loss, **metrics}


def _classification(head, critic_features, x_real, x_fake, key, cond, cfg, path):
  """DMD2's discriminator loss ``softplus(l(fake)) + softplus(-l(real))`` (mean)."""
  kr, kf = jax.random.split(key)
  xr, tr = _gan_inputs(kr, x_real, cfg, path)
  xf, tf = _gan_inputs(kf, x_fake, cfg, path)
  lr = _score.head_logits(head, critic_features(xr, tr, cond))
  lf = _score.head_logits(head, critic_features(xf, tf, cond))
  return jnp.mean(jax.nn.softplus(lf) + jax.nn.softplus(-lr)), jnp.mean(lr - lf)


def critic_loss(critic_params, student_params, batch, key, *, net, apply, teacher=None,
                parts=None, step=0, cfg=None):
  """Flow matching of the fake score on the generator's samples (``_score.critic_loss``),
  plus, with the GAN term, ``gan_critic_weight`` times the classification loss of the frozen
  head on the critic's features."""
  del teacher, step
  path = _common.path_of(cfg)
  extra = None
  if cfg.gan_weight > 0:
    def extra(cp, x_fake, cond, k):
      feats = lambda x, t, c: apply.features(cp, x, t, c)
      cls, margin = _classification(parts["disc"], feats, batch["x"], x_fake, k, cond, cfg,
                                    path)
      return cfg.gan_critic_weight * cls, {"critic_cls": cls, "disc_margin": margin}
  return _score.critic_loss(critic_params, student_params, batch, key, net=net, apply=apply,
                            cfg=cfg, extra=extra)


def disc_loss(head, student_params, batch, key, *, net, apply=None, teacher=None, parts=None,
              step=0, cfg=None):
  """The discriminator head's non-saturating classification loss on the frozen critic's
  features of real data and of the generator's current samples."""
  del apply, teacher, step
  path = _common.path_of(cfg)
  kg, kc, kd = jax.random.split(key, 3)
  cond = _score.conditioning(kd, batch, cfg)
  x_fake = sg(_score.rollout(student_params, kg, batch["x"], cond, net=net, cfg=cfg)[0])
  loss, margin = _classification(head, parts["critic"].features, batch["x"], x_fake, kc, cond,
                                 cfg, path)
  return loss, {"disc_loss": loss, "disc_margin": margin}


def init_disc(key, ctx):
  """The discriminator head on the critic's features (width of the teacher's network)."""
  return _score.init_head(key, int(dict(ctx.teacher.model)["width"]))


def critic_part(updates: int, **kw) -> objectives.Part:
  """The fake score: the teacher's architecture and weights, trained by its own loss on the
  student's samples, ``updates`` times per student step (before it)."""
  return objectives.Part(init=_score.init_critic, network=_score.critic_network,
                         loss=critic_loss, updates=updates, optimizer=(("lr", 1e-3),), **kw)


DISC = objectives.Part(init=init_disc, loss=disc_loss, updates=5, optimizer=(("lr", 1e-3),),
                       enabled=lambda cfg: cfg.gan_weight > 0)

objectives.register(objectives.Objective(
    name="dmd", loss=dmd_loss, defaults=defaults, needs_teacher=True,
    check=_score.check_config, parts={"critic": critic_part(5)}, consistency=True,
    doc="distribution matching distillation with a fake-score critic (5 critic updates/step)"))
objectives.register(objectives.Objective(
    name="dmd_v1", loss=dmd_loss, defaults=v1_defaults, needs_teacher=True, batch="teacher_pairs",
    check=_score.check_config, parts={"critic": critic_part(1)}, consistency=True,
    doc="DMD: distribution matching + 0.25 x regression on cached teacher (noise, output) pairs"))
objectives.register(objectives.Objective(
    name="dmd2", loss=dmd_loss, defaults=dmd2_defaults, needs_teacher=True,
    check=_score.check_config, parts={"critic": critic_part(5), "disc": DISC}, consistency=True,
    doc="DMD2: two-time-scale critic (5:1), backward simulation, optional GAN head on the critic"))
