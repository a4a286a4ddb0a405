"""Helpers shared by the objective families (no losses are registered here)."""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from fmdistill import errors, flowmap, paths
from fmdistill.errors import ConfigError

Array = jax.Array


def base_config(**overrides) -> ml_collections.ConfigDict:
  """Fields every method has: the probability path, the flow-map parameterisation, the time
  sampler, and ``num_classes`` (set by the train loop from the data; 0 = unconditional)."""
  cfg = ml_collections.ConfigDict(dict(
      path="linear", sigma_d=1.0, param="displacement",
      time_sampler="uniform", time_mean=0.0, time_std=1.0,
      label_dropout=0.0, num_classes=0, target_ema=""))
  cfg.update(overrides)
  return cfg


def path_of(cfg) -> paths.Path:
  return paths.get_path(cfg.path, cfg.sigma_d)


def param_of(cfg) -> flowmap.Parameterization:
  return flowmap.Parameterization(cfg.param, cfg.sigma_d)


def sample_t(key: Array, n: int, cfg, path: paths.Path) -> Array:
  """``t (n,)`` in ``[0, T]`` from the config's ``time_sampler`` (``paths.sample_time``)."""
  return paths.sample_time(key, n, path, cfg.time_sampler, mean=cfg.time_mean,
                           std=cfg.time_std)


def sample_pairs(key: Array, n: int, cfg, path: paths.Path) -> tuple[Array, Array]:
  """``(t, s)``, ``s <= t``, with ``s = t`` for a fraction ``cfg.equal_ratio``
  (``paths.sample_pairs``)."""
  return paths.sample_pairs(key, n, path, cfg.time_sampler, equal_ratio=cfg.equal_ratio,
                            mean=cfg.time_mean, std=cfg.time_std)


def noisy(key: Array, x0: Array, t: Array, path: paths.Path) -> tuple[Array, Array, Array]:
  """``(x_t, eps, conditional velocity)`` for data ``x0`` at times ``t``."""
  eps = jax.random.normal(key, x0.shape, x0.dtype)
  return path.sample(x0, eps, t), eps, path.velocity(x0, eps, t)


def noised_pairs(batch: dict, key: Array, cfg) -> tuple[Array, Array, Array, Array, Any]:
  """The flow-map methods' common draw: ``(t, s, x_t, v_cond, cond)`` — times ``s <= t``
  (``sample_pairs``), data ``batch['x']`` noised to ``x_t`` with its conditional velocity
  ``v_cond`` (``noisy``), labels after dropout (``drop_labels``); shapes ``(B,)`` and ``(B, ...)``."""
  path = path_of(cfg)
  x0 = batch["x"]
  kt, kn, kd = jax.random.split(key, 3)
  t, s = sample_pairs(kt, x0.shape[0], cfg, path)
  x_t, _, v_cond = noisy(kn, x0, t, path)
  return t, s, x_t, v_cond, drop_labels(kd, batch.get("cond"), cfg)


def drop_labels(key: Array, cond: Array | None, cfg) -> Any:
  """Replace labels by the null label ``cfg.num_classes`` with probability ``label_dropout``;
  then, with ``guidance_input``, attach a guidance scale per example (``guidance_cond``)."""
  if cond is None:
    return cond
  if cfg.label_dropout <= 0:
    return guidance_cond(jax.random.fold_in(key, 1), cond, cfg)
  drop = jax.random.uniform(key, cond.shape) < cfg.label_dropout
  return guidance_cond(jax.random.fold_in(key, 1), jnp.where(drop, cfg.num_classes, cond), cfg)


def mean_sq(x: Array) -> Array:
  """Per-example mean square over all non-batch axes, in float32: ``(B, ...) -> (B,)``."""
  x = x.astype(jnp.float32)
  return jnp.mean(jnp.square(x).reshape(x.shape[0], -1), axis=-1)


# ----------------------------------------------------------------------------- tangent family

def target_velocity(cfg, teacher, x: Array, t: Array, v_cond: Array,
                    cond: Array | None = None) -> Array:
  """The ODE velocity a tangent follows: ``cfg.velocity = 'conditional'`` (``v(x_t | x_0)``,
  training from scratch) or ``'teacher'`` (the frozen teacher's velocity, guided as bound by the
  train loop), always under ``stop_gradient``."""
  if cfg.velocity == "conditional":
    return jax.lax.stop_gradient(v_cond)
  if cfg.velocity == "teacher":
    if teacher is None:
      raise ValueError("velocity='teacher' needs a teacher (set teacher.workdir)")
    return jax.lax.stop_gradient(teacher(x, t, t, cond)).astype(x.dtype)
  raise ValueError(f"velocity must be 'conditional' or 'teacher', got {cfg.velocity!r}")


def require(cfg, *, param: str | None = None, path: str | None = None, method: str = "") -> None:
  """Raise a one-line error if the config's parameterisation or path is not the method's."""
  if param is not None and cfg.param != param:
    raise ValueError(f"{method} is written for param={param!r}, got {cfg.param!r}")
  if path is not None and cfg.path != path:
    raise ValueError(f"{method} is written for path={path!r}, got {cfg.path!r}")


def _int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def _at_least(low: float, integer: bool = False):
  return lambda v, o: (_int(v) if integer else True) and v >= low


# Objective fields that mean the same in every method that has them: ``name -> (ok(value,
# objective), accepted)``; ``config.validate`` applies them (any ``*_weight`` number: >= 0).
FIELD_RULES = {
    "num_classes": (_at_least(0, True), "an integer >= 0 (0: unconditional)"),
    **{k: (_at_least(0), ">= 0") for k in (
        "time_std", "p_std", "s_std", "gap_std", "huber_c", "adaptive_c", "tangent_c", "norm_c",
        "time_fd", "t_min", "adaptive_p", "norm_p", "relax_p")},
    **{k: (_at_least(0, True), "an integer >= 0") for k in (
        "tangent_warmup", "dmd_start", "curriculum_steps")},
    **{k: (_at_least(1, True), "an integer >= 1") for k in (
        "pair_steps", "max_solver_steps", "weight_freqs", "ect_stages", "group_size", "s0")},
    "s1": (lambda v, o: _int(v) and v >= o.get("s0", 1), "an integer >= s0"),
    "equal_ratio": (lambda v, o: 0 <= v <= 1, "a fraction in [0, 1]"),
    "order": (lambda v, o: v in (1, 2), [1, 2]),
    "num_scales": (_at_least(2, True), "an integer >= 2"),
    "sigma_min": (lambda v, o: v > 0, "> 0"),
    "sigma_max": (lambda v, o: v > o.get("sigma_min", 0), "> sigma_min"),
    "rho": (lambda v, o: v > 0, "> 0"),
    "kernel_scale": (lambda v, o: v > 0, "> 0"),
    "t_max": (lambda v, o: v > o.get("t_min", 0), "> t_min"),
}


def first_invalid(o, checks) -> ConfigError | None:
  """``errors.invalid`` (``config.objective.<field>=<value> is invalid; accepted: ...``) for
  the first ``(field, ok, accepted)`` of ``checks`` that is not ``ok`` (``o`` the objective
  config), else ``None``."""
  for field, ok, accepted in checks:
    if not ok:
      return errors.invalid(f"objective.{field}", o[field], accepted)
  return None


def field_problem(o) -> ConfigError | None:
  """``first_invalid`` of the objective config ``o`` under ``FIELD_RULES``."""
  checks = []
  for name, v in o.items():
    rule = FIELD_RULES.get(name)
    if rule is None and name.endswith("_weight") and isinstance(v, (int, float)) \
       and not isinstance(v, bool):
      rule = (_at_least(0), ">= 0")
    if rule is not None:
      checks.append((name, rule[0](v, o), rule[1]))
  return first_invalid(o, checks)


def check_fields(config, checks) -> None:
  """A registry ``check``'s body: ``ConfigError`` naming the first ``(field, ok, accepted)`` of
  ``checks`` that is not ``ok`` as ``config.objective.<field>`` with its value."""
  bad = first_invalid(config.objective, checks)
  if bad:
    raise bad


# ----------------------------------------------------------------------------- guidance input


def guidance_fields(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Classifier-free-guidance distillation with the scale as a student input: with
  ``guidance_input`` every example draws ``w`` in ``guidance_range`` (uniform, or the power law
  ``guidance_power``: ``guidance_scale``) and both the student
  (``model.guidance_embed=True``) and the teacher (guided per example) see it in ``cond``
  (``guidance_cond``); otherwise the teacher's fixed ``config.teacher.guidance`` is baked in."""
  cfg.guidance_input = False
  cfg.guidance_range = (1.0, 4.0)
  cfg.guidance_power = 0.0  # 0: w ~ U[range]; b > 0: a power law (``guidance_scale``)
  return cfg


def guidance_scale(key: Array, shape: tuple, bounds: tuple, power: float = 0.0) -> Array:
  """Guidance scales in ``bounds = (lo, hi)``: uniform (``power = 0``), or improved MeanFlow's
  power law (official code ``sample_cfg_scale``, ``cfg_beta = power``; its ``s_max = hi - 1``
  with ``lo = 1``): ``w = (1 + u (hi^(1-b) - 1))^(1/(1-b))``, ``u ~ U[0, 1]``, which is
  ``w = hi^u`` (log-uniform) at ``b = 1``; density proportional to ``w^-b`` on ``[1, hi]``."""
  lo, hi = bounds
  u = jax.random.uniform(key, shape)
  if power <= 0.0:
    return lo + (hi - lo) * u
  if power == 1.0:
    w = jnp.exp(u * jnp.log(hi / lo))
  else:
    r = (hi / lo) ** (1.0 - power)
    w = (1.0 + u * (r - 1.0)) ** (1.0 / (1.0 - power))
  return lo * w


def guidance_cond(key: Array, cond: Array | None, cfg) -> Any:
  """``{'label': cond, 'w': (B,)}`` with ``w ~ guidance_scale(guidance_range,
  guidance_power)`` when ``cfg.guidance_input`` and there are labels (``flowmap.split_cond``);
  ``cond`` unchanged otherwise. Examples whose label is the null label (dropped for CFG
  training) get ``w = 1``."""
  if cond is None or not cfg.get("guidance_input", False):
    return cond
  w = guidance_scale(key, cond.shape, tuple(cfg.guidance_range), cfg.get("guidance_power", 0.0))
  w = jnp.where(cond == cfg.num_classes, 1.0, w)
  return {"label": cond, "w": w}
