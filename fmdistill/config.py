"""The shape of an experiment config, and its validation.

``base(method)`` gives every field with a default; ``experiments/<dataset>.py`` files start
from it and override (``parse_arg`` reads their big_vision-style ``method,key=value`` strings;
``chain`` builds multi-stage configs). ``validate`` turns a bad value into one line naming the
field and the accepted values, before anything is written to the workdir.
"""
from __future__ import annotations

import ast
import math
import os

import jax
import ml_collections

from fmdistill import flowmap, models, objectives, parallel, paths, sampling, state as state_lib
from fmdistill.objectives import _common as objective_fields
from fmdistill import data as data_lib
from fmdistill.data import toy
from fmdistill import errors
from fmdistill.errors import ConfigError

_DATA = dict(name="toy", toy="checkerboard", num_examples=4096, conditional=False,
             tfds_name="", data_dir="", split="train", image_key="image", label_key="label",
             num_classes=0)
_MODEL = dict(name="mlp", width=256, depth=3, dtype="float32", patch=2, heads=4,
              mlp_ratio=4.0, attn_impl="auto", time_embedding="positional", time_scale=1.0,
              native_param="", native_path="", native_sigma_d=0.0, qk_norm=False,
              modulation="adn", guidance_embed=False, guidance_interval=False)
_TRAIN = dict(steps=2000, batch_size=256, lr=1e-3, warmup_steps=100, schedule="cosine",
              final_lr=0.05, b1=0.9, b2=0.999, weight_decay=0.0, grad_clip=1.0,
              ema_decays=(0.999,), ema_power=(), ema_rampup=0.05, log_every=100,
              ckpt_every=500, keep=2, eval_every=0, max_consecutive_skips=50, tensorboard=True)
_TEACHER = dict(workdir="", stage="", which="ema_0.999", guidance=1.0, init_student=True,
                pair_cache="", pair_num=16384, pair_chunk=4096, pair_solver="heun", pair_nfe=64,
                guidance_interval=(), allow_unfinished=False)
# the optimiser and schedule of a trainable part (``config.parts.<name>``; objectives.Part)
_PART = dict(lr=1e-3, schedule="constant", warmup_steps=0, final_lr=0.05, b1=0.9, b2=0.999,
             weight_decay=0.0, grad_clip=1.0, every=1, updates=1, start=0, ema_decay=0.0)
_EVAL = dict(num_samples=2000, teacher_nfe=(1, 2, 4, 8, 64), student_nfe=(1, 2, 4),
             solver="euler", gamma=0.0, which="ema_0.999", classifier_steps=600,
             inception_weights="", fid_reference_num=50_000, fid_batch=50,
             guidance_interval=(), references=4, draws=1)


def base(method: str) -> ml_collections.ConfigDict:
  """A complete config for ``method`` with library defaults."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.method = method
  c.objective = objectives.default_config(method)
  c.data = ml_collections.ConfigDict(_DATA)
  c.model = ml_collections.ConfigDict(_MODEL)
  c.train = ml_collections.ConfigDict(_TRAIN)
  if c.objective.target_ema.startswith("ema_"):  # a method whose theta^- is an EMA keeps it
    c.train.ema_decays = tuple(sorted({*c.train.ema_decays, float(c.objective.target_ema[4:])}))
  c.parts = ml_collections.ConfigDict()
  for name, part in objectives.entry(method).parts.items():
    c.parts[name] = ml_collections.ConfigDict(dict(
        _PART, every=part.every, updates=part.updates, start=part.start,
        ema_decay=part.ema_decay, **dict(part.optimizer)))
  c.teacher = ml_collections.ConfigDict(_TEACHER)
  c.eval = ml_collections.ConfigDict(_EVAL)
  c.eval.gamma = objectives.entry(method).eval_gamma
  o = c.objective
  if o.get("rollout_times") == "uniform":  # a generator trained on one fixed k-step grid only
    # (DMD/DMD2/VSD/SiD, ``rollout_steps = k``): other step counts query times it never saw
    c.eval.student_nfe = tuple(n for n in c.eval.student_nfe if o.rollout_steps % n == 0)
  c.mesh = parallel.mesh_config()
  return c


def parse_arg(arg: str | None, **knobs) -> ml_collections.ConfigDict:
  """A big_vision-style config string ``'method,key=value,...'`` as a ConfigDict.

  The first item is the method (or variant) name, stored as ``method`` (``knobs['method']`` is
  the default when ``arg`` is empty); every ``key=value`` must name one of ``knobs`` and is
  parsed as a Python literal of the knob's type (strings may be bare). Unknown keys and
  unparsable values raise ``ConfigError`` naming the known keys.
  """
  out = ml_collections.ConfigDict(knobs)
  items = [a for a in (arg or "").split(",") if a.strip()]
  if items and "=" not in items[0]:
    out.method = items.pop(0).strip()
  for item in items:
    if "=" not in item:
      raise ConfigError(f"config string item {item!r} is not key=value; known keys: "
                        f"{sorted(knobs)}")
    k, v = (a.strip() for a in item.split("=", 1))
    if k not in knobs:
      raise ConfigError(f"config string key {k!r} is unknown; known keys: {sorted(knobs)}")
    kind = type(knobs[k])
    try:
      value = v if kind is str else ast.literal_eval(v)
      value = kind(value) if kind in (int, float, bool) and not isinstance(value, kind) else value
    except (ValueError, SyntaxError):
      raise ConfigError(f"config string {k}={v!r} is not a {kind.__name__}") from None
    out[k] = value
  return out


def chain(stages: list[tuple[str, ml_collections.ConfigDict]],
          description: str = "") -> ml_collections.ConfigDict:
  """A multi-stage config: stages run in order, each in ``<workdir>/<name>``; a stage whose
  method needs a teacher and names none (``teacher.workdir`` empty) distils the stage named by
  its ``teacher.stage``, or the previous stage. A finished stage is skipped on rerun."""
  c = ml_collections.ConfigDict()
  c.description = description
  c.stage_order = tuple(name for name, _ in stages)
  c.stages = ml_collections.ConfigDict()
  for name, cfg in stages:
    c.stages[name] = cfg
  return c


def _check(ok: bool, field: str, value, accepted) -> None:
  if not ok:
    raise errors.invalid(field, value, accepted)


def _int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def _ints(v, low: int = 1) -> bool:
  """A non-empty tuple/list of integers ``>= low``."""
  return isinstance(v, (tuple, list)) and len(v) > 0 and all(_int(n) and n >= low for n in v)


def validate(c: ml_collections.ConfigDict) -> None:
  """Raise ``ConfigError`` with one line naming the first bad field."""
  _check_finite(c, "")
  _check(c.method in objectives.names(), "method", c.method, objectives.names())
  _check(_int(c.seed) and 0 <= c.seed < 2 ** 31 - 1, "seed", c.seed,
         "an integer in [0, 2**31 - 1)")
  try:
    objectives.entry(c.method).defaults().update(c.objective)
  except (KeyError, AttributeError, TypeError) as e:
    raise ConfigError(f"config.objective does not fit method {c.method!r}: {e}") from None
  o = c.objective
  if objectives.entry(c.method).check is not None:
    objectives.entry(c.method).check(c)
  bad = objective_fields.field_problem(o)  # fields shared by methods (e.g. num_classes)
  if bad:
    raise bad
  _check(o.path in paths.PATHS, "objective.path", o.path, sorted(paths.PATHS))
  _check(o.param in flowmap.PARAMETERIZATIONS, "objective.param", o.param,
         list(flowmap.PARAMETERIZATIONS))
  _check(o.sigma_d > 0, "objective.sigma_d", o.sigma_d, "> 0")
  _check(o.time_sampler in paths.TIME_SAMPLERS, "objective.time_sampler",
         o.time_sampler, sorted(paths.TIME_SAMPLERS))
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
  _check(c.model.time_embedding in models.TIME_EMBEDDINGS, "model.time_embedding",
         c.model.time_embedding, list(models.TIME_EMBEDDINGS))
  _check(c.model.time_scale > 0, "model.time_scale", c.model.time_scale, "> 0")
  _check(c.model.get("modulation", "film") in models.MODULATIONS, "model.modulation",
         c.model.get("modulation"), list(models.MODULATIONS))
  if c.model.native_param or c.model.native_path:
    _check(c.model.native_param in flowmap.PARAMETERIZATIONS, "model.native_param",
           c.model.native_param, list(flowmap.PARAMETERIZATIONS))
    _check(c.model.native_path in paths.PATHS, "model.native_path", c.model.native_path,
           sorted(paths.PATHS))
  entry = objectives.entry(c.method)
  _check(set(c.parts) == set(entry.parts), "parts", sorted(c.parts),
         f"the parts of {c.method!r}: {sorted(entry.parts)}")
  for name in c.parts:
    p = c.parts[name]
    for field in ("every", "updates"):
      _check(p[field] >= 1, f"parts.{name}.{field}", p[field], "a positive integer")
    _check(p.start >= 0, f"parts.{name}.start", p.start, ">= 0")
    _check(0 <= p.ema_decay < 1, f"parts.{name}.ema_decay", p.ema_decay, "[0, 1) (0 = off)")
    if entry.parts[name].joint:
      _check(p.every == 1 and p.updates == 1 and p.start == 0, f"parts.{name}", p,
             "every=1, updates=1, start=0 (a part trained jointly with the student)")
  sections = [("train", c.train)] + [(f"parts.{n}", c.parts[n]) for n in c.parts]
  for section, t in sections:
    if section == "train":
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
  _check(all(0 < d < 1 for d in c.train.ema_decays), "train.ema_decays", c.train.ema_decays,
         "decays in (0, 1)")
  _check(0 <= c.train.ema_rampup < 1, "train.ema_rampup", c.train.ema_rampup,
         "in [0, 1) (EDM's ema_rampup_ratio; 0 = plain EMA)")
  _check(all(isinstance(g, (int, float)) and not isinstance(g, bool) and g > 0
             for g in c.train.ema_power), "train.ema_power", c.train.ema_power,
         "power-EMA exponents gamma > 0 (EDM2)")
  emas = state_lib.ema_names(c.train)
  _check(not o.target_ema or o.target_ema in emas, "objective.target_ema", o.target_ema,
         f"'' (theta^- = stopgrad(theta)) or an EMA the run keeps: {emas} (train.ema_decays)")
  mesh = parallel.mesh_shape(c.mesh, jax.device_count())
  shards = mesh[0] * mesh[1]
  _check(c.train.batch_size % shards == 0, "train.batch_size", c.train.batch_size,
         f"a multiple of the data x fsdp = {shards} batch shards of config.mesh")
  _check(c.train.batch_size % jax.process_count() == 0, "train.batch_size",
         c.train.batch_size, f"a multiple of the process count {jax.process_count()}")
  for i, rule in enumerate(c.mesh.rules):
    _check(len(rule) == 2 and isinstance(rule[0], str), f"mesh.rules[{i}]", rule,
           "(regex, spec) pairs, spec a tuple of mesh axes/None or 'fsdp'")
  _check(c.data.name in data_lib.DATASETS, "data.name", c.data.name, sorted(data_lib.DATASETS))
  if c.data.name == "toy":
    _check(c.data.toy in toy.TOYS, "data.toy", c.data.toy, sorted(toy.TOYS))
    _check(c.model.name == "mlp", "model.name", c.model.name, "'mlp' for 2-D toy data")
  else:
    _check(c.model.name == "dit", "model.name", c.model.name, "'dit' for image data")
  if c.data.name in ("shapes", "scenes"):
    _check(_int(c.data.num_examples) and c.data.num_examples >= 2, "data.num_examples",
           c.data.num_examples, "an integer >= 2")
  _validate_eval(c)
  _check(0 <= c.eval.gamma <= 1, "eval.gamma", c.eval.gamma, "[0, 1]")
  _check(c.eval.solver in sampling.SOLVERS, "eval.solver", c.eval.solver,
         list(sampling.SOLVERS))
  for name in ("pair_num", "pair_chunk", "pair_nfe"):
    _check(_int(c.teacher[name]) and c.teacher[name] > 0, f"teacher.{name}", c.teacher[name],
           "a positive integer")
  _check(c.teacher.which == "params" or c.teacher.which.startswith(("ema_", "power_")),
         "teacher.which", c.teacher.which, "'params' or an EMA name such as 'ema_0.999'")
  _check(c.teacher.pair_solver in sampling.SOLVERS, "teacher.pair_solver",
         c.teacher.pair_solver, list(sampling.SOLVERS))
  _check(c.teacher.guidance >= 0, "teacher.guidance", c.teacher.guidance, ">= 0")
  for section in ("teacher", "eval"):
    gi = tuple(c[section].get("guidance_interval", ()))
    _check(not gi or (len(gi) == 2 and 0 <= gi[0] < gi[1] <= 1),
           f"{section}.guidance_interval", gi,
           "() or (lo, hi) with 0 <= lo < hi <= 1 (fractions of T)")
  if c.objective.get("guidance_input", False):
    _check(c.model.get("guidance_embed", False), "model.guidance_embed",
           c.model.get("guidance_embed", False),
           "True when objective.guidance_input=True (the student takes the scale as an input)")
  if c.objective.get("guidance_interval_input", False):
    _check(c.model.get("guidance_interval", False), "model.guidance_interval",
           c.model.get("guidance_interval", False), "True when objective.guidance_interval_input"
           "=True (the student takes the guidance interval as an input)")
  if c.model.get("guidance_interval", False):
    _check(c.model.get("guidance_embed", False), "model.guidance_embed",
           c.model.get("guidance_embed", False), "True when model.guidance_interval=True")


def _validate_eval(c: ml_collections.ConfigDict) -> None:
  e = c.eval
  _check(_int(e.num_samples) and e.num_samples >= 2, "eval.num_samples", e.num_samples,
         "an integer >= 2")
  for name in ("teacher_nfe", "student_nfe"):
    _check(_ints(e[name]), f"eval.{name}", e[name], "a non-empty tuple of positive integers")
  _check(_int(e.get("references", 2)) and e.get("references", 2) >= 2, "eval.references",
         e.get("references"), "an integer >= 2 (held-out samples each figure is averaged over; "
         "the floor uses every pair of them)")
  _check(_int(e.get("draws", 1)) and e.get("draws", 1) >= 1, "eval.draws", e.get("draws"),
         "a positive integer (sample draws of each model its figures are averaged over)")
  _check(_int(e.classifier_steps) and e.classifier_steps >= 1, "eval.classifier_steps",
         e.classifier_steps, "a positive integer")
  w = e.get("inception_weights", "")
  _check(isinstance(w, str) and (not w or os.path.isfile(w)), "eval.inception_weights", w,
         "'' or a local InceptionV3 weight file (.npz/.pkl; fmdistill/eval/fid.py: layout)")
  _check(not w or c.data.name != "toy", "eval.inception_weights", w, "'' for 2-D toy data")
  _check(_int(e.get("fid_reference_num", 2)) and e.get("fid_reference_num", 2) >= 2,
         "eval.fid_reference_num", e.get("fid_reference_num"), "an integer >= 2")
  _check(_int(e.get("fid_batch", 1)) and e.get("fid_batch", 1) >= 1, "eval.fid_batch",
         e.get("fid_batch"), "a positive integer")
  kept = ["params"] + state_lib.ema_names(c.train)
  _check(e.which in kept, "eval.which", e.which, f"the weights this run keeps: {kept} (EMAs "
         "come from train.ema_decays and train.ema_power)")


def _check_finite(c, prefix: str) -> None:
  """Every float anywhere in the config is finite (``train.lr=inf`` is refused)."""
  for k, v in c.items():
    name = f"{prefix}{k}"
    if isinstance(v, ml_collections.ConfigDict):
      _check_finite(v, name + ".")
    elif isinstance(v, float):
      _check(math.isfinite(v), name, v, "a finite number")
    elif isinstance(v, (tuple, list)):
      for x in _leaves(v):
        _check(not isinstance(x, float) or math.isfinite(x), name, v, "finite numbers")


def _leaves(v):
  for x in v:
    if isinstance(x, (tuple, list)):
      yield from _leaves(x)
    else:
      yield x
