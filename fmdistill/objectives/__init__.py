"""Objective registry: config name -> pure loss.

Every loss has the signature (DESIGN.md)::

    loss(params, batch, key, *, net, teacher, ema_params, step, cfg) -> (scalar, metrics)

* ``net(params, x, t, s, cond)``: the raw student network (the flow map is
  ``cfg.param``'s ``c_skip x + c_out F``, see ``fmdistill.flowmap``).
* ``teacher(x, t, s, cond)``: the frozen teacher network with its params (and guidance) bound,
  or ``None``; its velocity is ``teacher_velocity(teacher, x, t, cond)``.
* ``ema_params``: the target parameters ``theta^-`` chosen by the method's config.
* ``cfg``: the method's own ``ConfigDict`` (``default_config(name)`` gives its defaults).

Each family module in this package calls ``register`` at import; every module here is imported
by ``_load_all``, so adding a method touches one file (and one experiment config entry).
"""
from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from typing import Any, Callable

import ml_collections

Loss = Callable[..., tuple[Any, dict]]


@dataclasses.dataclass(frozen=True)
class Critic:
  """An auxiliary network trained alternately with the student (DMD's fake score, ...).

  It has the teacher's architecture and starts from the teacher's weights. Its loss is
  ``loss(critic_params, student_params, batch, key, *, net, critic, teacher, step, cfg)`` with
  ``critic(params, x, t, cond)`` its velocity on the student's path; it is updated ``updates``
  times every ``every`` student steps, before the student update. The student loss receives
  ``critic(x, t, cond)``: the current critic's velocity, frozen.
  """
  loss: Loss
  every: int = 1
  updates: int = 1


@dataclasses.dataclass(frozen=True)
class Objective:
  name: str
  loss: Loss
  defaults: Callable[[], ml_collections.ConfigDict]
  needs_teacher: bool = False
  batch: str = "data"          # 'data' or 'teacher_pairs' (a cache of teacher ODE trajectories)
  critic: Critic | None = None
  sampler: str = "flowmap"     # how the trained net samples: 'flowmap' jumps or 'ode' (velocity)
  doc: str = ""
  # objective-owned parameters (e.g. sCM's learned loss weighting): ``aux_init(key, cfg)``; the
  # train loop stores them under ``params[_common.AUX_KEY]`` (see ``_common.split_aux``)
  aux_init: Callable[[Any, ml_collections.ConfigDict], Any] | None = None


_REGISTRY: dict[str, Objective] = {}
_LOADED = False


def register(obj: Objective) -> Objective:
  if obj.name in _REGISTRY:
    raise ValueError(f"objective {obj.name!r} is registered twice")
  _REGISTRY[obj.name] = obj
  return obj


def _load_all() -> None:
  global _LOADED
  if not _LOADED:
    _LOADED = True
    for mod in pkgutil.iter_modules(__path__):
      if not mod.name.startswith("_"):
        importlib.import_module(f"{__name__}.{mod.name}")


def names() -> list[str]:
  _load_all()
  return sorted(_REGISTRY)


def entry(name: str) -> Objective:
  _load_all()
  if name not in _REGISTRY:
    raise ValueError(f"unknown method {name!r}; known methods: {sorted(_REGISTRY)}")
  return _REGISTRY[name]


def get(name: str) -> Loss:
  """The loss function registered as ``name``."""
  return entry(name).loss


def default_config(name: str) -> ml_collections.ConfigDict:
  """The method's own config fields with their defaults (a fresh copy)."""
  return entry(name).defaults()
