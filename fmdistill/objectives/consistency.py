"""Discrete-time consistency models: CD, CT, iCT and ECT (seed ``001_*`` "Discretized CM";
seed ``000_*`` "Consistency Distillation" pseudocode with an EMA target).

A consistency model is the flow map to ``s = 0``: ``f_theta(x_t, t) = f_theta(x_t, t, 0)`` in
the library's notation (linear path ``x_t = (1 - t) x_0 + t eps``, displacement form
``f = x_t - t F_theta(x_t, t, 0)``, so a student that starts from the flow-matching teacher's
weights is, at step 0, the teacher's one-step denoiser ``x_t - t v(x_t, t)``). The discrete loss
(seed ``001_*``) compares the map at two adjacent times of a grid:

    L(theta) = E[ lambda_n d( f_theta(x_{t_{n+1}}, t_{n+1}, 0), sg f_{theta^-}(x^_{t_n}, t_n, 0) ) ]

* **CD** (``cm_cd``; Song et al. 2023, "Consistency Models", Alg. 2): ``x^_{t_n}`` is one
  step of the teacher's probability-flow ODE from ``t_{n+1}`` to ``t_n`` (``solver``, Heun as
  in the paper), ``theta^-`` an EMA of ``theta`` (``target_ema='ema_0.95'``, the paper's
  ``mu = 0.95``), ``n ~ U{1, ..., N - 1}``, ``N = 18``, ``lambda = 1``, ``d = L2``.
* **CT** (``cm_ct``; same paper, Alg. 3): no teacher; the one-sample estimate
  ``x^_{t_n} = x_{t_n}`` built from the *same* ``(x_0, eps)`` as ``x_{t_{n+1}}``; the
  discretisation curriculum ``N(k) = ceil(sqrt(k/K ((s_1 + 1)^2 - s_0^2) + s_0^2) - 1) + 1``,
  ``s_0 = 2``, ``s_1 = 150``.
* **iCT** (``ict``; Song & Dhariwal 2023, "Improved Techniques for Training Consistency
  Models"): CT with ``theta^- = stopgrad(theta)`` (no EMA), the pseudo-Huber metric
  ``d(a, b) = sqrt(||a - b||^2 + c^2) - c``, ``c = 0.00054 sqrt(D)``, the curriculum
  ``N(k) = min(s_0 2^floor(k / K'), s_1) + 1``, ``K' = floor(K / (log2 floor(s_1/s_0) + 1))``,
  ``s_0 = 10``, ``s_1 = 1280``, lognormal interval probabilities
  ``p(n) ∝ erf((log sigma_{n+1} - P_mean) / (sqrt 2 P_std)) - erf((log sigma_n - P_mean) /
  (sqrt 2 P_std))``, ``(P_mean, P_std) = (-1.1, 2.0)``, and ``lambda_n = 1 / (sigma_{n+1} -
  sigma_n)``.
* **ECT** (``ect``; Geng et al. 2024, "Consistency Models Made Easy"): start from the
  pretrained diffusion (here: flow-matching) model and shrink ``Delta t`` in stages. Continuous
  ``sigma_t = exp(P_mean + P_std z)``, ``sigma_r = max(0, sigma_t (1 - n(sigma_t) / q^{a+1}))``,
  ``n(sigma) = 1 + k sigmoid(-b sigma)``, stage ``a = floor(step / (K / stages))`` (``q = 2``,
  ``k = 8``, ``b = 1``, 8 stages), ``x_r`` from the same noise (``sigma_r = 0``: the target is
  ``x_0``), ``d = sqrt(||a - b||^2 + c^2) - c`` with ``c = 0`` (ECT's CIFAR-10 setting), weight
  ``1 / (sigma_t - sigma_r)``, ``theta^- = stopgrad(theta)``.

**EDM sigma and the library's t.** The papers write ``x_sigma = x_0 + sigma eps``; on any of
the library's paths the same point is ``x_t / alpha(t)`` with ``sigma = sigma(t)/alpha(t)``
(linear path: ``sigma = t / (1 - t)``, ``t = sigma / (1 + sigma)``), and ``f(x_t, t, 0)``
returns ``x_0`` in both, so every grid, time sampler, weight and metric above is the paper's,
evaluated at ``t = t(sigma)`` (``t_of_sigma``; ``sigma_max = 80`` is ``t = 0.9877``, sampling
starts at ``t = T = 1``, 1.2 % past it). The Karras grid is
``sigma_i = (sigma_min^(1/rho) + i/(N - 1) (sigma_max^(1/rho) - sigma_min^(1/rho)))^rho``
(``sigma_min = 0.002``, ``rho = 7``). Euler on the linear path is DDIM, as is EDM's Euler, so the
teacher's Euler step is the paper's; Heun differs at third order. The papers fix
``f(x, sigma_min) = x`` by their ``c_skip``; here the boundary is ``f(x, 0, 0) = x``, so the
lowest grid point ``t_1 = 0.002`` is a free (teacher-initialised) denoiser, not an identity.

**Deviations.** ``d = 'l2'`` is the per-example *mean* over dimensions (LPIPS, the papers'
image metric, is not offered); CT's EMA decay is fixed (``mu = 0.95``) instead of the paper's
``mu(k) = exp(s_0 log mu_0 / N(k))`` (the train loop's EMAs have fixed decays);
``curriculum_steps`` (the papers' ``K``) is ``train.steps`` unless set. ``target='teacher'``
turns any of the four into a distillation (e.g. iCT's or ECT's schedules with CD's teacher
step), ``target='conditional'`` into consistency training.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections

from fmdistill import objectives, paths, sampling
from fmdistill.objectives import _common
from fmdistill.paths import bcast

Array = jax.Array
sg = jax.lax.stop_gradient
CURRICULA = ("fixed", "ct", "ict", "ect")
METRICS = ("l2", "pseudo_huber")


# ----------------------------------------------------------------------------- defaults


def _base(**kw) -> ml_collections.ConfigDict:
  cfg = _common.base_config()
  cfg.update(dict(
      target="conditional",    # 'teacher' (CD: one teacher ODE step) or 'conditional' (CT)
      solver="heun",           # CD's teacher step
      sigma_min=0.002, sigma_max=80.0, rho=7.0,
      curriculum="fixed",      # 'fixed' (num_scales), 'ct', 'ict' or 'ect'
      num_scales=18,           # N for the fixed curriculum
      s0=2, s1=150,            # N(k) bounds of the 'ct' / 'ict' curricula
      curriculum_steps=0,      # K; 0 = train.steps (filled in by the train loop)
      time_dist="uniform",     # 'uniform' over grid intervals, or 'lognormal' (iCT)
      p_mean=-1.1, p_std=2.0,  # lognormal in log sigma (iCT, ECT)
      metric="l2",             # 'l2' (mean square) or 'pseudo_huber'
      huber_c=0.00054,         # pseudo-Huber c = huber_c * sqrt(D)
      weighting="uniform",     # 'uniform' or 'inverse_gap' (1 / (sigma_{n+1} - sigma_n))
      ect_q=2.0, ect_k=8.0, ect_b=1.0, ect_stages=8))
  cfg.update(kw)
  return cfg


def cd_defaults() -> ml_collections.ConfigDict:
  return _base(target="teacher", target_ema="ema_0.95")


def ct_defaults() -> ml_collections.ConfigDict:
  return _base(curriculum="ct", target_ema="ema_0.95")


def ict_defaults() -> ml_collections.ConfigDict:
  return _base(curriculum="ict", s0=10, s1=1280, time_dist="lognormal",
               metric="pseudo_huber", weighting="inverse_gap")


def ect_defaults() -> ml_collections.ConfigDict:
  return _base(curriculum="ect", time_dist="lognormal", metric="pseudo_huber", huber_c=0.0,
               weighting="inverse_gap")


# ----------------------------------------------------------------------------- sigma <-> t


def sigma_of_t(path: paths.Path, t: Array) -> Array:
  """EDM noise level ``sigma = sigma(t) / alpha(t)`` of time ``t`` (``t / (1 - t)`` linear)."""
  return jnp.exp(-0.5 * path.log_snr(t))


def t_of_sigma(path: paths.Path, sigma: Array) -> Array:
  """The path's time with EDM noise level ``sigma`` (``sigma / (1 + sigma)`` linear; 0 at 0)."""
  return path.time_from_log_snr(-2.0 * jnp.log(sigma))


def karras(u: Array, sigma_min: float, sigma_max: float, rho: float) -> Array:
  """``(sigma_min^(1/rho) + u (sigma_max^(1/rho) - sigma_min^(1/rho)))^rho``, ``u in [0, 1]``."""
  a, b = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
  return (a + u * (b - a)) ** rho


# ----------------------------------------------------------------------------- curricula


def _progress(step: Array | int, cfg) -> Array:
  if cfg.curriculum_steps <= 0:
    raise ValueError("curriculum_steps (the papers' K) must be > 0; the train loop sets it to "
                     "train.steps, a direct call must pass it")
  return jnp.clip(jnp.asarray(step, jnp.float32), 0.0, cfg.curriculum_steps)


def num_scales(step: Array | int, cfg) -> Array:
  """``N(k)``: grid size at step ``k`` (int32 scalar) for the ``fixed``/``ct``/``ict``
  curricula."""
  if cfg.curriculum == "fixed":
    return jnp.asarray(cfg.num_scales, jnp.int32)
  k, K = _progress(step, cfg), float(cfg.curriculum_steps)
  s0, s1 = float(cfg.s0), float(cfg.s1)
  if cfg.curriculum == "ct":
    n = jnp.ceil(jnp.sqrt(k / K * ((s1 + 1) ** 2 - s0 ** 2) + s0 ** 2) - 1) + 1
  elif cfg.curriculum == "ict":
    k_prime = math.floor(K / (math.log2(math.floor(s1 / s0)) + 1))
    n = jnp.minimum(s0 * 2.0 ** jnp.floor(k / max(k_prime, 1)), s1) + 1
  else:
    raise ValueError(f"num_scales has no grid for curriculum {cfg.curriculum!r}")
  return n.astype(jnp.int32)


def max_scales(cfg) -> int:
  """The largest ``N`` the curriculum reaches (static: the size of the interval table)."""
  return int(cfg.num_scales) if cfg.curriculum == "fixed" else int(cfg.s1) + 1


def interval_logits(n: Array, cfg) -> tuple[Array, Array, Array]:
  """``(sigma_hi, sigma_lo, logits)`` of the ``max_scales - 1`` grid intervals
  ``(sigma_{i+1}, sigma_i)`` for grid size ``n``; intervals past ``n - 1`` get ``-inf``."""
  i = jnp.arange(max_scales(cfg) - 1, dtype=jnp.float32)
  denom = jnp.maximum(n - 1, 1).astype(jnp.float32)
  lo = karras(jnp.clip(i / denom, 0.0, 1.0), cfg.sigma_min, cfg.sigma_max, cfg.rho)
  hi = karras(jnp.clip((i + 1) / denom, 0.0, 1.0), cfg.sigma_min, cfg.sigma_max, cfg.rho)
  valid = i < n - 1
  if cfg.time_dist == "uniform":
    logits = jnp.zeros_like(i)
  elif cfg.time_dist == "lognormal":
    cdf = lambda s: jax.scipy.special.erf((jnp.log(s) - cfg.p_mean) / (math.sqrt(2) * cfg.p_std))
    logits = jnp.log(jnp.maximum(cdf(hi) - cdf(lo), 0.0))
  else:
    raise ValueError(f"time_dist must be 'uniform' or 'lognormal', got {cfg.time_dist!r}")
  return hi, lo, jnp.where(valid, logits, -jnp.inf)


def ect_sigmas(key: Array, n: int, step: Array | int, cfg) -> tuple[Array, Array, Array]:
  """ECT's ``(sigma_t, sigma_r, stage)``: lognormal ``sigma_t`` and the mapping function."""
  k = _progress(step, cfg)
  stage = jnp.clip(jnp.floor(k / (cfg.curriculum_steps / cfg.ect_stages)), 0, cfg.ect_stages - 1)
  sig_t = jnp.exp(cfg.p_mean + cfg.p_std * jax.random.normal(key, (n,)))
  adj = 1.0 + cfg.ect_k * jax.nn.sigmoid(-cfg.ect_b * sig_t)
  sig_r = jnp.maximum(sig_t * (1.0 - adj / cfg.ect_q ** (stage + 1)), 0.0)
  return sig_t, sig_r, stage


def sample_sigmas(key: Array, n: int, step: Array | int, cfg) -> tuple[Array, Array, dict]:
  """``(sigma_hi, sigma_lo)`` of shape ``(n,)``, ``sigma_lo < sigma_hi``, and what to log."""
  if cfg.curriculum not in CURRICULA:
    raise ValueError(f"curriculum must be one of {CURRICULA}, got {cfg.curriculum!r}")
  if cfg.curriculum == "ect":
    hi, lo, stage = ect_sigmas(key, n, step, cfg)
    return hi, lo, {"stage": stage}
  size = num_scales(step, cfg)
  hi, lo, logits = interval_logits(size, cfg)
  cdf = jnp.cumsum(jax.nn.softmax(logits))  # inverse-CDF draw: O(n log N), no (n, N) noise
  idx = jnp.searchsorted(cdf, jax.random.uniform(key, (n,)) * cdf[-1], side="right")
  idx = jnp.minimum(idx, size - 2)
  return hi[idx], lo[idx], {"num_scales": size}


# ----------------------------------------------------------------------------- metric, target


def distance(delta: Array, metric: str, c: float) -> Array:
  """Per-example ``d``: ``'l2'`` mean square, or pseudo-Huber ``sqrt(||delta||^2 + c'^2) - c'``
  with ``c' = c sqrt(D)`` (finite gradient at ``delta = 0`` even for ``c = 0``); ``(B,)``."""
  if metric == "l2":
    return _common.mean_sq(delta)
  if metric != "pseudo_huber":
    raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
  flat = delta.astype(jnp.float32).reshape(delta.shape[0], -1)
  c2 = (c * math.sqrt(flat.shape[-1])) ** 2
  q = jnp.sum(jnp.square(flat), -1) + c2
  return jnp.where(q > 0, jnp.sqrt(jnp.where(q > 0, q, 1.0)), 0.0) - math.sqrt(c2)


def weight(sigma_hi: Array, sigma_lo: Array, kind: str) -> Array:
  """``lambda``: 1, or ``1 / (sigma_hi - sigma_lo)`` (iCT, ECT)."""
  if kind == "uniform":
    return jnp.ones_like(sigma_hi)
  if kind == "inverse_gap":
    return 1.0 / (sigma_hi - sigma_lo)
  raise ValueError(f"weighting must be 'uniform' or 'inverse_gap', got {kind!r}")


def target_point(cfg, teacher, x0: Array, eps: Array, x_hi: Array, t_hi: Array, t_lo: Array,
                 path: paths.Path, cond: Array | None) -> Array:
  """``x^_{t_lo}``: one teacher ODE step from ``(x_hi, t_hi)`` (``target='teacher'``) or the
  point of the same ``(x_0, eps)`` at ``t_lo`` (``'conditional'``)."""
  if cfg.target == "conditional":
    return path.sample(x0, eps, t_lo)
  if cfg.target != "teacher":
    raise ValueError(f"target must be 'teacher' or 'conditional', got {cfg.target!r}")
  if teacher is None:
    raise ValueError("target='teacher' (consistency distillation) needs a teacher")
  v = lambda x, t: teacher(x, t, t, cond).astype(x.dtype)
  return sg(sampling.ode_step(v, sg(x_hi), t_hi, t_lo, cfg.solver))


# ----------------------------------------------------------------------------- loss


def consistency_loss(params, batch, key, *, net, teacher=None, ema_params=None, step=0,
                     cfg=None):
  """Discrete consistency loss (module docstring). ``batch['x'] (B, ...)``; ``ema_params`` is
  ``theta^-`` (``None``: ``stopgrad(params)``). Metrics: loss, the RMS consistency gap
  ``||f_theta - f^-||``, mean ``t_{n+1} - t_n``, ``N(k)`` or ECT's stage."""
  cfg = cfg or ict_defaults()
  path, param = _common.path_of(cfg), _common.param_of(cfg)
  x0 = batch["x"]
  b = x0.shape[0]
  kp, kn, kd = jax.random.split(key, 3)
  sig_hi, sig_lo, info = sample_sigmas(kp, b, step, cfg)
  t_hi, t_lo = t_of_sigma(path, sig_hi), t_of_sigma(path, sig_lo)
  eps = jax.random.normal(kn, x0.shape, x0.dtype)
  x_hi = path.sample(x0, eps, t_hi)
  cond = _common.drop_labels(kd, batch.get("cond"), cfg)
  x_lo = target_point(cfg, teacher, x0, eps, x_hi, t_hi, t_lo, path, cond)
  zero = jnp.zeros_like(t_hi)
  theta_minus = sg(params if ema_params is None else ema_params)
  f = param.apply(net, params, x_hi, t_hi, zero, cond).astype(jnp.float32)
  f_tgt = sg(param.apply(net, theta_minus, x_lo, t_lo, zero, cond)).astype(jnp.float32)
  f_tgt = jnp.where(bcast(sig_lo > 0, f_tgt), f_tgt, x_lo.astype(jnp.float32))  # f(x, 0) = x
  delta = f - f_tgt
  per = weight(sig_hi, sig_lo, cfg.weighting) * distance(delta, cfg.metric, cfg.huber_c)
  loss = jnp.mean(per)
  metrics = {"loss": loss, "gap_rms": jnp.sqrt(jnp.mean(_common.mean_sq(delta))),
             "dt": jnp.mean(t_hi - t_lo)}
  metrics.update({k: jnp.asarray(v, jnp.float32) for k, v in info.items()})
  return loss, metrics


objectives.register(objectives.Objective(
    name="cm_cd", loss=consistency_loss, defaults=cd_defaults, needs_teacher=True,
    consistency=True,
    doc="consistency distillation: adjacent grid times, one Heun teacher step, EMA target"))
objectives.register(objectives.Objective(
    name="cm_ct", loss=consistency_loss, defaults=ct_defaults, consistency=True,
    doc="consistency training: same-noise pairs, N(k) curriculum, EMA target"))
objectives.register(objectives.Objective(
    name="ict", loss=consistency_loss, defaults=ict_defaults, consistency=True,
    doc="improved CT: pseudo-Huber, doubling N(k), lognormal grid times, 1/dsigma, no EMA"))
objectives.register(objectives.Objective(
    name="ect", loss=consistency_loss, defaults=ect_defaults, needs_teacher=True,
    consistency=True,
    doc="easy consistency tuning: from the teacher, shrinking dt stages, ||.||/(t - r)"))
