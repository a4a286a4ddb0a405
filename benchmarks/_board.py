"""The runs behind the leaderboard (``benchmarks/leaderboard.py``; ``tangent.py quality`` uses
them too): which student runs a dataset config has, training them (resumable), and measuring a
finished run's train step and sampler.

A dataset config is an ``experiments/<file>.py`` with ``get_config('<method>,key=value,...')``
(keys ``seed``, ``steps``, ``teacher`` and, for chains, ``distill``). Students distil one
flow-matching teacher: methods that need a teacher get it as ``teacher.workdir`` (and start
from its weights), as do ``SELF_INIT`` (self-distillation and consistency methods whose losses
need no teacher); ``CHAINS`` are stage chains from the teacher run (one row per stage).
"""
from __future__ import annotations

import ast
import dataclasses
import importlib.util
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from fmdistill import config as config_lib, objectives, runs as runs_lib
from fmdistill import step as step_lib, teacher as teacher_lib, train
from fmdistill.errors import ConfigError
from fmdistill.eval import evaluate

import _common  # noqa: E402  (benchmarks/_common.py)

CHAINS = ("reflow", "progressive")
# start from the teacher's weights although their losses need no teacher
SELF_INIT = ("cm_ct", "ict", "ect", "ctm", "imm", "shortcut", "splitmeanflow", "tri_consistency")
TEACHER_NFE = (1, 2, 4, 8, 16, 32, 64)


def load_experiment(path: str):
  """The ``experiments/<file>.py`` module at ``path``."""
  spec = importlib.util.spec_from_file_location(
      "_exp_" + os.path.splitext(os.path.basename(path))[0], path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def students(exclude=("flow_matching",)) -> list[str]:
  """Every registered method but the teacher's."""
  return [m for m in objectives.names() if m not in exclude]


def stage_configs(c: ml_collections.ConfigDict) -> list[ml_collections.ConfigDict]:
  return [c.stages[n] for n in c.stage_order] if "stages" in c else [c]


def apply_sets(c: ml_collections.ConfigDict, sets: list[str]) -> None:
  """``field.sub=value`` overrides (a Python literal of the field's type, strings bare)."""
  for item in sets:
    key, _, value = item.partition("=")
    *head, last = key.split(".")
    d = c
    for k in head:
      if not isinstance(d, ml_collections.ConfigDict) or k not in d:
        raise ConfigError(f"--set {item!r}: config has no field {key!r}")
      d = d[k]
    if not isinstance(d, ml_collections.ConfigDict) or last not in d:
      raise ConfigError(f"--set {item!r}: config has no field {key!r}")
    try:
      d[last] = literal(value, d[last])
    except (ValueError, TypeError) as e:
      raise ConfigError(f"--set {item!r}: {e}") from None


def literal(value: str, like: Any) -> Any:
  """``value`` parsed as a Python literal of ``like``'s type (a string stays bare)."""
  if isinstance(like, str):
    return value
  try:
    v = ast.literal_eval(value)
  except (ValueError, SyntaxError):
    raise ConfigError(f"{value!r} is not a {type(like).__name__} literal") from None
  if isinstance(like, float) and isinstance(v, int):
    return float(v)
  return tuple(v) if isinstance(like, tuple) and isinstance(v, (list, tuple)) else v


def dataset_name(c: ml_collections.ConfigDict) -> str:
  return c.data.toy if c.data.name == "toy" else c.data.name


@dataclasses.dataclass(frozen=True)
class Job:
  """One run (or stage chain) to train: ``name`` is the row label (a method, ``method@k=v``)."""
  name: str
  seed: int
  workdir: str
  config: Any

  @property
  def chain(self) -> bool:
    return "stages" in self.config

  def runs(self) -> dict[str, str]:
    """``{row name: run workdir}`` (a chain: one per stage, ``reflow:reflow_1``)."""
    if not self.chain:
      return {self.name: self.workdir}
    return {f"{self.name}:{n}": os.path.join(self.workdir, n) for n in self.config.stage_order}

  def finished(self) -> bool:
    return all(runs_lib.is_finished(wd, int(c.train.steps))
               for wd, c in zip(self.runs().values(), stage_configs(self.config)))

  def started(self) -> bool:
    return any(os.path.isdir(os.path.join(wd, "checkpoints")) for wd in self.runs().values())


def teacher_job(exp, keys: list[str], workdir: str, steps: int, sets: list[str]) -> Job:
  c = exp.get_config(",".join(["flow_matching", *keys, "seed=0"]
                              + ([f"steps={steps}"] if steps else [])))
  apply_sets(c, sets)
  config_lib.validate(c)  # a bad dataset key or --set is one error, not a skip of every student
  return Job("teacher", 0, workdir, c)


def student_job(exp, spec: str, keys: list[str], seed: int, steps: int, teacher: str,
                workdir: str, sets: list[str]) -> Job:
  """The run of method ``spec`` (``method@field=value@...``: objective overrides), distilling
  the finished run ``teacher``; ``ConfigError`` when the dataset config has no such variant."""
  name, _, over = spec.partition("@")
  arg = [name, *keys, f"seed={seed}"] + ([f"steps={steps}"] if steps else [])
  if name in CHAINS:
    arg += [f"teacher={teacher}"] + (["distill=True"] if name == "reflow" else [])
  c = exp.get_config(",".join(arg))
  for s in stage_configs(c):
    for item in filter(None, over.split("@")):
      k, v = item.split("=", 1)
      if k not in s.objective:
        raise ValueError(f"{spec!r}: method {name!r} has no objective field {k!r}; its "
                         f"fields: {sorted(s.objective)}")
      s.objective[k] = literal(v, s.objective[k])
    apply_sets(s, sets)
  if "stages" not in c:
    if objectives.entry(name).needs_teacher or name in SELF_INIT:
      c.teacher.workdir = teacher
    config_lib.validate(c)
  return Job(spec, seed, workdir, c)


def train_job(job: Job) -> None:
  """Train (or resume) ``job``; finished stages of a chain are skipped."""
  if job.chain:
    from fmdistill import main as main_lib
    main_lib.run(job.config, job.workdir, progress=False, evaluate=False)
  else:
    train.train_and_evaluate(job.config, job.workdir, progress=False)


def _source(config, entry, teacher, workdir):
  if entry.batch == "prior":
    return train.prior_source(config)
  if entry.needs_pairs:  # the run's own cache (already built while it trained)
    return teacher_lib.pair_source(config, teacher, workdir, progress=False)
  return train.make_source(config)


def step_cost(workdir: str, reps: int) -> dict:
  """One train step of the finished run in ``workdir`` (its config, network, teacher, parts
  and batch; the state re-initialised, at the run's last step so that every warmup and part
  schedule is on): compile seconds, compiled FLOPs and temporary bytes, and the median wall
  seconds of ``reps`` consecutive steps after a warm one. ``loops``: the step runs part
  updates in a ``scan``, whose body XLA's cost analysis counts once (FLOPs under-counted)."""
  jax.clear_caches()  # compile afresh: the run's step may be in this process's caches
  config = runs_lib.read_config(workdir)
  entry = objectives.entry(config.method)
  teacher = teacher_lib.load(config)
  source = _source(config, entry, teacher, workdir)
  net, st = train.initial_state(config, teacher, tuple(config.data_shape),
                                config.objective.num_classes,
                                teacher is not None and config.teacher.init_student)
  st = st.replace(step=jnp.asarray(int(config.train.steps), jnp.int32))
  fn = step_lib.make_train_step(config, net, teacher)
  batch = source.batch(0, config.train.batch_size, 0, 1)
  tparams = None if teacher is None else teacher.params
  compiled, stats = _common.compile_stats(fn, st, batch, tparams)
  holder = [st]

  def call():
    holder[0], metrics = compiled(holder[0], batch, tparams)  # the state is donated
    return metrics
  stats["step_s"] = _common.time_warm(call, reps)
  stats["loops"] = bool(entry.parts_for(config.objective))
  return stats


def sample_time(workdir: str, nfe: int, reps: int, which: str | None = None) -> dict:
  """Sampling ``eval.num_samples`` from the run in ``workdir`` at ``nfe``: compile seconds
  (lowering + XLA, apart) and the median wall seconds of ``reps`` warm compiled calls."""
  config = runs_lib.read_config(workdir)
  run = teacher_lib.load_sampling_run(workdir, which or config.eval.which)
  fn = evaluate.sampler_fn(run.config, run.net, int(config.eval.num_samples), nfe)
  key = jax.random.PRNGKey(0)
  jax.clear_caches()  # the evaluation compiled this sampler already: compile afresh
  t0 = time.perf_counter()
  compiled = fn.lower(run.params, key).compile()
  compile_s = time.perf_counter() - t0
  return dict(compile_s=compile_s, run_s=_common.time_warm(lambda: compiled(run.params, key),
                                                            reps))
