"""The one train loop for every method.

The state (``fmdistill.state.TrainState``: the student, its EMAs, and every trainable part the
method declares) is built by ``setup``: data, the frozen teacher loaded from another run's
workdir, the student initialised from the teacher's weights when it distils one
(``teacher.init_student``), the parts. The step is ``fmdistill.step``. Checkpoints go through
orbax (``fmdistill.checkpoint``); logging to a tqdm bar, ``metrics.jsonl``, TensorBoard event files
(``fmdistill.tblog``, unless ``train.tensorboard=False``) and a stdout line every ``log_every``
steps.

One process owns a workdir while it trains (``workdir.lock``); a resumed run with another
config is refused unless told (``allow_config_change``); a student pins its teacher's
identity; SIGTERM is polled after every step (``fmdistill.preempt``).
"""
from __future__ import annotations

import contextlib
import os
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
from tqdm import tqdm

from fmdistill import checkpoint, config as config_lib, data, metrics_log, objectives, parallel
from fmdistill import preempt, runs, state as state_lib, step as step_lib, tblog
from fmdistill import teacher as teacher_lib, workdir as workdir_lib
from fmdistill.data import prior
from fmdistill.errors import ConfigError, Preempted
from fmdistill.eval import evaluate, plots
from fmdistill.state import TrainState

Array = jax.Array


def make_source(config: ml_collections.ConfigDict):
  return data.make_source(config.data, config.seed)


def prior_source(config: ml_collections.ConfigDict) -> prior.PriorSource:
  """Batches of a data-free method (``batch='prior'``): prior samples shaped like its teacher's
  data, with its teacher's classes; no dataset is opened."""
  if not config.teacher.workdir:
    raise ConfigError(f"method {config.method!r} is data-free: the shape and classes of its "
                      "samples come from its teacher; set config.teacher.workdir")
  tconfig = runs.read_config(config.teacher.workdir)
  return prior.PriorSource(tuple(tconfig.data_shape), int(tconfig.objective.num_classes),
                           config.seed)


# re-exported: the step is built here for callers of the loop
make_train_step = step_lib.make_train_step


def _native_fields(config: ml_collections.ConfigDict, teacher: teacher_lib.Teacher) -> None:
  """A student that starts from the teacher's weights keeps what they are trained for
  (``model.native_*``); its network is presented in its own parameterisation and path
  (``state.build_network``)."""
  o = config.objective
  same = teacher.native == state_lib.function_key(o.param, o.path, o.sigma_d)
  with config.unlocked():
    config.model.native_param = "" if same else teacher.native[0]
    config.model.native_path = "" if same else teacher.native[1]
    config.model.native_sigma_d = 0.0 if same else teacher.native[2]


def initial_state(config: ml_collections.ConfigDict, teacher, shape: tuple[int, ...],
                  num_classes: int, init_student: bool) -> tuple[Any, TrainState]:
  """``(net, state)`` at step 0 for a validated, resolved ``config``: the network (from the
  teacher's weights with ``init_student``), every enabled part, the optimiser and the EMAs,
  all drawn from ``config.seed``."""
  k_model, k_parts, k_state = jax.random.split(jax.random.PRNGKey(config.seed), 3)
  net, params = state_lib.build_network(config, shape, num_classes, k_model)
  if init_student:
    params = state_lib.from_teacher(params, teacher.params)
  ctx = objectives.PartContext(
      config=config, net=net, params=params,
      teacher_params=None if teacher is None else teacher.params,
      teacher_fn=None if teacher is None else teacher_lib.velocity_fn(teacher, config),
      teacher=teacher)
  parts = state_lib.init_parts(config, ctx, k_parts)
  return net, state_lib.init_state(config, params, parts, k_state)


def setup(config: ml_collections.ConfigDict, workdir: str, *, overwrite: bool = False,
          progress: bool = True, allow_config_change: bool = False,
          hold: contextlib.ExitStack | None = None):
  """Resolve data, teacher, network and state for ``config``: ``(source, teacher, net, state)``.

  Fills in ``config.data_shape`` and ``config.objective.num_classes`` from the data (and
  ``config.model.native_*`` for a student that keeps a teacher's parameterisation). Every
  check that can fail on a bad config runs before anything is written into ``workdir`` (the
  teacher-pair cache is the only thing written here, last). With ``hold``, the workdir's lock
  is taken before the workdir is checked and released when ``hold`` closes.
  """
  config_lib.validate(config)
  workdir_lib.check_path(workdir)
  entry = objectives.entry(config.method)
  source = prior_source(config) if entry.batch == "prior" else make_source(config)
  shape, num_classes = tuple(source.shape), source.num_classes
  with config.unlocked():
    config.data_shape = list(shape)
    config.objective.num_classes = num_classes
    if config.objective.get("curriculum_steps", -1) == 0:  # a curriculum's K: the whole run
      config.objective.curriculum_steps = config.train.steps
  teacher = teacher_lib.load(config, workdir)
  if teacher is not None:
    teacher_lib.check_kind(config, teacher)  # e.g. a flow-map stage on another path
  if entry.needs_teacher and teacher is None:
    raise ConfigError(f"method {config.method!r} distils a teacher: set config.teacher.workdir "
                      "to a finished flow-matching run")
  init_student = teacher is not None and config.teacher.init_student
  if init_student:
    if isinstance(teacher.net, objectives.SamplingNet):
      raise ConfigError(
          f"config.teacher.init_student=True but the flow-map teacher {teacher.source} samples "
          "through its own frozen teacher (its map combines that teacher's velocity with its "
          "network), so its weights are not one network a student can start from; set "
          "config.teacher.init_student=False")
    bad = teacher_lib.init_mismatches(config, teacher)
    if bad:
      raise ConfigError(
          f"config.teacher.init_student=True but the student's network differs from the "
          f"teacher's ({'; '.join(bad)}); use the teacher's model settings, or set "
          "config.teacher.init_student=False to train the student from random weights")
    _native_fields(config, teacher)
  if hold is not None:
    hold.enter_context(workdir_lib.lock(workdir))
  workdir_lib.check(workdir, config, overwrite, allow_config_change)
  net, state = initial_state(config, teacher, shape, num_classes, init_student)
  if entry.needs_pairs:
    source = teacher_lib.pair_source(config, teacher, workdir, progress)
  return source, teacher, net, state


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       eval_fn: Callable | None = None, progress: bool = True,
                       stop_after: int | None = None, overwrite: bool = False,
                       allow_config_change: bool = False) -> tuple[Any, TrainState]:
  """Train ``config`` in ``workdir``, resuming from its latest good checkpoint if any.

  ``eval_fn(net, state) -> dict`` (``net``: the network the sampler evaluates,
  ``objectives.sampling_network``) runs every ``train.eval_every`` steps (0 = never; default:
  ``evaluate.periodic_eval_fn``, sliced W2 to held-out data); its figures are logged with an
  ``eval/`` prefix; an array of samples among them (``ndim >= 2``) is drawn as a TensorBoard
  image instead. ``stop_after`` ends this process after that many
  steps (checkpointed), to be resumed later with the same command. SIGTERM saves a checkpoint
  at the current step and raises ``Preempted``. The workdir is locked for the whole call; a
  resume whose config differs from the stored one needs ``allow_config_change``.
  """
  with contextlib.ExitStack() as hold, preempt.watch():
    source, teacher, net, state = setup(config, workdir, overwrite=overwrite, progress=progress,
                                        allow_config_change=allow_config_change, hold=hold)
    return _loop(config, workdir, source, teacher, net, state, eval_fn, progress, stop_after)


def _loop(config, workdir, source, teacher, net, state, eval_fn, progress, stop_after):
  t = config.train
  if eval_fn is None and t.eval_every:
    eval_fn = evaluate.periodic_eval_fn(config, make_source(config))
  proc, nproc = jax.process_index(), jax.process_count()
  mesh = parallel.make_mesh(config.mesh)
  parallel.check_batch(t.batch_size, mesh)
  state_sh = parallel.state_shardings(state, mesh, config.mesh)
  state = jax.device_put(state, state_sh)
  tparams, teacher_sh = None, None
  if teacher is not None:
    teacher_sh = parallel.state_shardings({"teacher": teacher.params}, mesh, config.mesh)
    tparams = jax.device_put({"teacher": teacher.params}, teacher_sh)["teacher"]
    teacher_sh = teacher_sh["teacher"]
  mngr = checkpoint.manager(workdir, keep=t.keep, every=t.ckpt_every)
  state, _ = checkpoint.restore_latest(mngr, state, workdir)  # may refuse: before any write
  if proc == 0:
    workdir_lib.record(workdir, config, None if teacher is None else teacher.ident)
  start = int(state.step)
  log = metrics_log.MetricsLog(os.path.join(workdir, "metrics.jsonl") if proc == 0 else None,
                               start)
  tb = tblog.TBLog(os.path.join(workdir, tblog.DIR)
                   if proc == 0 and t.get("tensorboard", True) else None, start)
  step_fn = step_lib.make_train_step(config, net, teacher, (mesh, state_sh, teacher_sh))
  eval_net = objectives.sampling_network(  # what the sampler evaluates (second-order FMM)
      config, net, lambda: teacher_lib.unbound(teacher, config))
  end = t.steps if stop_after is None else min(t.steps, start + stop_after)
  bar = tqdm(range(start, end), initial=start, total=t.steps, desc=config.method,
             disable=not progress or proc != 0, dynamic_ncols=True)
  save = lambda step, state, force=False: checkpoint.save(mngr, step, state, force, workdir)
  held = _PartMetrics(config)
  try:
    preempt.check("before training started")
    for step in bar:
      batch = parallel.global_batch(source.batch(step, t.batch_size, proc, nproc), mesh,
                                    t.batch_size)
      state, metrics = step_fn(state, batch, tparams)
      held.keep(step, metrics)
      done = step + 1
      if done % t.log_every == 0 or done == t.steps:
        _log((log, tb), held.fill(metrics), done, eval_fn, eval_net, state, t, bar, progress,
             config.method)
      if int(state.consecutive_skips) >= t.max_consecutive_skips > 0:
        _stop_non_finite(mngr, save, done, state, workdir)
      if preempt.requested():
        save(done, state, force=True)
        raise Preempted(done)
      save(done, state)
    if mngr.latest_step() != int(state.step):
      save(int(state.step), state, force=True)
  finally:
    bar.close()
    mngr.wait_until_finished()
    mngr.close()
    log.close()
    tb.close()
  return net, state


class _PartMetrics:
  """The figures of each part's latest update, for the logged steps where it is idle.

  A part that runs every ``every > 1`` steps or from ``start`` reports NaN at the steps it
  skips; with ``every`` dividing ``log_every`` every logged step is one of them, so its loss
  and metrics never reached the logs. The loop hands each step's (device) metrics to ``keep``,
  which holds a part's ``<part>_loss`` and ``<part>/<name>`` from the steps it ran (by
  reference: no transfer); ``fill`` puts the held ones into a logged step's metrics. Before a
  part's first update its figures stay NaN (logged as null); ``<part>_skipped`` is a running
  count and always current."""

  def __init__(self, config: ml_collections.ConfigDict):
    entry = objectives.entry(config.method)
    self.schedules = {n: config.parts[n] for n, p in entry.parts_for(config.objective).items()
                      if not p.joint and (config.parts[n].every > 1 or config.parts[n].start)}
    self.held: dict[str, dict] = {}

  def keep(self, k: int, metrics: dict) -> None:
    for n, p in self.schedules.items():
      if state_lib.part_due(p, k):
        self.held[n] = {m: v for m, v in metrics.items()
                        if m == f"{n}_loss" or m.startswith(f"{n}/")}

  def fill(self, metrics: dict) -> dict:
    return {**metrics, **{m: v for held in self.held.values() for m, v in held.items()}}


def _nonfinite_parts(state: TrainState) -> list[str]:
  """The names of the state's weight trees (params, each EMA, optimiser state, each part)
  that hold a NaN or Inf."""
  trees = {"params": state.params, "opt_state": state.opt_state,
           **{f"ema/{k}": v for k, v in state.ema.items()},
           **{f"parts/{n}": (p.params, p.opt_state, p.ema) for n, p in state.parts.items()}}
  ok = jax.device_get(jax.jit(lambda d: {k: step_lib.all_finite(v) for k, v in d.items()})(
      trees))
  return sorted(k for k, v in ok.items() if not bool(v))


def _stop_non_finite(mngr, save, done: int, state: TrainState, workdir: str) -> None:
  """Stop after ``train.max_consecutive_skips`` skipped updates: save the state if every
  weight in it is finite (the last good one: skipped updates leave it untouched), else save
  nothing and name the newest checkpoint."""
  n = int(state.consecutive_skips)
  bad = _nonfinite_parts(state)
  if not bad:
    save(done, state, force=True)
    raise FloatingPointError(
        f"{n} consecutive non-finite losses or gradients at step {done}; stopped, the last "
        f"good parameters are saved in {workdir}/checkpoints/{done}")
  raise FloatingPointError(
      f"{n} consecutive non-finite losses or gradients at step {done}, and the state itself "
      f"is not finite ({', '.join(bad)}); stopped without saving it, the newest checkpoint is "
      f"step {mngr.latest_step()}")


def _log(logs, metrics, done, eval_fn, net, state, t, bar, progress, method) -> None:
  log, tb = logs
  last = {k: float(v) for k, v in jax.device_get(metrics).items()}
  last.update(step=done)
  samples = {}
  if eval_fn is not None and t.eval_every and (done % t.eval_every == 0 or done == t.steps):
    figures = eval_fn(net, state)
    samples = {k: v for k, v in figures.items() if isinstance(v, np.ndarray) and v.ndim >= 2}
    last.update({f"eval/{k}": v for k, v in figures.items() if k not in samples})
  tb.scalars(log.write(last), done)
  for k, x in samples.items():
    if tb.active:
      tb.image(f"eval/{k}", plots.samples_png({f"{method} {k}, step {done}": x}), done)
  if log.f is not None:
    bar.set_postfix(loss=f"{last['loss']:.4g}")
    if not progress:
      print(f"[{method}] step {done}/{t.steps} loss {last['loss']:.5g}", flush=True)
