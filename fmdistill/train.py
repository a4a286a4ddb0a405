"""The one train loop for every method.

State: params, EMA params for several decays (plain and EDM2 power-function EMA), optax
optimiser state, step, PRNG key, non-finite-skip counters, and optionally a critic with its own
optimiser (updated before the student on the steps its schedule names). A frozen teacher is
loaded from another run's workdir. Checkpoints go through orbax (``fmdistill.checkpoint``);
logging to a tqdm bar, ``metrics.jsonl`` and a stdout line every ``log_every`` steps.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import struct
from tqdm import tqdm

from fmdistill import checkpoint, config as config_lib, data, models, objectives, parallel
from fmdistill import teacher as teacher_lib, workdir as workdir_lib
from fmdistill.errors import ConfigError, Preempted
from fmdistill.objectives import _common

Array = jax.Array


class TrainState(struct.PyTreeNode):
  step: Array
  params: Any
  ema: dict
  opt_state: Any
  key: Array
  skipped: Array            # total updates skipped for a non-finite loss or gradient
  consecutive_skips: Array
  critic_params: Any = None
  critic_opt_state: Any = None


# ------------------------------------------------------------------------------ optimiser, EMA


def make_schedule(t: ml_collections.ConfigDict) -> optax.Schedule:
  if t.schedule == "constant":
    return optax.join_schedules([optax.linear_schedule(0.0, t.lr, max(t.warmup_steps, 1)),
                                 optax.constant_schedule(t.lr)], [max(t.warmup_steps, 1)])
  if t.schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(0.0, t.lr, max(t.warmup_steps, 1),
                                              max(t.steps, t.warmup_steps + 1), t.lr * t.final_lr)
  raise ValueError(f"train.schedule must be 'constant' or 'cosine', got {t.schedule!r}")


def make_optimizer(t: ml_collections.ConfigDict) -> optax.GradientTransformation:
  chain = [optax.clip_by_global_norm(t.grad_clip)] if t.grad_clip > 0 else []
  chain.append(optax.adamw(make_schedule(t), b1=t.b1, b2=t.b2, weight_decay=t.weight_decay))
  return optax.chain(*chain)


def ema_names(t: ml_collections.ConfigDict) -> list[str]:
  return [f"ema_{d:g}" for d in t.ema_decays] + [f"power_{g:g}" for g in t.ema_power]


def update_ema(ema: dict, params: Any, step: Array, t: ml_collections.ConfigDict) -> dict:
  """Plain EMA ``p <- d p + (1 - d) theta``; EDM2 power EMA with ``beta_n = (1 - 1/n)^(g+1)``
  after ``n`` updates (``optax.incremental_update`` with step size ``1 - beta``)."""
  n = (step + 1).astype(jnp.float32)
  out = {}
  for d in t.ema_decays:
    out[f"ema_{d:g}"] = optax.incremental_update(params, ema[f"ema_{d:g}"], 1.0 - d)
  for g in t.ema_power:
    beta = (1.0 - 1.0 / n) ** (g + 1.0)
    out[f"power_{g:g}"] = optax.incremental_update(params, ema[f"power_{g:g}"], 1.0 - beta)
  return out


# ------------------------------------------------------------------------------ setup


def make_source(config: ml_collections.ConfigDict):
  return data.make_source(config.data, config.seed)


def init_state(config: ml_collections.ConfigDict, shape: tuple, num_classes: int,
               critic_params: Any = None) -> tuple[models.Network, TrainState]:
  key = jax.random.PRNGKey(config.seed)
  k_model, k_state = jax.random.split(key)
  net, params = models.build(config.model, shape, num_classes, k_model)
  aux_init = objectives.entry(config.method).aux_init  # objective-owned params (sCM's w_phi)
  if aux_init is not None:
    net, params = _common.with_aux(net, params, aux_init(jax.random.fold_in(k_model, 1),
                                                         config.objective))
  opt = make_optimizer(config.train)
  critic_opt_state = None
  if critic_params is not None:
    critic_opt_state = make_optimizer(config.critic).init(critic_params)
  state = TrainState(
      step=jnp.zeros((), jnp.int32), params=params,
      ema={n: _copy(params) for n in ema_names(config.train)}, opt_state=opt.init(params),
      key=k_state, skipped=jnp.zeros((), jnp.int32),
      consecutive_skips=jnp.zeros((), jnp.int32),
      critic_params=critic_params, critic_opt_state=critic_opt_state)
  return net, state


def abstract_state(config: ml_collections.ConfigDict) -> tuple[models.Network, TrainState]:
  """The network and the shape/dtype structure of a run's state, without computing it."""
  shape, num_classes = tuple(config.data_shape), config.objective.num_classes
  out = {}

  def build():
    net, state = init_state(config, shape, num_classes)
    out["net"] = net
    return state
  state = jax.eval_shape(build)
  return out["net"], state


# ------------------------------------------------------------------------------ the step


def make_train_step(config: ml_collections.ConfigDict, net: models.Network,
                    teacher: teacher_lib.Teacher | None, shardings: tuple | None = None
                    ) -> Callable:
  """The train step of ``config.method`` as a ``TrainStep`` (jitted, state donated); with
  ``shardings = (mesh, state_sharding, teacher_sharding)`` it is sharded over the mesh and the
  attention kernel runs under ``shard_map``."""
  entry = objectives.entry(config.method)
  loss_fn, ocfg, t = entry.loss, config.objective, config.train
  opt = make_optimizer(t)
  critic_opt = make_optimizer(config.critic) if entry.critic else None

  critic_fn = teacher_lib.velocity_fn(teacher, config) if entry.critic else None

  def critic_update(state, batch, key, tparams):
    spec = entry.critic
    def one(carry, k):
      cp, copt = carry
      loss_c = lambda p: spec.loss(p, state.params, batch, k, net=net, critic=critic_fn,
                                   teacher=teacher_lib.bind(teacher, tparams, config),
                                   step=state.step, cfg=ocfg)
      (lc, _), g = jax.value_and_grad(loss_c, has_aux=True)(cp)
      upd, copt2 = critic_opt.update(g, copt, cp)
      ok = jnp.isfinite(lc) & _all_finite(g)
      return (_select(ok, optax.apply_updates(cp, upd), cp), _select(ok, copt2, copt)), lc
    run = lambda c: jax.lax.scan(one, c, jax.random.split(key, spec.updates))
    carry = (state.critic_params, state.critic_opt_state)
    (cp, copt), losses = jax.lax.cond(
        state.step % spec.every == 0, run, lambda c: (c, jnp.full((spec.updates,), jnp.nan)),
        carry)
    return state.replace(critic_params=cp, critic_opt_state=copt), jnp.nanmean(losses)

  def step_fn(state: TrainState, batch: dict, tparams: Any):
    key, k_loss, k_critic = jax.random.split(state.key, 3)
    metrics = {}
    if entry.critic:
      state, metrics["critic_loss"] = critic_update(state, batch, k_critic, tparams)
    bound = teacher_lib.bind(teacher, tparams, config)
    target = state.ema[ocfg.target_ema] if ocfg.target_ema else state.params
    extra = {}
    if entry.critic:
      frozen = jax.lax.stop_gradient(state.critic_params)
      extra["critic"] = lambda x, t, cond=None: critic_fn(frozen, x, t, cond)

    def objective(p):
      return loss_fn(p, batch, k_loss, net=net, teacher=bound,
                     ema_params=jax.lax.stop_gradient(target), step=state.step, cfg=ocfg,
                     **extra)
    (loss, aux), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
    updates, opt_state = opt.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ok = jnp.isfinite(loss) & _all_finite(grads)
    new_ema = update_ema(state.ema, params, state.step, t)
    state = state.replace(
        step=state.step + 1, key=key, params=_select(ok, params, state.params),
        opt_state=_select(ok, opt_state, state.opt_state), ema=_select(ok, new_ema, state.ema),
        skipped=state.skipped + (~ok), consecutive_skips=jnp.where(ok, 0,
                                                                   state.consecutive_skips + 1))
    metrics.update({k: v for k, v in aux.items()})
    metrics.update(loss=loss, grad_norm=optax.tree.norm(grads), finite=ok.astype(jnp.float32),
                   skipped=state.skipped)
    return state, metrics

  return TrainStep(step_fn, shardings)


class TrainStep:
  """The jitted step: ``step(state, batch, teacher_params) -> (state, metrics)``.

  With ``shardings = (mesh, state_sharding, teacher_sharding)`` it is one pjit-style ``jax.jit``
  with ``in_shardings``/``out_shardings`` per batch structure (batches sharded over
  ``('data', 'fsdp')``), traced and run under ``jax.set_mesh(mesh)``. ``lower`` gives the
  lowered computation (for cost and memory analysis).
  """

  def __init__(self, step_fn: Callable, shardings: tuple | None = None):
    self.step_fn, self.shardings, self._jitted = step_fn, shardings, {}

  def _jit(self, batch: dict):
    key = tuple(sorted((k, v.ndim) for k, v in batch.items()))
    if key not in self._jitted:
      if self.shardings is None:
        self._jitted[key] = jax.jit(self.step_fn, donate_argnums=0)
      else:
        mesh, state_sh, teacher_sh = self.shardings
        batch_sh = {k: parallel.batch_sharding(mesh, v.ndim) for k, v in batch.items()}
        self._jitted[key] = jax.jit(self.step_fn, donate_argnums=0,
                                    in_shardings=(state_sh, batch_sh, teacher_sh),
                                    out_shardings=(state_sh, parallel.replicated(mesh)))
    return self._jitted[key]

  def _mesh(self):
    return jax.set_mesh(self.shardings[0]) if self.shardings else contextlib.nullcontext()

  def __call__(self, state, batch, tparams):
    with self._mesh():
      return self._jit(batch)(state, batch, tparams)

  def lower(self, state, batch, tparams):
    with self._mesh():
      return self._jit(batch).lower(state, batch, tparams)


def _copy(tree):
  """Fresh buffers (the step donates its state, so no two leaves may share one)."""
  return jax.tree_util.tree_map(jnp.array, tree)


def _select(ok: Array, new, old):
  """``new`` where ``ok`` else ``old``, leaf by leaf (the non-finite guard's update skip)."""
  return jax.tree_util.tree_map(lambda a, b: jnp.where(ok, a, b), new, old)


def _all_finite(tree) -> Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


# ------------------------------------------------------------------------------ the loop


def setup(config: ml_collections.ConfigDict, workdir: str, *, overwrite: bool = False,
          progress: bool = True):
  """Resolve data, teacher and model for ``config``: ``(source, teacher, net, state)``.

  Fills in ``config.data_shape`` and ``config.objective.num_classes`` from the data. Every
  check that can fail on a bad config runs before anything is written into ``workdir`` (the
  teacher-pair cache is the only thing written here, last).
  """
  config_lib.validate(config)
  source = make_source(config)
  shape, num_classes = tuple(source.shape), source.num_classes
  with config.unlocked():
    config.data_shape = list(shape)
    config.objective.num_classes = num_classes
  workdir_lib.check(workdir, config, overwrite)
  entry = objectives.entry(config.method)
  teacher = teacher_lib.load(config)
  if entry.needs_teacher and teacher is None:
    raise ConfigError(f"method {config.method!r} distils a teacher: set config.teacher.workdir "
                      "to a finished flow-matching run")
  critic_params = _copy(teacher.params) if entry.critic else None
  net, state = init_state(config, shape, num_classes, critic_params)
  if teacher is not None and config.teacher.init_student:
    student, aux = _common.split_aux(state.params)
    same = jax.tree_util.tree_structure(teacher.params) == jax.tree_util.tree_structure(
        student) and jax.tree_util.tree_map(jnp.shape, teacher.params) == \
        jax.tree_util.tree_map(jnp.shape, student)
    if not same:
      raise ConfigError("config.teacher.init_student=True but the student and teacher "
                        "architectures differ; set it False or use the teacher's model config")
    p = _copy(teacher.params)
    if aux is not None:
      p[_common.AUX_KEY] = aux
    state = state.replace(params=p, ema={n: _copy(p) for n in state.ema},
                          opt_state=make_optimizer(config.train).init(p))
  if entry.batch == "teacher_pairs":
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
                       ) -> tuple[models.Network, TrainState]:
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
    from fmdistill.eval import evaluate  # local: eval imports the model stack
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
  step_fn = make_train_step(config, net, teacher, (mesh, state_sh, teacher_sh))
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
