"""Objective registry: config name -> pure loss, with the method's traits and trainable parts.

Every loss has the signature (DESIGN.md)::

    loss(params, batch, key, *, net, teacher, ema_params, step, cfg, **parts) -> (scalar, metrics)

* ``net(params, x, t, s, cond)``: the raw student network (the flow map is
  ``cfg.param``'s ``c_skip x + c_out F``, see ``fmdistill.flowmap``).
* ``teacher(x, t, s, cond)``: the frozen teacher network with its params (and guidance) bound,
  or ``None``; its velocity is ``teacher(x, t, t, cond)``.
* ``ema_params``: the target parameters ``theta^-`` chosen by the method's config.
* ``cfg``: the method's own ``ConfigDict`` (``default_config(name)`` gives its defaults).
* ``**parts``: one keyword per trainable part the entry declares (``Part``): a part trained by
  its own loss arrives frozen (bound to its network if it has one, e.g. ``critic(x, t, cond)``),
  a part trained jointly by this loss arrives as its live parameters (e.g. sCM's ``weighting``).

Each family module in this package calls ``register`` at import; every module here is imported
by ``_load_all``, so adding a method touches one file (and one experiment config entry).
"""
from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from typing import Any, Callable

import ml_collections

Loss = Callable[..., tuple[Any, dict]]


@dataclasses.dataclass(frozen=True)
class PartContext:
  """What a part's ``init`` / ``network`` builder may use.

  ``config``: the full run config; ``net``: the student network; ``params``: the student's
  initial parameters (after teacher initialisation); ``teacher_params``: the frozen teacher's
  (or ``None``); ``teacher_fn(params, x, t, cond)``: the teacher's architecture as a velocity on
  the student's path, differentiable in ``params`` (or ``None`` without a teacher);
  ``teacher``: the loaded ``fmdistill.teacher.Teacher`` (network, parameterisation, path), for
  parts that need more of its architecture than the velocity (a critic's features).
  """
  config: Any
  net: Any
  params: Any
  teacher_params: Any = None
  teacher_fn: Callable | None = None
  teacher: Any = None


@dataclasses.dataclass(frozen=True)
class Part:
  """An extra trainable network or parameter set that a method owns (DESIGN.md "parts").

  * ``init``: ``'teacher'`` (a copy of the teacher's weights), ``'student'`` (a copy of the
    student's initial weights) or ``init(key, ctx: PartContext) -> params`` (fresh).
  * ``network``: how the part is called: ``'teacher'`` (``ctx.teacher_fn``: the teacher's
    architecture as a velocity ``v(params, x, t, cond)``), ``'student'`` (the student network
    ``F(params, x, t, s, cond)``), ``network(ctx) -> apply(params, ...)``, or ``None`` (the
    losses use the raw parameters). An ``apply`` with a ``bind(params)`` method is frozen for
    the student loss by it (instead of ``functools.partial``), e.g. to expose features too.
  * ``loss``: ``loss(part_params, student_params, batch, key, *, net, apply, teacher, parts,
    step, cfg) -> (scalar, metrics)``, the part's own objective (``apply`` its network,
    ``parts`` the other parts frozen); ``None`` means the part is trained **jointly** by the
    student loss (its gradient in the part), like sCM's learned weighting.
  * Schedule defaults (config ``parts.<name>.every/updates/start``): the part is updated
    ``updates`` times on every student step ``k`` with ``k % every == 0`` and ``k >= start``,
    ``order='before'`` or ``'after'`` the student's update (joint parts: with it).
  * ``optimizer``: overrides of the optimiser section ``config.parts.<name>`` (lr, schedule,
    betas, ...); ``ema_decay > 0`` keeps an EMA of the part.
  * ``enabled(cfg) -> bool`` on the method's config (e.g. only with ``adaptive_weight``).
  """
  init: Any
  network: Any = None
  loss: Loss | None = None
  every: int = 1
  updates: int = 1
  start: int = 0
  order: str = "before"
  optimizer: tuple = ()   # ((field, value), ...): hashable overrides of the part's optimiser
  ema_decay: float = 0.0
  enabled: Callable[[ml_collections.ConfigDict], bool] | None = None

  @property
  def joint(self) -> bool:
    return self.loss is None

  def is_enabled(self, cfg: ml_collections.ConfigDict) -> bool:
    return self.enabled is None or bool(self.enabled(cfg))


@dataclasses.dataclass(frozen=True)
class Objective:
  """A registered method and its traits.

  * ``needs_teacher``: distils a frozen teacher (``config.teacher.workdir`` or a chain stage).
  * ``teacher_kinds``: the kinds of teacher run the loss can use (``fmdistill.teacher.kind_of``):
    ``'velocity'`` (a flow-matching run, called as ``teacher(x, t, t, cond)``), ``'flowmap'`` (a
    flow-map student, bound as ``flowmap.FlowMapTeacher``: ``teacher.jump(x, t, s, cond)``), or
    ``'consistency'`` (a map to ``s = 0`` only). Any other kind is refused before training.
  * ``batch``: ``'data'``, ``'teacher_pairs'`` (a cache of teacher ODE trajectories) or
    ``'prior'`` (data-free: ``{'z': N(0, I), 'cond'}`` shaped like the teacher's data, no
    dataset opened; ``fmdistill.data.prior``).
  * ``parts``: ``{name: Part}``, the extra trainable things (critics, discriminators, learned
    weightings).
  * ``sampler``: how the trained network samples: ``'flowmap'`` jumps or ``'ode'`` (velocity).
  * ``tangent``: the loss uses ``jax.jvp`` time derivatives of the network (needs a smooth time
    embedding; tangent warmup where the method has one).
  * ``consistency``: the map is trained to ``s = 0`` only, so multistep sampling denoises to 0
    and re-noises (``eval_gamma = 1``: consistency multistep); otherwise flow-map jumps
    (``eval_gamma = 0``).
  * ``samples_with_teacher(cfg) -> bool``: whether a run with method config ``cfg`` samples
    through its frozen teacher, i.e. the trained network alone is not the flow map
    (second-order flow-map matching, ``order = 2``: ``G = v + (s - t) NN`` with the teacher's
    velocity ``v``); each jump then costs two network evaluations. ``None``: never.
  * ``sampling_net(net, teacher, cfg) -> g``: what the sampler evaluates for such a run,
    ``g(params, teacher_params, x, t, s, cond)``, where ``teacher(teacher_params, x, t, s,
    cond)`` is the run's frozen teacher. Called only when ``samples_with_teacher``; wrapped
    in a ``SamplingNet`` (the teacher's weights travel as an argument).
  * ``check(config)``: the method's own config checks, run by ``config.validate`` before
    anything is written (raise ``fmdistill.errors.ConfigError`` naming the field), or ``None``.
  """
  name: str
  loss: Loss
  defaults: Callable[[], ml_collections.ConfigDict]
  needs_teacher: bool = False
  teacher_kinds: tuple = ("velocity",)
  batch: str = "data"
  parts: dict = dataclasses.field(default_factory=dict)
  sampler: str = "flowmap"
  tangent: bool = False
  consistency: bool = False
  check: Callable[[ml_collections.ConfigDict], None] | None = None
  samples_with_teacher: Callable[[ml_collections.ConfigDict], bool] | None = None
  sampling_net: Callable[[Any, Callable[[], Any], ml_collections.ConfigDict], Any] | None = None
  doc: str = ""

  @property
  def needs_pairs(self) -> bool:
    return self.batch == "teacher_pairs"

  @property
  def eval_gamma(self) -> float:
    return 1.0 if self.consistency else 0.0

  def parts_for(self, cfg: ml_collections.ConfigDict) -> dict[str, Part]:
    """The parts enabled by the method config ``cfg``."""
    return {k: p for k, p in self.parts.items() if p.is_enabled(cfg)}

  def __hash__(self):
    return hash(self.name)


BATCHES = ("data", "teacher_pairs", "prior")
_REGISTRY: dict[str, Objective] = {}
_LOADED = False


def register(obj: Objective) -> Objective:
  if obj.name in _REGISTRY:
    raise ValueError(f"objective {obj.name!r} is registered twice")
  if obj.batch not in BATCHES:
    raise ValueError(f"{obj.name}: batch must be one of {BATCHES}, got {obj.batch!r}")
  if (obj.samples_with_teacher is None) != (obj.sampling_net is None):
    raise ValueError(f"{obj.name}: samples_with_teacher and sampling_net come together")
  for name, part in obj.parts.items():
    if part.order not in ("before", "after"):
      raise ValueError(f"{obj.name}: part {name!r} order must be 'before' or 'after'")
    if part.every < 1 or part.updates < 1 or part.start < 0:
      raise ValueError(f"{obj.name}: part {name!r} needs every >= 1, updates >= 1, start >= 0")
  _REGISTRY[obj.name] = obj
  return obj


def _load_all() -> None:
  global _LOADED
  if not _LOADED:
    _LOADED = True
    for mod in pkgutil.iter_modules(__path__):
      if not mod.name.startswith("_"):
        importlib.import_module(f"{__name__}.{mod.name}")


def names() -> list[str]:
  _load_all()
  return sorted(_REGISTRY)


def entry(name: str) -> Objective:
  _load_all()
  if name not in _REGISTRY:
    raise ValueError(f"unknown method {name!r}; known methods: {sorted(_REGISTRY)}")
  return _REGISTRY[name]


def get(name: str) -> Loss:
  """The loss function registered as ``name``."""
  return entry(name).loss


@dataclasses.dataclass(frozen=True)
class SamplingNet:
  """The network a run that samples through its frozen teacher is sampled with:
  ``net(params, x, t, s, cond)`` with ``params = {'student': ..., 'teacher': ...}``
  (``params_for``), so the teacher's weights reach a jitted sampler as an argument rather than
  as constants compiled into it (a large teacher would be copied into every program). Equal and
  hashed by ``fn`` alone: ``without_weights()`` is the same network for the samplers' caches,
  which so keep no teacher weights alive."""
  fn: Callable  # fn(student_params, teacher_params, x, t, s, cond); holds no weights
  teacher_params: Any = dataclasses.field(compare=False, repr=False)

  def without_weights(self) -> "SamplingNet":
    return dataclasses.replace(self, teacher_params=None)

  def __call__(self, params, x, t, s, cond=None):
    return self.fn(params["student"], params["teacher"], x, t, s, cond)

  def params_for(self, student_params: Any) -> dict:
    return {"student": student_params, "teacher": self.teacher_params}


def sampling_network(config: ml_collections.ConfigDict, net: Any,
                     teacher: Callable[[], tuple[Callable, Any]]) -> Any:
  """The network the sampler evaluates for a run of ``config`` (``Objective.sampling_net``):
  ``net`` itself for every method whose trained network is its flow map, else a
  ``SamplingNet`` (give it ``sampling_params``). ``teacher()`` returns the run's frozen
  teacher as ``(fn(teacher_params, x, t, s, cond), teacher_params)``; called only if needed."""
  if not samples_with_teacher(config):
    return net
  fn, teacher_params = teacher()
  return SamplingNet(entry(config.method).sampling_net(net, fn, config.objective),
                     teacher_params)


def sampling_params(net: Any, params: Any) -> Any:
  """The parameters ``net`` (from ``sampling_network``) samples with, given the student's."""
  return net.params_for(params) if isinstance(net, SamplingNet) else params


def samples_with_teacher(config: ml_collections.ConfigDict) -> bool:
  """Whether a run of ``config`` samples through its teacher (``Objective.samples_with_teacher``),
  so that its raw network alone is not its flow map."""
  e = entry(config.method)
  return bool(e.samples_with_teacher is not None and e.samples_with_teacher(config.objective))


def evals_per_jump(config: ml_collections.ConfigDict) -> int:
  """Network evaluations per sampling step of a run of ``config``: 2 for a run that samples
  through its teacher (one teacher and one student evaluation), else 1. The reports' "NFE" of a
  flow-map student counts jumps; this is what converts them into network evaluations."""
  return 2 if samples_with_teacher(config) else 1


def default_config(name: str) -> ml_collections.ConfigDict:
  """The method's own config fields with their defaults (a fresh copy)."""
  return entry(name).defaults()
