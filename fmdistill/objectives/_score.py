"""Fake-score machinery shared by the distribution-matching family (DMD, DMD2, VSD, SiD, rCM).

Seed ``004_*`` ("Interpolation distillation"): a one- or few-step generator ``x_0^theta`` is
trained so that its noised marginals ``rho_t^theta`` (``x_t = alpha(t) x_0^theta + sigma(t)
eps``) match the data's, ``rho_t^data``, whose score the frozen teacher gives. The generator's
own score is estimated by a *fake score* (the ``critic`` part: a copy of the teacher trained by
flow matching on the generator's current samples). With denoisers ``D(x_t) = E[x_0 | x_t]``
recovered from the velocities (``Path.denoise``), the scores are
``grad log rho_t(x) = (alpha(t) D(x) - x) / sigma(t)^2``, so every method here is written with

    Delta(x_t) = D_fake(x_t) - D_real(x_t) = sigma^2 / alpha (s_fake - s_real)(x_t).

This module holds what they share (no loss is registered here):

* ``rollout``: generator samples from the student's own multistep sampler -- the sampler the
  evaluation uses for it (``sampling.flow_map_step``; ``rollout_gamma = 1``: consistency
  multistep, denoise to 0 and re-noise with fresh noise), ``N ~ U{1..rollout_steps}`` steps,
  gradient through the last step only (rCM, seed ``003_*``; DMD2's backward simulation);
* ``sample_noise_time``: the noise levels of the generator and critic losses;
* ``critic_loss``: flow matching of the fake score on the generator's samples;
* the generator gradients in data space: DMD's normalised ``Delta / mean|x_0 - D_real|``,
  VSD's ``omega(t) alpha/sigma Delta``, SiD's Fisher-divergence loss;
* ``CriticNet``: the critic as a velocity on the student's path, with the features of its last
  hidden layer for DMD2's discriminator head.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections

from fmdistill import flowmap, paths, sampling
from fmdistill.objectives import _common
from fmdistill.paths import bcast

Array = jax.Array
sg = jax.lax.stop_gradient
NOISE_TIMES = ("uniform", "karras", "shift")
ROLLOUT_TIMES = ("uniform", "random")


def add_fields(cfg: ml_collections.ConfigDict, **overrides) -> ml_collections.ConfigDict:
  """The fields of the fake-score machinery (their meaning in ``rollout`` and
  ``sample_noise_time``), with ``overrides``."""
  cfg.rollout_steps = 1         # generator samples: N ~ U{1..rollout_steps} sampler steps
  cfg.rollout_times = "uniform"  # 'uniform': the k-step eval grid T (1 - i/k); 'random': rCM's
  cfg.rollout_gamma = 1.0       # the student's sampler: 1 = consistency multistep (eval.gamma)
  cfg.backward_simulation = True  # False: DMD2 without it, x_{t_i} noised from real data
  cfg.noise_time = "uniform"    # noise levels of the generator/critic losses (NOISE_TIMES)
  cfg.noise_min = 0.02          # 'uniform': t ~ U[min, max] T; 'karras': fraction of EDM's grid
  cfg.noise_max = 0.98
  cfg.noise_shift = 5.0         # 'shift': rectified-flow u ~ U(0,1), r = k u / (1 + (k - 1) u)
  if "guidance_input" not in cfg:
    _common.guidance_fields(cfg)
  cfg.update(overrides)
  return cfg


def conditioning(key: Array, batch: dict, cfg) -> Any:
  """The ``cond`` of a generator sample: the batch's labels (dropped with ``label_dropout``) and,
  with ``guidance_input``, a guidance scale per example (``_common.drop_labels``)."""
  return _common.drop_labels(key, batch.get("cond"), cfg)


def checks(cfg) -> list[tuple[str, bool, Any]]:
  """``(field, ok, accepted)`` for the machinery's fields (and DMD2's GAN fields, where
  present), for ``_common.first_invalid``."""
  checks = [
      ("noise_time", cfg.noise_time in NOISE_TIMES, list(NOISE_TIMES)),
      ("rollout_times", cfg.rollout_times in ROLLOUT_TIMES, list(ROLLOUT_TIMES)),
      ("rollout_steps", _common._int(cfg.rollout_steps) and cfg.rollout_steps >= 1,
       "an integer >= 1"),
      ("rollout_gamma", 0.0 <= cfg.rollout_gamma <= 1.0, "[0, 1]"),
      ("noise_min", 0.0 <= cfg.noise_min < cfg.noise_max, "[0, noise_max)"),
      ("noise_max", cfg.noise_max <= 1.0, "(noise_min, 1]"),
      ("noise_shift", cfg.noise_shift > 0, "> 0 (1: no shift)")]
  if "gan_t_max" in cfg:
    checks += [("gan_t_max", 0.0 < cfg.gan_t_max <= 1.0, "(0, 1]"),
               ("gan_weight", cfg.gan_weight >= 0, ">= 0 (0: no GAN term)"),
               ("gan_critic_weight", cfg.gan_critic_weight >= 0, ">= 0")]
  return checks


def check(cfg) -> None:
  """A one-line ``ConfigError`` (a ``ValueError``) for a bad value of the machinery's fields
  (a loss called directly, e.g. from a notebook)."""
  bad = _common.first_invalid(cfg, checks(cfg))
  if bad:
    raise bad


def check_config(config) -> None:
  """The registry's ``check`` for a method built on this machinery: ``ConfigError`` naming
  ``config.objective.<field>`` before anything runs."""
  _common.check_fields(config, checks(config.objective))


# ----------------------------------------------------------------------------- noise levels


def sample_noise_time(key: Array, n: int, cfg, path: paths.Path) -> Array:
  """Noise levels ``t (n,)`` of the generator and critic losses (``cfg.noise_time``):

  * ``'uniform'``: ``t ~ U[noise_min, noise_max] T`` (DMD2: ``[0.02, 0.98]`` of the schedule);
  * ``'karras'``: EDM's ``sigma = (s_min^(1/7) + u (s_max^(1/7) - s_min^(1/7)))^7``,
    ``s_min = 0.002``, ``s_max = 80``, ``u ~ U[noise_min, noise_max]``, at the matching SNR
    ``1 / sigma^2`` on ``path`` (SiD: ``u ~ U[0, 0.8]``);
  * ``'shift'``: rectified-flow time ``r = k u / (1 + (k - 1) u)``, ``u ~ U(0, 1)``, shift
    ``k = noise_shift``, at the matching SNR on ``path`` (rCM's DMD and fake-score times,
    ``k = 5``).
  """
  u = jax.random.uniform(key, (n,))
  if cfg.noise_time == "uniform":
    return (cfg.noise_min + (cfg.noise_max - cfg.noise_min) * u) * path.T
  if cfg.noise_time == "karras":
    lo, hi, rho = 0.002 ** (1 / 7.0), 80.0 ** (1 / 7.0), 7.0
    u = cfg.noise_min + (cfg.noise_max - cfg.noise_min) * u
    sigma = (lo + u * (hi - lo)) ** rho
    return jnp.clip(path.time_from_log_snr(-2.0 * jnp.log(sigma)), 0.0, path.T)
  if cfg.noise_time == "shift":
    k = cfg.noise_shift
    r = k * u / (1.0 + (k - 1.0) * u)
    return jnp.clip(paths.convert_time(r, paths.linear(), path), 0.0, path.T)
  raise ValueError(f"noise_time must be one of {NOISE_TIMES}, got {cfg.noise_time!r}")


def noise(key: Array, x0: Array, cfg, path: paths.Path) -> tuple[Array, Array, Array]:
  """``(t, eps, x_t)`` with ``t`` from ``sample_noise_time`` and ``x_t = alpha x0 + sigma eps``."""
  kt, ke = jax.random.split(key)
  t = sample_noise_time(kt, x0.shape[0], cfg, path)
  eps = jax.random.normal(ke, x0.shape, x0.dtype)
  return t, eps, path.sample(x0, eps, t)


# ----------------------------------------------------------------------------- generator


def _rollout_times(key: Array, b: int, cfg, path: paths.Path) -> Callable:
  """``times(i) -> (B,)``, ``times(0) = T``, non-increasing: the ``k = rollout_steps``-step
  evaluation grid ``T (1 - i/k)`` (``'uniform'``; a rollout of ``N <= k`` steps stops on it at
  ``T (1 - (N-1)/k)``, so the last map is trained at every start time of the ``k``-step sampler
  and of any sampler whose step count divides ``k``: DMD2's backward simulation on its fixed
  schedule) or rCM's ``t_{i+1} = min(t_i, t_D)`` with ``t_D`` from ``sample_noise_time``
  (``'random'``)."""
  T = jnp.full((b,), path.T, jnp.float32)
  if cfg.rollout_times == "uniform":
    return lambda i: T * (1.0 - i / cfg.rollout_steps)
  draws = jax.vmap(lambda k: sample_noise_time(k, b, cfg, path))(
      jax.random.split(key, cfg.rollout_steps))
  ts = jax.lax.associative_scan(jnp.minimum, jnp.concatenate([T[None], draws], 0), axis=0)
  return lambda i: ts[i]


def rollout(params: Any, key: Array, x_data: Array, cond: Any, *, net, cfg,
            step_index: Array | None = None) -> tuple[Array, Array]:
  """Student samples ``(x_0 (B, ...), t (B,))``: the map ``f(x_t, t, 0)`` applied at the end of
  ``N - 1`` steps of the student's own sampler from pure noise, the gradient through that last
  map only (earlier steps use stop-gradient parameters). ``N ~ U{1..rollout_steps}`` per call
  (``step_index`` fixes the step count to ``step_index + 1`` instead). ``x_data (B, ...)``
  gives the shape (and, with ``backward_simulation=False``, the real data noised to ``t_{N-1}``
  in place of the rollout: DMD2 without backward simulation). ``t`` is the input time of the
  last map."""
  path, param = _common.path_of(cfg), _common.param_of(cfg)
  b = x_data.shape[0]
  kz, kn, kt, ks, kr = jax.random.split(key, 5)
  n = (jax.random.randint(kn, (), 1, cfg.rollout_steps + 1) if step_index is None
       else jnp.asarray(step_index) + 1)
  times = _rollout_times(kt, b, cfg, path)
  frozen = sg(params)
  f = lambda x_, t_, s_: param.apply(net, frozen, x_, t_, s_, cond)
  zero = jnp.zeros((b,), jnp.float32)
  z = path.sigma(jnp.float32(path.T)) * jax.random.normal(kz, x_data.shape, x_data.dtype)
  if cfg.backward_simulation:
    def body(i, x):
      return sampling.flow_map_step(f, x, times(i), times(i + 1), path=path,
                                    gamma=cfg.rollout_gamma, key=jax.random.fold_in(ks, i))
    x = sg(jax.lax.fori_loop(0, n - 1, body, z))
  else:
    eps = jax.random.normal(kr, x_data.shape, x_data.dtype)
    x = path.sample(x_data, eps, times(n - 1))
  t_last = times(n - 1)
  return param.apply(net, params, x, t_last, zero, cond), t_last


def generate_and_noise(params: Any, key: Array, batch: dict, *, net, cfg, path: paths.Path,
                       detach: bool = True) -> tuple[Array, Any, Array, Array]:
  """The generator side shared by DMD, VSD and SiD: ``(x_0^theta, cond, t, x_t)`` — conditioning
  (``conditioning``), the student's sample from its own sampler (``rollout``) and that sample
  noised at a score time (``noise``); with ``detach`` the noised input carries no gradient
  (DMD, VSD), without it the gradient flows through ``x_t`` (SiD)."""
  kg, kn, kc = jax.random.split(key, 3)
  cond = conditioning(kc, batch, cfg)
  x0, _ = rollout(params, kg, batch["x"], cond, net=net, cfg=cfg)
  t, _, xt = noise(kn, jax.lax.stop_gradient(x0) if detach else x0, cfg, path)
  return x0, cond, t, xt


def denoisers(x_t: Array, t: Array, cond: Any, *, teacher, critic, path: paths.Path
              ) -> tuple[Array, Array]:
  """``(D_real, D_fake)`` at ``x_t``: the teacher's (guided as bound) and the critic's
  x0-predictions, from their velocities (``Path.denoise``)."""
  d_real = path.denoise(x_t, teacher(x_t, t, t, cond), t)[0]
  d_fake = path.denoise(x_t, critic(x_t, t, cond), t)[0]
  return d_real, d_fake


def surrogate(x0: Array, grad: Array, scale: float) -> Array:
  """``scale * mean || x0 - sg(x0 - grad) ||^2``: its gradient in ``x0`` is ``2 scale grad / D``
  per example (the "loss that gives ``grad`` through autodiff" of DreamFusion / DMD)."""
  return scale * jnp.mean(_common.mean_sq(x0 - sg(x0 - sg(grad))))


def dmd_grad(x0: Array, d_real: Array, d_fake: Array) -> Array:
  """DMD's data-space gradient ``(D_fake - D_real) / w``, ``w = max(mean|x0 - D_real|, 1e-5)``
  per example (DMD eq. "distribution matching gradient" with its normaliser; DMD2 and rCM use
  the same), under stop-gradient."""
  flat = lambda a: a.reshape(a.shape[0], -1)
  w = jnp.maximum(jnp.mean(jnp.abs(flat(sg(x0) - d_real)), axis=-1), 1e-5)
  return sg((d_fake - d_real) / bcast(w, x0))


# ----------------------------------------------------------------------------- critic


def part_critic_loss(critic_params: Any, student_params: Any, batch: dict, key: Array, *, net,
                     apply, teacher=None, parts=None, step=0, cfg=None) -> tuple[Array, dict]:
  """``critic_loss`` under a trainable part's loss signature (``objectives.Part.loss``): the
  fake score of VSD, SiD and rCM, which needs neither the teacher, the other parts nor the
  step."""
  del teacher, parts, step
  return critic_loss(critic_params, student_params, batch, key, net=net, apply=apply, cfg=cfg)


def critic_loss(critic_params: Any, student_params: Any, batch: dict, key: Array, *, net,
                apply, cfg, extra: Callable | None = None) -> tuple[Array, dict]:
  """Flow matching of the fake score on the student's current samples (the rollout, under
  stop-gradient): ``|| v_phi(x_t, t) - (alpha'(t) x_0 + sigma'(t) eps) ||^2`` with ``t`` from
  ``sample_noise_time``. ``apply(critic_params, x, t, cond)`` is the critic's velocity;
  ``extra(critic_params, x0_fake, cond, key) -> (scalar, metrics)`` adds a term (DMD2's GAN)."""
  path = _common.path_of(cfg)
  kg, kn, ke = jax.random.split(key, 3)
  cond = conditioning(jax.random.fold_in(key, 2), batch, cfg)
  x0 = sg(rollout(student_params, kg, batch["x"], cond, net=net, cfg=cfg)[0])
  t, eps, xt = noise(kn, x0, cfg, path)
  loss = jnp.mean(_common.mean_sq(apply(critic_params, xt, t, cond) - path.velocity(x0, eps, t)))
  metrics = {"critic_fm": loss}
  if extra is not None:
    more, m = extra(critic_params, x0, cond, ke)
    loss, metrics = loss + more, {**metrics, **m}
  return loss, metrics


@dataclasses.dataclass(frozen=True)
class CriticNet:
  """A network of the teacher's architecture, parameterisation and path presented on the
  student's path: ``net(params, x, t, cond)`` is its velocity (as ``teacher.velocity_fn``),
  ``net.features(params, x, t, cond) (B, width)`` its last hidden layer at the same input
  (``models.Network.features``). ``bind(params)`` gives the frozen part the student loss sees.
  Hashable (a jit static)."""
  tnet: Any
  tparam: Any
  tpath: paths.Path
  path: paths.Path

  def _native(self, x, t):
    t = t.astype(jnp.float32)
    if self.tpath.name == self.path.name and self.tpath.sigma_d == self.path.sigma_d:
      return x, t
    ts = paths.convert_time(t, self.path, self.tpath)
    return (x * bcast(paths.point_scale(t, self.path, self.tpath), x)).astype(x.dtype), ts

  def __call__(self, params, x, t, cond=None):
    base = lambda x_, t_: self.tparam.velocity(self.tnet, params, x_, t_, cond)
    if self.tpath.name != self.path.name or self.tpath.sigma_d != self.path.sigma_d:
      base = paths.convert_velocity(base, self.tpath, self.path)
    return base(x, t.astype(jnp.float32))

  def features(self, params, x, t, cond=None):
    xs, ts = self._native(x, t)
    c_in = self.tparam.coefficients(ts, ts)[2]
    return self.tnet.features(params, (bcast(c_in, x) * xs).astype(x.dtype), ts, ts, cond)

  def bind(self, params):
    return BoundCritic(self, params)


@dataclasses.dataclass(frozen=True)
class BoundCritic:
  """``critic(x, t, cond)`` with frozen parameters, and ``critic.features(x, t, cond)``."""
  net: CriticNet
  params: Any

  def __call__(self, x, t, cond=None):
    return self.net(sg(self.params), x, t, cond)

  def features(self, x, t, cond=None):
    return self.net.features(sg(self.params), x, t, cond)


def _guided(ctx) -> bool:
  return bool(ctx.config.model.get("guidance_embed", False))


def critic_network(ctx) -> CriticNet:
  """The ``critic`` part's network (``objectives.Part(network=critic_network)``): the teacher's
  network, or -- when the student takes the guidance scale as an input
  (``model.guidance_embed``) -- the student's own network (the teacher's architecture plus the
  scale embedding), so that the fake score is conditional on the scale like the student's
  samples."""
  t = ctx.teacher
  o = ctx.config.objective
  tnet = t.net
  if _guided(ctx):
    tnet = ctx.net
    while isinstance(tnet, flowmap.Reparameterized):
      tnet = tnet.net
  return CriticNet(tnet, t.param, t.path, paths.get_path(o.path, o.sigma_d))


def init_critic(key: Array, ctx) -> Any:
  """The critic's initial weights: a copy of the teacher's (plus the student's zero-output
  guidance embedding when it takes the scale as an input)."""
  del key
  p = jax.tree_util.tree_map(jnp.array, ctx.teacher_params)
  if _guided(ctx):
    p = {**p, "guidance": jax.tree_util.tree_map(jnp.array, ctx.params["guidance"])}
  return p


# ----------------------------------------------------------------------------- discriminator


def init_head(key: Array, width: int, hidden: int = 0) -> dict:
  """A two-layer discriminator head on ``(B, width)`` features -> ``(B,)`` logits; the output
  layer starts at zero (logit 0: no opinion)."""
  hidden = hidden or width
  k1, _ = jax.random.split(key)
  return {"w1": jax.random.normal(k1, (width, hidden)) / math.sqrt(width),
          "b1": jnp.zeros((hidden,)), "w2": jnp.zeros((hidden,)), "b2": jnp.zeros(())}


def head_logits(head: dict, feats: Array) -> Array:
  """``(B,)`` logits of ``init_head``'s head (float32)."""
  h = jax.nn.silu(feats.astype(jnp.float32) @ head["w1"] + head["b1"])
  return h @ head["w2"] + head["b2"]
