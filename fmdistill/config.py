"""The shape of an experiment config, and its validation.

``base(method)`` gives every field with a default; ``experiments/<dataset>.py`` files start
from it and override. ``validate`` turns a bad value into one line naming the field and the
accepted values, before anything is written to the workdir.
"""
from __future__ import annotations

import ml_collections

from fmdistill import flowmap, models, objectives, parallel, paths, sampling
from fmdistill.errors import ConfigError

_DATA = dict(name="toy", toy="checkerboard", num_examples=4096, conditional=False,
             tfds_name="", data_dir="", split="train", image_key="image", label_key="label",
             num_classes=0)
_MODEL = dict(name="mlp", width=256, depth=3, dtype="float32", patch=2, heads=4,
              mlp_ratio=4.0, attn_impl="auto", time_scale=1000.0, qk_norm=False)
_TRAIN = dict(steps=2000, batch_size=256, lr=1e-3, warmup_steps=100, schedule="cosine",
              final_lr=0.05, b1=0.9, b2=0.999, weight_decay=0.0, grad_clip=1.0,
              ema_decays=(0.999,), ema_power=(), log_every=100, ckpt_every=500, keep=2,
              eval_every=0, max_consecutive_skips=50)
_TEACHER = dict(workdir="", which="ema_0.999", guidance=1.0, init_student=True,
                pair_cache="", pair_num=16384, pair_chunk=4096, pair_solver="heun", pair_nfe=64)
_EVAL = dict(num_samples=2000, teacher_nfe=(1, 2, 4, 8, 64), student_nfe=(1, 2, 4),
             solver="euler", gamma=0.0, which="ema_0.999", classifier_steps=600)


def base(method: str) -> ml_collections.ConfigDict:
  """A complete config for ``method`` with library defaults."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.method = method
  c.objective = objectives.default_config(method)
  c.data = ml_collections.ConfigDict(_DATA)
  c.model = ml_collections.ConfigDict(_MODEL)
  c.train = ml_collections.ConfigDict(_TRAIN)
  c.critic = ml_collections.ConfigDict(_TRAIN)   # optimiser of an auxiliary network, if any
  c.teacher = ml_collections.ConfigDict(_TEACHER)
  c.eval = ml_collections.ConfigDict(_EVAL)
  c.mesh = parallel.mesh_config()
  return c


def _check(ok: bool, field: str, value, accepted) -> None:
  if not ok:
    raise ConfigError(f"config.{field}={value!r} is invalid; accepted: {accepted}")


def validate(c: ml_collections.ConfigDict) -> None:
  """Raise ``ConfigError`` with one line naming the first bad field."""
  _check(c.method in objectives.names(), "method", c.method, objectives.names())
  try:
    objectives.entry(c.method).defaults().update(c.objective)
  except (KeyError, AttributeError, TypeError) as e:
    raise ConfigError(f"config.objective does not fit method {c.method!r}: {e}") from None
  o = c.objective
  _check(o.path in paths.PATHS, "objective.path", o.path, sorted(paths.PATHS))
  _check(o.param in flowmap.PARAMETERIZATIONS, "objective.param", o.param,
         list(flowmap.PARAMETERIZATIONS))
  _check(o.sigma_d > 0, "objective.sigma_d", o.sigma_d, "> 0")
  _check(o.time_sampler in ("uniform", "logit_normal", "scm"), "objective.time_sampler",
         o.time_sampler, ["logit_normal", "scm", "uniform"])
  _check(0 <= o.label_dropout < 1, "objective.label_dropout", o.label_dropout, "[0, 1)")
  _check(c.model.name in models.MODELS, "model.name", c.model.name, list(models.MODELS))
  _check(c.model.dtype in models.DTYPES, "model.dtype", c.model.dtype, list(models.DTYPES))
  _check(c.model.attn_impl in ("auto", "xla", "pallas"), "model.attn_impl", c.model.attn_impl,
         ["auto", "pallas", "xla"])
  for name in ("width", "depth", "heads", "patch"):
    _check(c.model[name] > 0, f"model.{name}", c.model[name], "a positive integer")
  if c.model.name == "dit":
    _check(c.model.width % c.model.heads == 0, "model.heads", c.model.heads,
           f"a divisor of model.width={c.model.width}")
    _check(c.model.width % 4 == 0, "model.width", c.model.width,
           "a multiple of 4 (2-D sin/cos position embedding)")
  _check(c.model.mlp_ratio > 0, "model.mlp_ratio", c.model.mlp_ratio, "> 0")
  for section in ("train", "critic"):
    t = c[section]
    for name in ("steps", "batch_size", "log_every", "ckpt_every", "keep"):
      _check(t[name] > 0, f"{section}.{name}", t[name], "a positive integer")
    _check(t.lr > 0, f"{section}.lr", t.lr, "> 0")
    _check(t.grad_clip >= 0, f"{section}.grad_clip", t.grad_clip, ">= 0 (0 = off)")
    _check(0 <= t.b1 < 1 and 0 <= t.b2 < 1, f"{section}.b1/b2", (t.b1, t.b2), "in [0, 1)")
    _check(t.weight_decay >= 0, f"{section}.weight_decay", t.weight_decay, ">= 0")
    _check(0 <= t.final_lr <= 1, f"{section}.final_lr", t.final_lr, "a fraction in [0, 1]")
    _check(t.schedule in ("constant", "cosine"), f"{section}.schedule", t.schedule,
           ["constant", "cosine"])
    _check(t.warmup_steps >= 0, f"{section}.warmup_steps", t.warmup_steps, ">= 0")
    _check(all(0 < d < 1 for d in t.ema_decays), f"{section}.ema_decays", t.ema_decays,
           "decays in (0, 1)")
  import jax
  mesh = parallel.mesh_shape(c.mesh, jax.device_count())
  shards = mesh[0] * mesh[1]
  _check(c.train.batch_size % shards == 0, "train.batch_size", c.train.batch_size,
         f"a multiple of the data x fsdp = {shards} batch shards of config.mesh")
  _check(c.train.batch_size % jax.process_count() == 0, "train.batch_size",
         c.train.batch_size, f"a multiple of the process count {jax.process_count()}")
  for i, rule in enumerate(c.mesh.rules):
    _check(len(rule) == 2 and isinstance(rule[0], str), f"mesh.rules[{i}]", rule,
           "(regex, spec) pairs, spec a tuple of mesh axes/None or 'fsdp'")
  _check(c.data.name in ("toy", "digits", "shapes", "tfds"), "data.name", c.data.name,
         ["digits", "shapes", "tfds", "toy"])
  from fmdistill.data import toy
  if c.data.name == "toy":
    _check(c.data.toy in toy.TOYS, "data.toy", c.data.toy, sorted(toy.TOYS))
    _check(c.model.name == "mlp", "model.name", c.model.name, "'mlp' for 2-D toy data")
  else:
    _check(c.model.name == "dit", "model.name", c.model.name, "'dit' for image data")
  if c.data.name == "shapes":
    _check(c.data.num_examples >= 2, "data.num_examples", c.data.num_examples, ">= 2")
  _check(c.eval.num_samples >= 2, "eval.num_samples", c.eval.num_samples, ">= 2")
  _check(all(n >= 1 for n in tuple(c.eval.teacher_nfe) + tuple(c.eval.student_nfe)),
         "eval.teacher_nfe/student_nfe", (c.eval.teacher_nfe, c.eval.student_nfe),
         "positive integers")
  _check(0 <= c.eval.gamma <= 1, "eval.gamma", c.eval.gamma, "[0, 1]")
  _check(c.eval.solver in sampling.SOLVERS, "eval.solver", c.eval.solver,
         list(sampling.SOLVERS))
  _check(c.teacher.pair_solver in sampling.SOLVERS, "teacher.pair_solver",
         c.teacher.pair_solver, list(sampling.SOLVERS))
  _check(c.teacher.guidance >= 0, "teacher.guidance", c.teacher.guidance, ">= 0")
