"""Frozen teachers: loading a finished run, binding it for a student, and the cache of teacher
ODE trajectories used by direct distillation and ReFlow.

A teacher must be a velocity model (a run of a method that samples by an ODE solver) and a
finished run (its newest good checkpoint reached its ``train.steps``; an unfinished one only
with ``teacher.allow_unfinished=True``). A student records the teacher's identity at its first
start (``teacher.json``: the run, the checkpoint step, which weights, the sha256 of their
contents); a restarted student reads the teacher at that same step and refuses to resume if the
weights differ. The teacher-pair cache is keyed by that identity too.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import struct

from fmdistill import data, flowmap, models, objectives, paths, runs, sampling
from fmdistill import state as state_lib, workdir as workdir_lib
from fmdistill.data import pairs
from fmdistill.errors import ConfigError, TeacherError


class Teacher(struct.PyTreeNode):
  """A frozen teacher: network, its parameterisation and path, its weights and its config."""
  net: Any = struct.field(pytree_node=False)
  param: flowmap.Parameterization = struct.field(pytree_node=False)
  path: paths.Path = struct.field(pytree_node=False)
  params: Any = None
  model: tuple = struct.field(pytree_node=False, default=())  # ((field, value), ...)
  native: tuple = struct.field(pytree_node=False, default=())  # what its weights are trained
  # for: (param name, path name, sigma_d)
  identity: tuple = struct.field(pytree_node=False, default=())  # sorted (key, value) pairs:
  # workdir, step, which, method, params_sha256
  kind: str = struct.field(pytree_node=False, default="velocity")  # kind_of(its method)
  source: str = struct.field(pytree_node=False, default="")  # its workdir and method

  @property
  def ident(self) -> dict:
    return dict(self.identity)


def kind_of(method: str) -> str:
  """What a finished run of ``method`` offers a student: ``'velocity'`` (an ODE model, e.g.
  flow matching or a ReFlow round), ``'flowmap'`` (a few-step map ``f(x, t, s)``, e.g. a
  progressive-distillation stage) or ``'consistency'`` (a map to ``s = 0`` only)."""
  entry = objectives.entry(method)
  if entry.sampler == "ode":
    return "velocity"
  return "consistency" if entry.consistency else "flowmap"


def velocity_methods() -> list[str]:
  return [n for n in objectives.names() if objectives.entry(n).sampler == "ode"]


def _pinned(config: ml_collections.ConfigDict, student_workdir: str | None) -> dict | None:
  """The identity a student in ``student_workdir`` recorded at its start, if that workdir
  holds this experiment."""
  if not student_workdir or not workdir_lib.same_experiment(student_workdir, config):
    return None
  return workdir_lib.read_teacher(student_workdir)


def load(config: ml_collections.ConfigDict, student_workdir: str | None = None
         ) -> Teacher | None:
  """The teacher named by ``config.teacher.workdir`` (``None`` if empty), checked: a velocity
  model, finished (or ``teacher.allow_unfinished``), and, for a student resuming in
  ``student_workdir``, the same weights it started from (read at the step it recorded, which
  passed these checks when the student started)."""
  tc = config.teacher
  if not tc.workdir:
    return None
  try:
    tconfig = runs.read_config(tc.workdir)
  except FileNotFoundError as e:  # say whose run is missing: a student sampled later, too
    raise TeacherError(f"config.teacher.workdir: {e}") from None
  kind, kinds = kind_of(tconfig.method), objectives.entry(config.method).teacher_kinds
  if kind not in kinds:
    raise TeacherError(
        f"config.teacher.workdir={tc.workdir!r} is a {tconfig.method!r} run, a {kind} model; "
        f"method {config.method!r} needs a teacher of kind {' or '.join(kinds)} (velocity "
        f"models: runs of {velocity_methods()}; flow maps: distilled few-step students)")
  pin = _pinned(config, student_workdir)
  run = runs.load_run(tc.workdir, tc.which, step=None if pin is None else _pin_step(pin, tc))
  if pin is None and not run.finished and not tc.get("allow_unfinished", False):
    raise TeacherError(
        f"teacher run {tc.workdir!r} is unfinished (checkpoint step {run.step} of {run.steps}); "
        "let it finish, or set config.teacher.allow_unfinished=True to distil it as it is")
  ident = dict(workdir=os.path.abspath(tc.workdir), step=run.step, which=tc.which,
               method=tconfig.method, params_sha256=runs.digest(run.params))
  if pin is not None:
    diff = [f"{k}: {pin.get(k)!r} -> {ident[k]!r}" for k in ("step", "which", "params_sha256")
            if pin.get(k) != ident[k]]
    if diff:
      raise TeacherError(
          f"the teacher in {tc.workdir!r} is not the one this student started from "
          f"({'; '.join(diff)}); restore that teacher run, or start the student in a new "
          "--workdir")
  if kind != "velocity":  # a flow-map teacher is used as the map it samples
    run = sampling_run(run)
  tconfig, net, params = run.config, run.net, run.params
  o = tconfig.objective
  if tuple(tconfig.data_shape) != tuple(config.data_shape):
    raise ConfigError(f"config.teacher.workdir={config.teacher.workdir!r} was trained on data "
                      f"of shape {tuple(tconfig.data_shape)}, this run's data has shape "
                      f"{tuple(config.data_shape)}")
  return Teacher(net, flowmap.Parameterization(o.param, o.sigma_d),
                 paths.get_path(o.path, o.sigma_d), params,
                 tuple((k, tconfig.model.get(k, _LEGACY.get(k))) for k in models.FUNCTION_FIELDS),
                 _native(tconfig), tuple(sorted(ident.items())), kind,
                 f"{config.teacher.workdir!r} ({tconfig.method})")


def _pin_step(pin: dict, tc) -> int:
  step = int(pin["step"])
  if not os.path.isdir(os.path.join(tc.workdir, "checkpoints", str(step))):
    raise TeacherError(
        f"this student started from step {step} of teacher run {tc.workdir!r}, which no longer "
        "has that checkpoint; restore it, or start the student in a new --workdir")
  return step


def check_kind(config: ml_collections.ConfigDict, teacher: Teacher) -> None:
  """Refuse a flow-map teacher the method cannot use (one line naming it): one on another
  path (maps are not converted between paths) or with guidance. (A teacher of a kind the
  method cannot use at all is refused by ``load``.)"""
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
_LEGACY = models.LEGACY


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
      guidance=config.teacher.guidance, null_label=o.num_classes or None,
      interval=tuple(config.teacher.get("guidance_interval", ())))


def unbound(teacher: Teacher, config) -> tuple[Callable, Any]:
  """``(fn(params, x, t, s, cond), teacher.params)``: ``bind`` with the weights left as an
  argument (``objectives.sampling_network``'s teacher); ``fn`` holds no weights."""
  bare = dataclasses.replace(teacher, params=None)
  return (lambda params, *args: bind(bare, params, config)(*args)), teacher.params


def sampling_run(run: runs.Run) -> runs.Run:
  """``run`` with the network the sampler evaluates (``objectives.sampling_network``) and its
  parameters: the trained network itself for every method but those that also sample through
  their teacher (second-order flow-map matching, ``v + (s - t) NN``), for which the run's own
  frozen teacher is loaded (at the checkpoint step it recorded) and ``params`` becomes
  ``{'student': ..., 'teacher': ...}``."""
  def teacher():
    t = load(run.config, run.workdir)
    if t is None:
      raise TeacherError(f"run {run.workdir!r} ({run.config.method}) samples through its "
                         "teacher, but its config.teacher.workdir is empty")
    return unbound(t, run.config)
  net = objectives.sampling_network(run.config, run.net, teacher)
  return dataclasses.replace(run, net=net, params=objectives.sampling_params(net, run.params))


def load_sampling_run(workdir: str, which: str = "params", step: int | None = None
                      ) -> runs.Run:
  """``runs.load_run`` of the student, ready to sample (``sampling_run``): what the report,
  ``--mode=sample`` and the benchmarks read."""
  return sampling_run(runs.load_run(workdir, which, step=step))


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


def pair_cache_meta(config, teacher: Teacher) -> dict:
  """What a teacher-pair cache is built from: the teacher's identity (run, step, weights'
  sha256), guidance, solver, NFE, grid, path and seed."""
  o, tc = config.objective, config.teacher
  return dict(teacher=teacher.ident, guidance=tc.guidance, solver=tc.pair_solver,
              nfe=tc.pair_nfe, pair_steps=o.pair_steps, path=o.path, seed=config.seed)


def pair_cache_key(meta: dict) -> str:
  """The cache's directory name under ``teacher.pair_cache`` (or ``<workdir>/pairs``): 16 hex
  digits of the sha256 of ``meta``, so another teacher or setting never reads this cache."""
  return hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:16]


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
  meta = pair_cache_meta(config, teacher)
  directory = os.path.join(tc.pair_cache or os.path.join(workdir, "pairs"),
                           pair_cache_key(meta))
  arrays = pairs.build_cache(directory, gen, tc.pair_num, tc.pair_chunk, meta, progress,
                             jax.process_index(), jax.process_count())

  def get(idx):
    out = {"traj": arrays["traj"][idx], "x": arrays["traj"][idx, -1]}
    if "cond" in arrays:
      out["cond"] = arrays["cond"][idx]
    return out
  return data.ArraySource(get, len(arrays["traj"]), config.seed, shape, num_classes)
