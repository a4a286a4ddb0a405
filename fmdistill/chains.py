"""Multi-stage recipes as stage chains (``config.chain``; ``fmdistill.main`` runs them, each stage
in ``<workdir>/<stage>``, a finished stage skipped and a killed one resumed on rerun).

* ``reflow``: teacher -> ``reflow_1`` -> ... -> ``reflow_R`` [-> ``distill``]. Round ``k`` caches
  (noise, ODE endpoint) pairs of round ``k - 1`` (its own ``pairs/``, resumable) and runs flow
  matching on them (``objectives/reflow.py``), starting from round ``k - 1``'s weights; the
  optional last stage distils the last round into a 1-step map on its endpoint pairs
  (``direct_distill`` with ``pairs='endpoints'``: the InstaFlow recipe, L2 instead of LPIPS).
* ``progressive``: teacher -> ``pd_{start/2}`` -> ... -> ``pd_{end}``. Stage ``pd_N`` samples in
  ``N`` steps and matches two steps of its teacher (the velocity teacher for the first stage,
  then the previous stage, a flow map), starting from the teacher's weights
  (``objectives/progressive.py``).

``teacher`` is either the teacher stage's config (trained as stage ``'teacher'``) or the workdir
of a finished flow-matching run (no teacher stage; the first stage distils it).
"""
from __future__ import annotations

from typing import Callable

import ml_collections

from fmdistill import config as config_lib
from fmdistill.errors import ConfigError

Config = ml_collections.ConfigDict


def _first(teacher: Config | str) -> list[tuple[str, Config]]:
  if isinstance(teacher, str):
    if not teacher:
      raise ConfigError("a chain's teacher is an empty workdir; give a config or a finished run")
    return []
  return [("teacher", teacher)]


def _external(stages: list, teacher: Config | str) -> None:
  """Point the first student stage at an external teacher run."""
  if isinstance(teacher, str):
    stages[0][1].teacher.workdir = teacher


def reflow(teacher: Config | str, make_round: Callable[[int], Config], rounds: int,
           distill: Config | None = None, description: str = "") -> Config:
  """``rounds`` ReFlow rounds (``make_round(k)``: the config of round ``k``, method
  ``'reflow'``), then optionally ``distill`` (a ``direct_distill`` config; its pairs are set to
  the endpoints)."""
  if rounds < 1:
    raise ConfigError(f"a ReFlow chain needs rounds >= 1, got {rounds}")
  stages = []
  for k in range(1, rounds + 1):
    c = make_round(k)
    if c.method != "reflow":
      raise ConfigError(f"ReFlow round {k}: config.method={c.method!r}; accepted: 'reflow'")
    stages.append((f"reflow_{k}", c))
  if distill is not None:
    if distill.method != "direct_distill":
      raise ConfigError(f"the ReFlow distill stage: config.method={distill.method!r}; "
                        "accepted: 'direct_distill'")
    distill.objective.update(pairs="endpoints", pair_steps=1)
    stages.append(("distill", distill))
  _external(stages, teacher)
  return config_lib.chain(_first(teacher) + stages, description)


def halvings(start: int, end: int) -> list[int]:
  """The student step counts ``start/2, start/4, ..., end`` of a progressive chain."""
  ratio = start // end if end >= 1 else 0
  if end < 1 or start < 2 * end or start % end or ratio & (ratio - 1):
    raise ConfigError(f"progressive distillation halves the teacher's steps start={start} down "
                      f"to end={end}: accepted end >= 1 and start = end * 2^k, k >= 1")
  out, n = [], start // 2
  while n >= end:
    out.append(n)
    n //= 2
  return out


def progressive(teacher: Config | str, make_stage: Callable[[int], Config], start: int,
                end: int = 1, description: str = "") -> Config:
  """Stages ``pd_N`` for ``N = start/2, ..., end`` (``make_stage(N)``: a ``'progressive'``
  config; ``objective.student_steps`` is set to ``N`` and ``N`` added to the evaluated NFEs)."""
  stages = []
  for n in halvings(start, end):
    c = make_stage(n)
    if c.method != "progressive":
      raise ConfigError(f"progressive stage pd_{n}: config.method={c.method!r}; accepted: "
                        "'progressive'")
    c.objective.student_steps = n
    c.eval.student_nfe = tuple(sorted(set(c.eval.student_nfe) | {n}))
    stages.append((f"pd_{n}", c))
  _external(stages, teacher)
  return config_lib.chain(_first(teacher) + stages, description)
