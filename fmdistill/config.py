"""The shape of an experiment config, and its validation.

``base(method)`` gives every field with a default; ``experiments/<dataset>.py`` files start
from it and override. ``validate`` turns a bad value into one line naming the field and the
accepted values, before anything is written to the workdir.
"""
from __future__ import annotations

import ml_collections

from fmdistill import flowmap, models, objectives, paths, sampling

_DATA = dict(name="toy", toy="checkerboard", num_examples=4096, conditional=False,
             tfds_name="", data_dir="", split="train", image_key="image", label_key="label",
             num_classes=0)
_MODEL = dict(name="mlp", width=256, depth=3, dtype="float32", patch=2, heads=4,
              mlp_ratio=4.0, attn_impl="auto", time_scale=1000.0)
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
  return c


def _check(ok: bool, field: str, value, accepted) -> None:
  if not ok:
    raise ValueError(f"config.{field}={value!r} is invalid; accepted: {accepted}")


def validate(c: ml_collections.ConfigDict) -> None:
  """Raise ``ValueError`` with one line naming the first bad field."""
  _check(c.method in objectives.names(), "method", c.method, objectives.names())
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
  for section in ("train", "critic"):
    t = c[section]
    for name in ("steps", "batch_size", "log_every", "ckpt_every", "keep"):
      _check(t[name] > 0, f"{section}.{name}", t[name], "a positive integer")
    _check(t.lr > 0, f"{section}.lr", t.lr, "> 0")
    _check(t.schedule in ("constant", "cosine"), f"{section}.schedule", t.schedule,
           ["constant", "cosine"])
    _check(t.warmup_steps >= 0, f"{section}.warmup_steps", t.warmup_steps, ">= 0")
    _check(all(0 < d < 1 for d in t.ema_decays), f"{section}.ema_decays", t.ema_decays,
           "decays in (0, 1)")
  import jax
  _check(c.train.batch_size % jax.process_count() == 0, "train.batch_size",
         c.train.batch_size, f"a multiple of the process count {jax.process_count()}")
  _check(c.data.name in ("toy", "digits", "shapes", "tfds"), "data.name", c.data.name,
         ["digits", "shapes", "tfds", "toy"])
  _check(c.eval.solver in sampling.SOLVERS, "eval.solver", c.eval.solver,
         list(sampling.SOLVERS))
  _check(c.teacher.pair_solver in sampling.SOLVERS, "teacher.pair_solver",
         c.teacher.pair_solver, list(sampling.SOLVERS))
  _check(c.teacher.guidance >= 0, "teacher.guidance", c.teacher.guidance, ">= 0")
