"""Frozen teachers: loading a finished run, binding it for a student, and the cache of teacher
ODE trajectories used by direct distillation and ReFlow."""
from __future__ import annotations

import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import struct

from fmdistill import data, flowmap, models, objectives, paths, runs, sampling
from fmdistill import state as state_lib
from fmdistill.data import pairs
from fmdistill.errors import ConfigError


class Teacher(struct.PyTreeNode):
  """A frozen teacher: network, its parameterisation and path, its weights and its config."""
  net: Any = struct.field(pytree_node=False)
  param: flowmap.Parameterization = struct.field(pytree_node=False)
  path: paths.Path = struct.field(pytree_node=False)
  params: Any = None
  model: tuple = struct.field(pytree_node=False, default=())  # ((field, value), ...)
  native: tuple = struct.field(pytree_node=False, default=())  # what its weights are trained
  # for: (param name, path name, sigma_d)
  kind: str = struct.field(pytree_node=False, default="velocity")  # kind_of(its method)
  source: str = struct.field(pytree_node=False, default="")  # its workdir and method


def kind_of(method: str) -> str:
  """What a finished run of ``method`` offers a student: ``'velocity'`` (an ODE model, e.g.
  flow matching or a ReFlow round), ``'flowmap'`` (a few-step map ``f(x, t, s)``, e.g. a
  progressive-distillation stage) or ``'consistency'`` (a map to ``s = 0`` only)."""
  entry = objectives.entry(method)
  if entry.sampler == "ode":
    return "velocity"
  return "consistency" if entry.consistency else "flowmap"


def load(config: ml_collections.ConfigDict) -> Teacher | None:
  """The teacher named by ``config.teacher.workdir`` (``None`` if empty)."""
  if not config.teacher.workdir:
    return None
  tconfig, net, params = runs.load_params(config.teacher.workdir, config.teacher.which)
  o = tconfig.objective
  if tuple(tconfig.data_shape) != tuple(config.data_shape):
    raise ConfigError(f"config.teacher.workdir={config.teacher.workdir!r} was trained on data "
                      f"of shape {tuple(tconfig.data_shape)}, this run's data has shape "
                      f"{tuple(config.data_shape)}")
  return Teacher(net, flowmap.Parameterization(o.param, o.sigma_d),
                 paths.get_path(o.path, o.sigma_d), params,
                 tuple((k, tconfig.model.get(k, _LEGACY.get(k))) for k in models.FUNCTION_FIELDS),
                 _native(tconfig), kind_of(tconfig.method),
                 f"{config.teacher.workdir!r} ({tconfig.method})")


def check_kind(config: ml_collections.ConfigDict, teacher: Teacher) -> None:
  """Refuse a teacher run the method cannot use (one line naming it): a flow-map student as
  the teacher of a method that needs a velocity, a consistency model where jumps are needed, a
  flow-map teacher on another path (maps are not converted between paths) or with guidance."""
  entry = objectives.entry(config.method)
  if teacher.kind not in entry.teacher_kinds:
    raise ConfigError(
        f"config.teacher.workdir={teacher.source} is a {teacher.kind} model; method "
        f"{config.method!r} needs a teacher of kind {' or '.join(entry.teacher_kinds)} (a "
        "flow-matching run or ReFlow round is a velocity model; a distilled few-step student "
        "is a flow map)")
  if teacher.kind != "velocity":
    o = config.objective
    dst = paths.get_path(o.path, o.sigma_d)
    if (teacher.path.name, teacher.path.sigma_d) != (dst.name, dst.sigma_d):
      raise ConfigError(f"config.objective.path={o.path!r} differs from the path of the "
                        f"flow-map teacher {teacher.source} ({teacher.path.name!r}); flow-map "
                        "teachers are not converted between paths")
    if config.teacher.guidance != 1.0:
      raise ConfigError(f"config.teacher.guidance={config.teacher.guidance} applies to velocity "
                        f"teachers; the flow-map teacher {teacher.source} already carries the "
                        "guidance it was distilled with (use 1.0)")


def _native(tconfig) -> tuple:
  return state_lib.native_key(tconfig)


# model fields of configs written before they existed (the legacy time embedding)
_LEGACY = {"time_embedding": "legacy", "time_scale": 1000.0, "qk_norm": False}


def init_mismatches(config: ml_collections.ConfigDict, teacher: Teacher) -> list[str]:
  """``'field: student vs teacher'`` for every model field that makes a student unable to
  start from ``teacher``'s weights (``models.FUNCTION_FIELDS``)."""
  mine = {k: config.model.get(k, _LEGACY.get(k)) for k in models.FUNCTION_FIELDS}
  return [f"model.{k}={mine[k]!r} (teacher: {v!r})" for k, v in teacher.model
          if mine[k] != v]


def bind(teacher: Teacher | None, params: Any, config) -> Callable | None:
  """``teacher(x, t, s, cond)``: the guided teacher velocity on the student's path; for a
  flow-map teacher (``kind != 'velocity'``), a ``flowmap.FlowMapTeacher`` (``.jump``)."""
  if teacher is None:
    return None
  if teacher.kind != "velocity":
    return flowmap.flowmap_teacher(teacher.net, params, teacher.param, teacher.source)
  o = config.objective
  return flowmap.teacher_network(
      teacher.net, params, teacher.param, teacher.path, paths.get_path(o.path, o.sigma_d),
      guidance=config.teacher.guidance, null_label=o.num_classes or None)


def velocity_fn(teacher: Teacher, config) -> Callable:
  """``v(params, x, t, cond)``: a network of the teacher's architecture, parameterisation and
  path, as a velocity on the student's path, differentiable in ``params`` (for critics that
  start from the teacher, such as DMD's fake score). No guidance."""
  o = config.objective
  dst = paths.get_path(o.path, o.sigma_d)

  def v(params, x, t, cond=None):
    base = lambda x_, t_: teacher.param.velocity(teacher.net, params, x_, t_, cond)
    if teacher.path.name != dst.name or teacher.path.sigma_d != dst.sigma_d:
      base = paths.convert_velocity(base, teacher.path, dst)
    return base(x, t)
  return v


def pair_source(config, teacher: Teacher, workdir: str, progress: bool = True
                ) -> data.ArraySource:
  """Build (or resume) the teacher-trajectory cache and expose it as a data source.

  Each example is a teacher ODE trajectory from noise at ``t = T`` sampled on the uniform grid
  of ``objective.pair_steps`` steps, integrated with ``teacher.pair_solver`` at
  ``teacher.pair_nfe`` evaluations in all. Batches: ``{'traj': (B, K + 1, ...), 'x': the
  endpoint (B, ...), 'cond': labels}``.
  """
  o, tc = config.objective, config.teacher
  shape, num_classes = tuple(config.data_shape), o.num_classes
  path = paths.get_path(o.path, o.sigma_d)
  k = o.pair_steps
  grid = np.asarray(sampling.time_grid(k, path.T))
  sub = sampling.solver_steps_for_nfe(tc.pair_nfe, tc.pair_solver)
  if sub % k:
    raise ConfigError(f"config.teacher.pair_nfe={tc.pair_nfe} with {tc.pair_solver} gives {sub} "
                      f"steps, not a multiple of objective.pair_steps={k}")

  @jax.jit
  def trajectories(key, tparams):
    kx, kc = jax.random.split(key)
    x = path.sigma(jnp.float32(path.T)) * jax.random.normal(kx, (tc.pair_chunk,) + shape)
    cond = jax.random.randint(kc, (tc.pair_chunk,), 0, num_classes) if num_classes else None
    bound = bind(teacher, tparams, config)
    v = lambda x_, t_: bound(x_, t_, t_, cond)
    states = [x]
    for a, b in zip(grid[:-1], grid[1:]):
      x = sampling.solve_ode(v, x, jnp.linspace(a, b, sub // k + 1), tc.pair_solver)
      states.append(x)
    out = {"traj": jnp.stack(states, 1)}
    if cond is not None:
      out["cond"] = cond
    return out

  gen = lambda c, n: trajectories(jax.random.fold_in(jax.random.PRNGKey(config.seed + 1), c),
                                  teacher.params)
  meta = dict(teacher=os.path.abspath(tc.workdir), which=tc.which, guidance=tc.guidance,
              solver=tc.pair_solver, nfe=tc.pair_nfe, pair_steps=k, path=o.path,
              seed=config.seed)
  directory = tc.pair_cache or os.path.join(workdir, "pairs")
  arrays = pairs.build_cache(directory, gen, tc.pair_num, tc.pair_chunk, meta, progress,
                             jax.process_index(), jax.process_count())

  def get(idx):
    out = {"traj": arrays["traj"][idx], "x": arrays["traj"][idx, -1]}
    if "cond" in arrays:
      out["cond"] = arrays["cond"][idx]
    return out
  return data.ArraySource(get, len(arrays["traj"]), config.seed, shape, num_classes)
