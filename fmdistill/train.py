"""The one train loop for every method.

The state (``fmdistill.state.TrainState``: the student, its EMAs, and every trainable part the
method declares) is built by ``setup``: data, the frozen teacher loaded from another run's
workdir, the student initialised from the teacher's weights when it distils one
(``teacher.init_student``), the parts. The step is ``fmdistill.step``. Checkpoints go through
orbax (``fmdistill.checkpoint``); logging to a tqdm bar, ``metrics.jsonl`` and a stdout line
every ``log_every`` steps.
"""
from __future__ import annotations

import json
import os
import signal
import threading
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
from tqdm import tqdm

from fmdistill import checkpoint, config as config_lib, data, objectives, parallel, runs
from fmdistill import state as state_lib, step as step_lib, teacher as teacher_lib
from fmdistill import workdir as workdir_lib
from fmdistill.data import prior
from fmdistill.errors import ConfigError, Preempted
from fmdistill.eval import evaluate
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


def setup(config: ml_collections.ConfigDict, workdir: str, *, overwrite: bool = False,
          progress: bool = True):
  """Resolve data, teacher, network and state for ``config``: ``(source, teacher, net, state)``.

  Fills in ``config.data_shape`` and ``config.objective.num_classes`` from the data (and
  ``config.model.native_*`` for a student that keeps a teacher's parameterisation). Every
  check that can fail on a bad config runs before anything is written into ``workdir`` (the
  teacher-pair cache is the only thing written here, last).
  """
  config_lib.validate(config)
  entry = objectives.entry(config.method)
  source = prior_source(config) if entry.batch == "prior" else make_source(config)
  shape, num_classes = tuple(source.shape), source.num_classes
  with config.unlocked():
    config.data_shape = list(shape)
    config.objective.num_classes = num_classes
  teacher = teacher_lib.load(config)
  if entry.needs_teacher and teacher is None:
    raise ConfigError(f"method {config.method!r} distils a teacher: set config.teacher.workdir "
                      "to a finished flow-matching run")
  init_student = teacher is not None and config.teacher.init_student
  if init_student:
    bad = teacher_lib.init_mismatches(config, teacher)
    if bad:
      raise ConfigError(
          f"config.teacher.init_student=True but the student's network differs from the "
          f"teacher's ({'; '.join(bad)}); use the teacher's model settings, or set "
          "config.teacher.init_student=False to train the student from random weights")
    _native_fields(config, teacher)
  workdir_lib.check(workdir, config, overwrite)
  k_model, k_parts, k_state = jax.random.split(jax.random.PRNGKey(config.seed), 3)
  net, params = state_lib.build_network(config, shape, num_classes, k_model)
  if init_student:
    if jax.tree_util.tree_map(jnp.shape, teacher.params) != jax.tree_util.tree_map(
        jnp.shape, params):
      raise ConfigError("config.teacher.init_student=True but the teacher's parameters do not "
                        "fit the student network; set config.teacher.init_student=False")
    params = state_lib.copy(teacher.params)
  ctx = objectives.PartContext(
      config=config, net=net, params=params,
      teacher_params=None if teacher is None else teacher.params,
      teacher_fn=None if teacher is None else teacher_lib.velocity_fn(teacher, config))
  parts = state_lib.init_parts(config, ctx, k_parts)
  state = state_lib.init_state(config, params, parts, k_state)
  if entry.needs_pairs:
    source = teacher_lib.pair_source(config, teacher, workdir, progress)
  return source, teacher, net, state


class _SigtermFlag:
  """Turns SIGTERM into a flag the loop polls (main thread only; elsewhere a no-op)."""

  def __init__(self):
    self.set, self._old = False, None

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      self._old = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame):
    del signum, frame
    self.set = True

  def __exit__(self, *exc):
    if self._old is not None:
      signal.signal(signal.SIGTERM, self._old)


def _trim_log(path: str, step: int) -> None:
  """Drop log lines past ``step`` (written after the checkpoint a resumed run starts from)."""
  if not os.path.exists(path):
    return
  with open(path) as f:
    keep = [l for l in f if l.strip() and json.loads(l).get("step", 0) <= step]
  with open(path + ".tmp", "w") as f:
    f.writelines(keep)
  os.replace(path + ".tmp", path)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       eval_fn: Callable | None = None, progress: bool = True,
                       stop_after: int | None = None, overwrite: bool = False
                       ) -> tuple[Any, TrainState]:
  """Train ``config`` in ``workdir``, resuming from its latest good checkpoint if any.

  ``eval_fn(net, state) -> dict`` runs every ``train.eval_every`` steps (0 = never; default:
  ``evaluate.periodic_eval_fn``, sliced W2 to held-out data); its figures are logged with an
  ``eval/`` prefix. ``stop_after`` ends this process after that many
  steps (checkpointed), to be resumed later with the same command. SIGTERM saves a checkpoint
  at the current step and raises ``Preempted``.
  """
  source, teacher, net, state = setup(config, workdir, overwrite=overwrite, progress=progress)
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
    workdir_lib.record(workdir, config)
  start = int(state.step)
  log_path = os.path.join(workdir, "metrics.jsonl")
  if proc == 0:
    _trim_log(log_path, start)
  step_fn = step_lib.make_train_step(config, net, teacher, (mesh, state_sh, teacher_sh))
  log = open(log_path, "a") if proc == 0 else None
  end = t.steps if stop_after is None else min(t.steps, start + stop_after)
  bar = tqdm(range(start, end), initial=start, total=t.steps, desc=config.method,
             disable=not progress or proc != 0, dynamic_ncols=True)
  t0 = time.time()
  try:
    with _SigtermFlag() as sigterm:
      for step in bar:
        batch = parallel.global_batch(source.batch(step, t.batch_size, proc, nproc), mesh,
                                      t.batch_size)
        state, metrics = step_fn(state, batch, tparams)
        done = step + 1
        if done % t.log_every == 0 or done == t.steps:
          _log(log, metrics, done, t0, eval_fn, net, state, t, bar, progress, config.method)
        if int(state.consecutive_skips) >= t.max_consecutive_skips > 0:
          checkpoint.save(mngr, done, state, force=True)
          raise FloatingPointError(
              f"{int(state.consecutive_skips)} consecutive non-finite losses or gradients at "
              f"step {done}; stopped, the last good parameters are saved in "
              f"{workdir}/checkpoints/{done}")
        if sigterm.set:
          checkpoint.save(mngr, done, state, force=True)
          raise Preempted(done)
        checkpoint.save(mngr, done, state)
      if mngr.latest_step() != int(state.step):
        checkpoint.save(mngr, int(state.step), state, force=True)
  finally:
    bar.close()
    mngr.wait_until_finished()
    mngr.close()
    if log is not None:
      log.close()
  return net, state


def _log(log, metrics, done, t0, eval_fn, net, state, t, bar, progress, method) -> None:
  last = {k: float(v) for k, v in jax.device_get(metrics).items()}
  last.update(step=done, time=time.time() - t0)
  if eval_fn is not None and t.eval_every and (done % t.eval_every == 0 or done == t.steps):
    last.update({f"eval/{k}": v for k, v in eval_fn(net, state).items()})
  if log is not None:
    log.write(json.dumps(last) + "\n")
    log.flush()
    bar.set_postfix(loss=f"{last['loss']:.4g}")
    if not progress:
      print(f"[{method}] step {done}/{t.steps} loss {last['loss']:.5g}", flush=True)
