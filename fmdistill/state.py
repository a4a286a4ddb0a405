"""The train state of every method, and how it is built.

``TrainState`` holds the student (``params``, its EMAs and optimiser state), the PRNG key, the
non-finite-skip counters, and one ``PartState`` per trainable part the method declares
(``fmdistill.objectives.Part``: critics, discriminators, learned weightings), each with its own
parameters, optimiser state, optional EMA and counters. The train loop, checkpoints, sharding
rules and ``fmdistill.runs.load_params`` see one pytree and treat every part alike; the
checkpoint paths are ``params/...``, ``ema/<name>/...``, ``parts/<part>/params/...``.

Nothing here reads or writes files: ``fmdistill.checkpoint`` stores states, ``fmdistill.runs``
reads finished runs, ``fmdistill.train`` runs the loop.
"""
from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import struct

from fmdistill import flowmap, models, objectives, paths
from fmdistill.errors import ConfigError

Array = jax.Array


class PartState(struct.PyTreeNode):
  """One trainable part: its parameters, optimiser state, EMA (``None`` when off), the number
  of updates attempted and the number skipped for a non-finite loss, gradient or result."""
  params: Any
  opt_state: Any
  ema: Any
  count: Array
  skipped: Array


class TrainState(struct.PyTreeNode):
  step: Array
  params: Any
  ema: dict
  opt_state: Any
  key: Array
  skipped: Array            # student updates skipped for a non-finite loss/gradient/result
  consecutive_skips: Array
  parts: dict               # {name: PartState}


# ------------------------------------------------------------------------------ optimisers, EMA


def make_schedule(t: ml_collections.ConfigDict, steps: int) -> optax.Schedule:
  """``t.schedule`` over ``steps`` updates: linear warmup over ``t.warmup_steps`` updates (none
  if 0: the first update uses ``t.lr``), then constant or cosine decay to ``t.lr * t.final_lr``."""
  if t.schedule not in ("constant", "cosine"):
    raise ConfigError(f"schedule must be 'constant' or 'cosine', got {t.schedule!r}")
  if t.schedule == "constant":
    main = optax.constant_schedule(t.lr)
  else:
    main = optax.cosine_decay_schedule(t.lr, max(steps - t.warmup_steps, 1), alpha=t.final_lr)
  if t.warmup_steps <= 0:
    return main
  return optax.join_schedules([optax.linear_schedule(0.0, t.lr, t.warmup_steps), main],
                              [t.warmup_steps])


def make_optimizer(t: ml_collections.ConfigDict, steps: int) -> optax.GradientTransformation:
  """AdamW with optional global-norm clipping, for the optimiser section ``t``."""
  chain = [optax.clip_by_global_norm(t.grad_clip)] if t.grad_clip > 0 else []
  chain.append(optax.adamw(make_schedule(t, steps), b1=t.b1, b2=t.b2,
                           weight_decay=t.weight_decay))
  return optax.chain(*chain)


def student_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  return make_optimizer(config.train, config.train.steps)


def part_optimizer(config: ml_collections.ConfigDict, name: str
                   ) -> optax.GradientTransformation:
  """The optimiser of part ``name``; its cosine schedule spans the part's own update count."""
  return make_optimizer(config.parts[name], max(1, part_updates(config, name)))


def part_due(p: ml_collections.ConfigDict, k):
  """Whether a part with schedule ``p`` (``config.parts.<name>``) runs at student step ``k``
  (0-based; a Python int or a traced integer): ``k % every == 0`` and ``k >= start``."""
  return (k % p.every == 0) & (k >= p.start)


def part_updates(config: ml_collections.ConfigDict, name: str) -> int:
  """How many updates part ``name`` makes in a run: ``updates`` at every student step ``k`` of
  ``[0, train.steps)`` with ``k % every == 0`` and ``k >= start`` (``step``'s schedule)."""
  p = config.parts[name]
  first = -(-p.start // p.every) * p.every  # the first multiple of ``every`` >= ``start``
  return len(range(first, config.train.steps, p.every)) * p.updates


def ema_names(t: ml_collections.ConfigDict) -> list[str]:
  return [f"ema_{d:g}" for d in t.ema_decays] + [f"power_{g:g}" for g in t.ema_power]


def update_ema(ema: dict, params: Any, step: Array, t: ml_collections.ConfigDict,
               plain: tuple[str, ...] = ()) -> dict:
  """Plain EMA ``p <- b p + (1 - b) theta``; EDM2 power EMA with ``beta_n = (1 - 1/n)^(g+1)``
  after ``n`` updates (``optax.incremental_update`` with step size ``1 - beta``).

  The plain EMAs ramp up as in EDM (Karras et al. 2022, training option
  ``ema_rampup_ratio=0.05``): after ``n`` updates the half-life of EMA ``d``, ``ln 0.5 / ln d``
  steps, is capped at ``t.ema_rampup * n`` steps, so the average never keeps a noticeable share
  of the initial weights (with a plain 0.999 EMA a 2000-step run keeps 0.999^2000 = 13.5% of
  them: the initial teacher weights of a teacher-initialised student, whose one-jump map is the
  teacher's Euler step). ``t.ema_rampup = 0`` gives the plain EMA; the EMAs named in ``plain``
  (a consistency target ``theta^-``, which the papers define as the plain EMA) never ramp."""
  n = (step + 1).astype(jnp.float32)
  rampup = t.get("ema_rampup", 0.0)
  out = {}
  for d in t.ema_decays:
    name = f"ema_{d:g}"
    beta = jnp.float32(d)
    if rampup > 0 and name not in plain:
      half_life = jnp.minimum(math.log(0.5) / math.log(d), rampup * n)
      beta = jnp.minimum(beta, 0.5 ** (1.0 / half_life))
    out[name] = optax.incremental_update(params, ema[name], 1.0 - beta)
  for g in t.ema_power:
    beta = (1.0 - 1.0 / n) ** (g + 1.0)
    out[f"power_{g:g}"] = optax.incremental_update(params, ema[f"power_{g:g}"], 1.0 - beta)
  return out


def copy(tree: Any) -> Any:
  """Fresh buffers (the step donates its state, so no two leaves may share one)."""
  return jax.tree_util.tree_map(jnp.array, tree)


# ------------------------------------------------------------------------------ networks


def function_key(param: str, path: str, sigma_d: float) -> tuple[str, str, float]:
  """What a network's output means: its parameterisation, path and (where either uses it)
  the data scale ``sigma_d``."""
  uses_sigma = param != "displacement" or path == "trigflow"
  return (param, path, float(sigma_d) if uses_sigma else 1.0)


def native_key(config: ml_collections.ConfigDict) -> tuple[str, str, float]:
  """The ``function_key`` the network's weights are trained for: the objective's own, or
  ``model.native_*`` when the student keeps a teacher's (see ``build_network``)."""
  o, m = config.objective, config.model
  if m.get("native_param", ""):
    return function_key(m.native_param, m.native_path, m.native_sigma_d)
  return function_key(o.param, o.path, o.sigma_d)


def build_network(config: ml_collections.ConfigDict, shape: tuple, num_classes: int,
                  key: Array) -> tuple[Any, dict]:
  """``(net, params)`` for ``config``: ``models.build``, presented in the objective's
  parameterisation and path when the weights are trained for another (``model.native_*``,
  set when a student on TrigFlow starts from a linear-path teacher):
  ``flowmap.Reparameterized``."""
  net, params = models.build(config.model, shape, num_classes, key)
  o = config.objective
  src, dst = native_key(config), function_key(o.param, o.path, o.sigma_d)
  if src != dst:
    net = flowmap.Reparameterized(
        net, flowmap.Parameterization(src[0], src[2]), paths.get_path(src[1], src[2]),
        flowmap.Parameterization(dst[0], dst[2]), paths.get_path(dst[1], dst[2]))
  return net, params


# ------------------------------------------------------------------------------ states

STUDENT_ONLY = ("guidance",)  # subtrees a student may add to its teacher's network


def from_teacher(params: dict, teacher_params: dict) -> dict:
  """The student's initial parameters: a copy of the teacher's, plus the student's own fresh
  ``STUDENT_ONLY`` subtrees (a guidance-scale embedding, zero at initialisation, so the student
  still starts as the teacher). ``ConfigError`` if anything else does not fit."""
  extra = {k: v for k, v in params.items() if k in STUDENT_ONLY and k not in teacher_params}
  rest = {k: v for k, v in params.items() if k not in extra}
  if jax.tree_util.tree_map(jnp.shape, teacher_params) != jax.tree_util.tree_map(jnp.shape, rest):
    raise ConfigError("config.teacher.init_student=True but the teacher's parameters do not "
                      "fit the student network; set config.teacher.init_student=False")
  return {**copy(teacher_params), **copy(extra)}



def init_parts(config: ml_collections.ConfigDict, ctx: objectives.PartContext, key: Array
               ) -> dict[str, PartState]:
  """A fresh ``PartState`` for every part the method enables."""
  out = {}
  entry = objectives.entry(config.method)
  for i, (name, part) in enumerate(sorted(entry.parts_for(config.objective).items())):
    if part.init == "teacher":
      if ctx.teacher_params is None:
        raise ConfigError(f"{config.method}: part {name!r} starts from the teacher; set "
                          "config.teacher.workdir")
      p = copy(ctx.teacher_params)
    elif part.init == "student":
      p = copy(ctx.params)
    else:
      p = part.init(jax.random.fold_in(key, i), ctx)
    decay = config.parts[name].ema_decay
    out[name] = PartState(params=p, opt_state=part_optimizer(config, name).init(p),
                          ema=copy(p) if decay > 0 else None,
                          count=jnp.zeros((), jnp.int32), skipped=jnp.zeros((), jnp.int32))
  return out


def init_state(config: ml_collections.ConfigDict, params: Any, parts: dict[str, PartState],
               key: Array) -> TrainState:
  """The state at step 0 for student ``params`` and the method's ``parts``."""
  return TrainState(
      step=jnp.zeros((), jnp.int32), params=params,
      ema={n: copy(params) for n in ema_names(config.train)},
      opt_state=student_optimizer(config).init(params), key=key,
      skipped=jnp.zeros((), jnp.int32), consecutive_skips=jnp.zeros((), jnp.int32),
      parts=parts)
