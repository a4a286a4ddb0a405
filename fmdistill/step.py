"""The train step of every method: the student update and the updates of its parts.

One guarded update (``guarded_update``) serves the student and every part: a non-finite loss,
gradient or updated parameter set skips that update (the parameters, optimiser state and EMA
stay as they were) and is counted. Parts (``fmdistill.objectives.Part``) trained by their own
loss run ``updates`` times on the student steps their schedule names, before or after the
student; parts trained jointly get the student loss's gradient in their parameters.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax

from fmdistill import health as health_lib, objectives, parallel, state as state_lib
from fmdistill import teacher as teacher_lib
from fmdistill.state import PartState, TrainState

Array = jax.Array
sg = jax.lax.stop_gradient


def select(ok: Array, new: Any, old: Any) -> Any:
  """``new`` where ``ok`` else ``old``, leaf by leaf."""
  return jax.tree_util.tree_map(lambda a, b: jnp.where(ok, a, b), new, old)


def all_finite(tree: Any) -> Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def guarded_update(opt: optax.GradientTransformation, loss: Array, grads: Any, params: Any,
                   opt_state: Any) -> tuple[Any, Any, Array]:
  """``(params, opt_state, ok)`` after one optimiser step, or the inputs unchanged when the
  loss, a gradient or an updated parameter is not finite (``ok = False``)."""
  updates, new_opt = opt.update(grads, opt_state, params)
  new = optax.apply_updates(params, updates)
  ok = jnp.isfinite(loss) & all_finite(grads) & all_finite(new)
  return select(ok, new, params), select(ok, new_opt, opt_state), ok


def _update_part(ps: PartState, opt, loss, grads, decay: float) -> tuple[PartState, Array]:
  params, opt_state, ok = guarded_update(opt, loss, grads, ps.params, ps.opt_state)
  ema = ps.ema
  if decay > 0:
    ema = select(ok, optax.incremental_update(params, ps.ema, 1.0 - decay), ps.ema)
  return ps.replace(params=params, opt_state=opt_state, ema=ema, count=ps.count + 1,
                    skipped=ps.skipped + (~ok)), ok


def part_networks(config: ml_collections.ConfigDict, net: Any,
                  teacher: teacher_lib.Teacher | None) -> dict[str, Callable | None]:
  """``{part: apply(params, ...)}`` (``None`` for parts used as raw parameters)."""
  entry = objectives.entry(config.method)
  teacher_fn = teacher_lib.velocity_fn(teacher, config) if teacher is not None else None
  ctx = objectives.PartContext(config=config, net=net, params=None, teacher_fn=teacher_fn,
                               teacher=teacher)
  out = {}
  for name, part in entry.parts_for(config.objective).items():
    if part.network == "teacher":
      out[name] = teacher_fn
    elif part.network == "student":
      out[name] = net
    elif part.network is None:
      out[name] = None
    else:
      out[name] = part.network(ctx)
  return out


def make_train_step(config: ml_collections.ConfigDict, net: Any,
                    teacher: teacher_lib.Teacher | None, shardings: tuple | None = None
                    ) -> "TrainStep":
  """The train step of ``config.method`` as a ``TrainStep`` (jitted, state donated); with
  ``shardings = (mesh, state_sharding, teacher_sharding)`` it is sharded over the mesh and the
  attention kernel runs under ``shard_map``."""
  entry = objectives.entry(config.method)
  parts = dict(sorted(entry.parts_for(config.objective).items()))
  loss_fn, ocfg, t = entry.loss, config.objective, config.train
  opt = state_lib.student_optimizer(config)
  popt = {n: state_lib.part_optimizer(config, n) for n in parts}
  apply = part_networks(config, net, teacher)
  joint = [n for n, p in parts.items() if p.joint]

  def frozen_parts(state: TrainState, exclude: str = "") -> dict:
    out = {}
    for n, p in parts.items():
      if n != exclude and not p.joint:
        w = sg(state.parts[n].params)
        if apply[n] is None:
          out[n] = w
        else:
          out[n] = apply[n].bind(w) if hasattr(apply[n], "bind") else functools.partial(apply[n], w)
    return out

  def part_step(state: TrainState, name: str, batch: dict, key: Array, bound,
                k: Array) -> tuple:
    """``updates`` updates of part ``name`` if student step ``k`` is on its schedule."""
    part, spec = parts[name], config.parts[name]
    others = frozen_parts(state, exclude=name)
    student = sg(state.params)

    def one(ps, key_):
      fn = lambda w: part.loss(w, student, batch, key_, net=net, apply=apply[name], teacher=bound,
                               parts=others, step=k, cfg=ocfg)
      (loss, aux), g = jax.value_and_grad(fn, has_aux=True)(ps.params)
      ps, _ = _update_part(ps, popt[name], loss, g, spec.ema_decay)
      return ps, (loss.astype(jnp.float32),
                  {m: jnp.asarray(v, jnp.float32) for m, v in aux.items()})
    run = lambda ps: jax.lax.scan(one, ps, jax.random.split(key, spec.updates))

    def idle(ps):  # NaN figures of the same structure: logged as null, named as non-finite
      shape = jax.eval_shape(run, ps)[1]
      return ps, jax.tree_util.tree_map(lambda s: jnp.full(s.shape, jnp.nan, s.dtype), shape)
    active = state_lib.part_due(spec, k)
    ps, (losses, aux) = jax.lax.cond(active, run, idle, state.parts[name])
    state = state.replace(parts={**state.parts, name: ps})
    metrics = {f"{name}/{m}": jnp.nanmean(v) for m, v in aux.items()}  # the part loss's own
    return state, {**metrics, f"{name}_loss": jnp.nanmean(losses), f"{name}_skipped": ps.skipped}

  def step_fn(state: TrainState, batch: dict, tparams: Any):
    key, k_loss, k_parts = jax.random.split(state.key, 3)
    k = state.step  # the student step this call performs (parts are scheduled by it)
    bound = teacher_lib.bind(teacher, tparams, config)
    metrics = {}
    for i, n in enumerate(parts):
      if not parts[n].joint and parts[n].order == "before":
        state, m = part_step(state, n, batch, jax.random.fold_in(k_parts, i), bound, k)
        metrics.update(m)
    target = state.ema[ocfg.target_ema] if ocfg.target_ema else state.params
    frozen = frozen_parts(state)

    def objective(p, jp):
      return loss_fn(p, batch, k_loss, net=net, teacher=bound, ema_params=sg(target),
                     step=state.step, cfg=ocfg, **frozen, **jp)
    live = {n: state.parts[n].params for n in joint}
    (loss, aux), (grads, jgrads) = jax.value_and_grad(objective, argnums=(0, 1),
                                                      has_aux=True)(state.params, live)
    params, opt_state, ok = guarded_update(opt, loss, grads, state.params, state.opt_state)
    new_parts = dict(state.parts)
    for n in joint:
      new_parts[n], _ = _update_part(state.parts[n], popt[n], loss, jgrads[n],
                                     config.parts[n].ema_decay)
      metrics[f"{n}_skipped"] = new_parts[n].skipped
    ema = state_lib.update_ema(state.ema, params, state.step, t, plain=(ocfg.target_ema,))
    ema = select(ok, ema, state.ema)
    state = state.replace(
        step=state.step + 1, key=key, params=params, opt_state=opt_state, ema=ema,
        parts=new_parts, skipped=state.skipped + (~ok),
        consecutive_skips=jnp.where(ok, 0, state.consecutive_skips + 1))
    for i, n in enumerate(parts):
      if not parts[n].joint and parts[n].order == "after":
        state, m = part_step(state, n, batch, jax.random.fold_in(k_parts, i), bound, k)
        metrics.update(m)
    metrics.update(aux)
    metrics.update(loss=loss, grad_norm=optax.tree.norm(grads), finite=ok.astype(jnp.float32),
                   skipped=state.skipped)
    logged = (state.step % t.log_every == 0) | (state.step == t.steps)  # health probes
    metrics.update(health_lib.when(logged, config, net, state.params, batch,
                                   jax.random.fold_in(k_loss, 1 << 20)))
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
