"""The one train loop for every method.

State: params, EMA params for several decays (plain and EDM2 power-function EMA), optax
optimiser state, step, PRNG key, non-finite-skip counters, and optionally a critic with its own
optimiser (updated before the student on the steps its schedule names). A frozen teacher is
loaded from another run's workdir. Checkpoints go through orbax (``fmdistill.checkpoint``);
logging to a tqdm bar, ``metrics.jsonl`` and a stdout line every ``log_every`` steps.
"""
from __future__ import annotations

import functools
import json
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import struct
from tqdm import tqdm

from fmdistill import checkpoint, config as config_lib, data, flowmap, models, objectives, paths
from fmdistill import sampling
from fmdistill.data import pairs
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


class Teacher(struct.PyTreeNode):
  """A frozen teacher: network, its parameterisation and path, and its weights."""
  net: Any = struct.field(pytree_node=False)
  param: flowmap.Parameterization = struct.field(pytree_node=False)
  path: paths.Path = struct.field(pytree_node=False)
  params: Any = None


def load_teacher(config: ml_collections.ConfigDict) -> Teacher | None:
  if not config.teacher.workdir:
    return None
  tconfig, net, params = checkpoint.load_params(config.teacher.workdir, config.teacher.which)
  o = tconfig.objective
  return Teacher(net, flowmap.Parameterization(o.param, o.sigma_d),
                 paths.get_path(o.path, o.sigma_d), params)


def bind_teacher(teacher: Teacher | None, params: Any, config) -> Callable | None:
  if teacher is None:
    return None
  o = config.objective
  return flowmap.teacher_network(
      teacher.net, params, teacher.param, teacher.path, paths.get_path(o.path, o.sigma_d),
      guidance=config.teacher.guidance, null_label=o.num_classes or None)


# ------------------------------------------------------------------------------ the step


def make_train_step(config: ml_collections.ConfigDict, net: models.Network,
                    teacher: Teacher | None) -> Callable:
  """``step(state, batch, teacher_params) -> (state, metrics)``, jitted, state donated."""
  entry = objectives.entry(config.method)
  loss_fn, ocfg, t = entry.loss, config.objective, config.train
  opt = make_optimizer(t)
  critic_opt = make_optimizer(config.critic) if entry.critic else None

  def critic_update(state, batch, key, tparams):
    spec = entry.critic
    def one(carry, k):
      cp, copt = carry
      loss_c = lambda p: spec.loss(p, state.params, batch, k, net=net, critic_net=teacher.net,
                                   teacher=bind_teacher(teacher, tparams, config),
                                   step=state.step, cfg=ocfg)
      (lc, _), g = jax.value_and_grad(loss_c, has_aux=True)(cp)
      upd, copt2 = critic_opt.update(g, copt, cp)
      ok = jnp.isfinite(lc) & _all_finite(g)
      keep = lambda new, old: jax.tree_util.tree_map(lambda a, b: jnp.where(ok, a, b), new, old)
      return (keep(optax.apply_updates(cp, upd), cp), keep(copt2, copt)), lc
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
    bound = bind_teacher(teacher, tparams, config)
    target = state.ema[ocfg.target_ema] if ocfg.target_ema else state.params
    extra = {"critic": (teacher.net, state.critic_params)} if entry.critic else {}

    def objective(p):
      return loss_fn(p, batch, k_loss, net=net, teacher=bound,
                     ema_params=jax.lax.stop_gradient(target), step=state.step, cfg=ocfg,
                     **extra)
    (loss, aux), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
    updates, opt_state = opt.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ok = jnp.isfinite(loss) & _all_finite(grads)
    keep = lambda new, old: jax.tree_util.tree_map(lambda a, b: jnp.where(ok, a, b), new, old)
    new_ema = update_ema(state.ema, params, state.step, t)
    state = state.replace(
        step=state.step + 1, key=key, params=keep(params, state.params),
        opt_state=keep(opt_state, state.opt_state), ema=keep(new_ema, state.ema),
        skipped=state.skipped + (~ok), consecutive_skips=jnp.where(ok, 0,
                                                                   state.consecutive_skips + 1))
    metrics.update({k: v for k, v in aux.items()})
    metrics.update(loss=loss, grad_norm=optax.tree.norm(grads), finite=ok.astype(jnp.float32),
                   skipped=state.skipped)
    return state, metrics

  return jax.jit(step_fn, donate_argnums=0)


def _copy(tree):
  """Fresh buffers (the step donates its state, so no two leaves may share one)."""
  return jax.tree_util.tree_map(jnp.array, tree)


def _all_finite(tree) -> Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


# ------------------------------------------------------------------------------ teacher pairs


def pair_source(config, teacher: Teacher, shape: tuple, num_classes: int, workdir: str):
  """Build (or resume) the teacher-trajectory cache and expose it as a data source."""
  o, tc = config.objective, config.teacher
  path = paths.get_path(o.path, o.sigma_d)
  k = o.pair_steps
  grid = np.asarray(sampling.time_grid(k, path.T))
  sub = sampling.solver_steps_for_nfe(tc.pair_nfe, tc.pair_solver)
  if sub % k:
    raise ValueError(f"teacher.pair_nfe={tc.pair_nfe} with {tc.pair_solver} gives {sub} steps, "
                     f"not a multiple of objective.pair_steps={k}")

  @jax.jit
  def trajectories(key, tparams):
    kx, kc = jax.random.split(key)
    x = path.sigma(jnp.float32(path.T)) * jax.random.normal(kx, (tc.pair_chunk,) + shape)
    cond = jax.random.randint(kc, (tc.pair_chunk,), 0, num_classes) if num_classes else None
    bound = bind_teacher(teacher, tparams, config)
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
  arrays = pairs.build_cache(directory, gen, tc.pair_num, tc.pair_chunk, meta)

  def get(idx):
    out = {"traj": arrays["traj"][idx], "x": arrays["traj"][idx, -1]}
    if "cond" in arrays:
      out["cond"] = arrays["cond"][idx]
    return out
  return data.ArraySource(get, len(arrays["traj"]), config.seed, shape, num_classes)



# ------------------------------------------------------------------------------ the loop


def setup(config: ml_collections.ConfigDict, workdir: str):
  """Resolve data, teacher and model for ``config``: ``(source, teacher, net, state)``.

  Fills in ``config.data_shape`` and ``config.objective.num_classes`` from the data.
  """
  config_lib.validate(config)
  source = make_source(config)
  shape, num_classes = tuple(source.shape), source.num_classes
  with config.unlocked():
    config.data_shape = list(shape)
    config.objective.num_classes = num_classes
  entry = objectives.entry(config.method)
  teacher = load_teacher(config)
  if entry.needs_teacher and teacher is None:
    raise ValueError(f"method {config.method!r} distils a teacher: set teacher.workdir to a "
                     "finished flow-matching run")
  if entry.batch == "teacher_pairs":
    source = pair_source(config, teacher, shape, num_classes, workdir)
  critic_params = _copy(teacher.params) if entry.critic else None
  net, state = init_state(config, shape, num_classes, critic_params)
  if teacher is not None and config.teacher.init_student:
    student, aux = _common.split_aux(state.params)
    if (jax.tree_util.tree_structure(teacher.params) != jax.tree_util.tree_structure(student)
        or jax.tree_util.tree_map(jnp.shape, teacher.params)
        != jax.tree_util.tree_map(jnp.shape, student)):
      raise ValueError("teacher.init_student=True but the student and teacher architectures "
                       "differ; set teacher.init_student=False or use the teacher's model config")
    p = _copy(teacher.params)
    if aux is not None:
      p[_common.AUX_KEY] = aux
    state = state.replace(params=p, ema={n: _copy(p) for n in state.ema},
                          opt_state=make_optimizer(config.train).init(p))
  return source, teacher, net, state


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       eval_fn: Callable | None = None, progress: bool = True,
                       stop_after: int | None = None) -> tuple[models.Network, TrainState]:
  """Train ``config`` in ``workdir``, resuming from its latest checkpoint if there is one.

  ``stop_after`` ends this process after that many steps (checkpointed), leaving the run to be
  resumed later with the same command — for wall-time-limited jobs.

  ``eval_fn(net, state) -> dict`` runs every ``train.eval_every`` steps (0 = never); its
  figures are logged with an ``eval/`` prefix.
  """
  source, teacher, net, state = setup(config, workdir)
  t = config.train
  checkpoint.write_config(workdir, config)
  mngr = checkpoint.manager(workdir, keep=t.keep, every=t.ckpt_every)
  start = mngr.latest_step()
  if start is not None:
    state = checkpoint.restore(mngr, start, state)
  start = int(state.step)
  step_fn = make_train_step(config, net, teacher)
  tparams = teacher.params if teacher is not None else None
  proc, nproc = jax.process_index(), jax.process_count()
  log = open(os.path.join(workdir, "metrics.jsonl"), "a") if proc == 0 else None
  end = t.steps if stop_after is None else min(t.steps, start + stop_after)
  bar = tqdm(range(start, end), initial=start, total=t.steps, desc=config.method,
             disable=not progress or proc != 0, dynamic_ncols=True)
  t0, last = time.time(), None
  try:
    for step in bar:
      batch = jax.tree_util.tree_map(jnp.asarray, source.batch(step, t.batch_size, proc, nproc))
      state, metrics = step_fn(state, batch, tparams)
      done = step + 1
      if done % t.log_every == 0 or done == t.steps:
        last = {k: float(v) for k, v in jax.device_get(metrics).items()}
        last.update(step=done, time=time.time() - t0)
        if eval_fn is not None and t.eval_every and (done % t.eval_every == 0
                                                      or done == t.steps):
          last.update({f"eval/{k}": v for k, v in eval_fn(net, state).items()})
        if log is not None:
          log.write(json.dumps(last) + "\n")
          log.flush()
        bar.set_postfix(loss=f"{last['loss']:.4g}")
        if not progress and proc == 0:
          print(f"[{config.method}] step {done}/{t.steps} loss {last['loss']:.5g}", flush=True)
      if int(state.consecutive_skips) >= t.max_consecutive_skips > 0:
        checkpoint.save(mngr, done, state, force=True)
        raise FloatingPointError(
            f"{int(state.consecutive_skips)} consecutive non-finite losses/gradients at step "
            f"{done}; the last good state is saved in {workdir}/checkpoints/{done}")
      checkpoint.save(mngr, done, state)
    if mngr.latest_step() != int(state.step):
      checkpoint.save(mngr, int(state.step), state, force=True)
  finally:
    mngr.wait_until_finished()
    mngr.close()
    if log is not None:
      log.close()
  return net, state
