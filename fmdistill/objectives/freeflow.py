"""FreeFlow: flow-map distillation without data (Tong, Ma, Xie & Jaakkola, "Flow Map
Distillation Without Data", arXiv 2511.19428; seed ``002_*`` lists it; seed ``004_*`` "Forward
loss" and "Interpolation distillation" are its two ingredients).

Data-based distillation evaluates the teacher on noised *data* ``x_t ~ p~_t``; when the teacher's
own generating marginals ``p^_t`` differ (an imperfect teacher, guidance, fine-tuning: the
paper's "teacher-data mismatch") the student learns the teacher where it never goes. FreeFlow
samples only the prior, ``z ~ N(0, sigma(T)^2 I)``, where teacher and student agree by
construction, and trains the student's map from noise ``f_theta(z, T, s) = z + (s - T) F`` along
its *own* path. In our notation (``t = T`` noise; the paper's ``delta`` is ``T - s``):

* **Predictor** (the paper's prediction objective): the student's generating velocity follows
  the teacher's along the student's path, ``d_s f_theta(z, T, s) = v(f_theta(z, T, s), s)``,
  as a regression with a stop-gradient target,

      L_pred = E_{z, s} || F_theta(z, T, s) - sg( v(f^-, s) - (s - T) d_s F^- ) ||^2,

  so the gradient in ``F`` is the generating-velocity mismatch ``d_s f^- - v(f^-, s)`` (one
  ``jax.jvp`` in ``s``; ``theta^- = sg(theta)``). This is the Lagrangian (forward) map
  condition of seed ``004_*`` evaluated at ``t = T`` on prior samples instead of noised data.
* **Corrector** (the paper's correction objective): the predictor is local; errors compound
  along the path, so the student's *noising* marginals ``x_r = alpha(r) f_theta(z, T, 0) +
  sigma(r) n`` are pulled onto the teacher's: the KL between them has the gradient
  ``E[(d x^/d theta)^T (v_N - v)(x_r, r)]`` up to a weight in ``r`` (the paper's velocity
  form of the score difference), with ``v_N`` the velocity of the student's noised samples,
  learned by the ``critic`` part (initialised from the teacher, trained by flow matching on the
  student's current one-step samples, never on data). ``x^ = f_theta(z, T, 0)`` moves along
  ``+(v_N - v)``; we write it as DMD does, with denoisers ``D = Path.denoise`` and DMD2's
  normaliser ``w = mean|x^ - D_teacher|``:

      L_corr = 1/2 || x^ - sg(x^ + (D_teacher - D_N)(x_r, r) / w) ||^2,   r ~ U[r_min, r_max] T
      (linear path: D_teacher - D_N = r (v_N - v)).

  ``L = L_pred + lambda L_corr`` with, by default (``balance='adaptive'``), the library's own
  balancing ``lambda = corrector_weight * sg(rms(res) / (T rms(move)))``: ``res`` the
  predictor's residual, ``move = (D_teacher - D_N) / w`` the corrector's step in data space, so
  that the corrector's gradient in ``F`` is half the predictor's in rms (the predictor's is
  ``2 res / (B D)``, the corrector's ``lambda T move / (B D)``) whatever the critic's scale;
  ``balance='fixed'`` gives ``lambda = corrector_weight``.

Changes from the paper (whose training code is not public): the paper balances the two
objectives' gradients adaptively; its rule is not reproduced here -- the rule above (or a fixed
weight) on a DMD-normalised corrector is used instead. The predictor's ``s`` is uniform on
``[0, T)`` (``time_sampler`` draws ``T - s``) and the corrector's ``r`` uniform on
``[r_min, r_max] T``; the paper's own distributions are not reproduced. Guidance comes with the teacher
(``teacher.guidance``, bound by the train loop): FreeFlow distils whatever field the teacher
generates with.

Data-free in the library: the registry entry has ``batch='prior'``, so the train loop feeds
``{'z': N(0, I) (B, ...), 'cond': uniform labels}`` shaped like the teacher's data and never
builds a data source; neither loss reads ``batch['x']``.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from fmdistill import objectives
from fmdistill.objectives import _common, _tangent
from fmdistill.paths import bcast

sg = jax.lax.stop_gradient


def defaults():
  cfg = _common.base_config(time_sampler="uniform")
  cfg.corrector_weight = 1.0
  cfg.balance = "adaptive"            # or 'fixed' (L_pred + corrector_weight L_corr)
  cfg.r_min, cfg.r_max = 0.02, 0.98   # noise levels of the corrector and the critic, x T
  return cfg


def prior(batch, cfg):
  """``(x_T, cond)``: the prior sample ``sigma(T) z`` of the batch's ``z (B, ...)``."""
  path = _common.path_of(cfg)
  z = batch["z"]
  return (path.sigma(jnp.float32(path.T)) * z).astype(z.dtype), batch.get("cond")


def one_step(net, params, x_T, cond, cfg):
  """The student's one-step sample ``f_theta(x_T, T, 0)`` (differentiable in ``params``)."""
  path, param = _common.path_of(cfg), _common.param_of(cfg)
  b = x_T.shape[0]
  return param.apply(net, params, x_T, jnp.full((b,), path.T, jnp.float32),
                     jnp.zeros((b,), jnp.float32), cond)


def predictor(net, params, ema_params, teacher, x_T, T: float, s, cond, *,
              fused: bool = True):
  """``(F_theta, residual, F^-)`` at ``(x_T, T, s)``: ``residual = d_s f^- - v(f^-, s)``
  (float32, stop-gradient), the generating-velocity mismatch; ``L_pred = ||F - sg(F^- -
  residual)||^2`` has the gradient ``residual`` in ``F`` at ``theta = theta^-``."""
  T = jnp.full_like(s, T)
  fn = lambda p, s_: net(p, x_T, T, s_, cond)
  F, F_m, dF = _tangent.lagrangian(fn, params, ema_params, s, fused=fused)
  v_end = sg(teacher(_tangent.displacement(x_T, F_m, T, s), s, s, cond))
  return F, sg(_tangent.lagrangian_residual(F_m, dF, v_end, T, s)), F_m


def _noised(key, x0, cfg):
  """``(r, n, x_r)``: ``r ~ U[r_min, r_max] T`` and ``x_r = alpha(r) x0 + sigma(r) n``."""
  path = _common.path_of(cfg)
  kr, kn = jax.random.split(key)
  r = jax.random.uniform(kr, (x0.shape[0],), minval=cfg.r_min * path.T,
                         maxval=cfg.r_max * path.T)
  n = jax.random.normal(kn, x0.shape, x0.dtype)
  return r, n, path.sample(x0, n, r)


def corrector(x_hat, teacher, critic, key, cond, cfg):
  """``(L_corr, step, velocity gap)``: ``x_hat`` the student's one-step samples (differentiable),
  ``critic(x, r, cond)`` the frozen noising velocity ``v_N``; ``step (B, ...)`` is the
  DMD-normalised move ``(D_teacher - D_N) / w`` of each sample (module docstring) and
  ``L_corr = 1/2 ||x^ - sg(x^ + step)||^2``."""
  path = _common.path_of(cfg)
  r, _, x_r = _noised(key, sg(x_hat), cfg)
  v_t = sg(teacher(x_r, r, r, cond)).astype(jnp.float32)
  v_n = sg(critic(x_r, r, cond)).astype(jnp.float32)
  d_t, _ = path.denoise(x_r.astype(jnp.float32), v_t, r)
  d_n, _ = path.denoise(x_r.astype(jnp.float32), v_n, r)
  x32 = sg(x_hat).astype(jnp.float32)
  w = jnp.mean(jnp.abs(x32 - d_t).reshape(x32.shape[0], -1), axis=-1) + 1e-6
  move = (d_t - d_n) / bcast(w, x32)
  loss = 0.5 * jnp.mean(_common.mean_sq(x_hat.astype(jnp.float32) - sg(x32 + move)))
  return loss, move, jnp.mean(_common.mean_sq(v_n - v_t))


def _rms(x):
  return jnp.sqrt(jnp.mean(jnp.square(x.astype(jnp.float32))))


def freeflow_loss(params, batch, key, *, net, teacher, critic, ema_params=None, step=0,
                  cfg=None):
  """FreeFlow (module docstring). ``batch['z'] (B, ...)`` standard normal, optional
  ``'cond'``; ``batch['x']`` is never read. ``teacher(x, t, s, cond)`` the frozen teacher,
  ``critic(x, r, cond)`` the frozen noising velocity. Metrics: loss, predictor, corrector, the
  velocity gap ``||v_N - v||^2`` and the RMS generating-velocity mismatch."""
  del step
  cfg = cfg or defaults()
  _common.require(cfg, param="displacement", method="FreeFlow")
  if teacher is None:
    raise ValueError("FreeFlow distils a teacher (set teacher.workdir)")
  path = _common.path_of(cfg)
  x_T, cond = prior(batch, cfg)
  ks, kc = jax.random.split(key)
  s = path.T - _common.sample_t(ks, x_T.shape[0], cfg, path)  # T - s from the time sampler
  F, res, F_m = predictor(net, params, ema_params, teacher, x_T, path.T, s, cond,
                          fused=not cfg.target_ema)
  pred = jnp.mean(_common.mean_sq(F.astype(jnp.float32) - sg(F_m.astype(jnp.float32) - res)))
  corr, move, gap = corrector(one_step(net, params, x_T, cond, cfg), teacher, critic, kc, cond,
                              cfg)
  weight = cfg.corrector_weight
  if cfg.balance == "adaptive":  # the corrector's gradient in F half the predictor's (rms)
    weight = weight * sg(_rms(res) / (path.T * _rms(move) + 1e-8))
  elif cfg.balance != "fixed":
    raise ValueError(f"balance must be 'adaptive' or 'fixed', got {cfg.balance!r}")
  loss = pred + weight * corr
  return loss, {"loss": loss, "predictor": pred, "corrector": corr, "velocity_gap": gap,
                "corrector_weight": weight, "mismatch_rms": _rms(res)}


def critic_loss(critic_params, student_params, batch, key, *, net, apply, teacher=None,
                parts=None, step=0, cfg=None):
  """Flow matching of the noising velocity ``v_N`` on the student's current one-step samples
  from the prior batch (``apply(critic_params, x, r, cond)``, the teacher's architecture)."""
  del teacher, parts, step
  path = _common.path_of(cfg)
  x_T, cond = prior(batch, cfg)
  x0 = sg(one_step(net, student_params, x_T, cond, cfg))
  r, n, x_r = _noised(key, x0, cfg)
  err = _common.mean_sq(apply(critic_params, x_r, r, cond) - path.velocity(x0, n, r))
  loss = jnp.mean(err)
  return loss, {"critic_loss": loss}


CRITIC = objectives.Part(init="teacher", network="teacher", loss=critic_loss, updates=1,
                         optimizer=(("lr", 1e-3),))

def check(config) -> None:
  """Config checks (run by ``config.validate``)."""
  o = config.objective
  _common.check_fields(config, [
      ("balance", o.balance in ("adaptive", "fixed"), ["adaptive", "fixed"]),
      ("corrector_weight", o.corrector_weight >= 0, ">= 0"),
      ("r_min", 0.0 <= o.r_min < o.r_max, "[0, r_max)"),
      ("r_max", o.r_max <= 1.0, "(r_min, 1]")])


objectives.register(objectives.Objective(
    name="freeflow", loss=freeflow_loss, defaults=defaults, needs_teacher=True, batch="prior",
    check=check,
    parts={"critic": CRITIC}, tangent=True,
    doc="FreeFlow: data-free flow-map distillation from prior samples (predictor: the "
        "student's generating velocity follows the teacher; corrector: noising marginals)"))
