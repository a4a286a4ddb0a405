"""Generate samples from a trained run and measure them against data, with noise floors."""
from __future__ import annotations

import functools
import hashlib
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from fmdistill import flowmap, objectives, paths, sampling
from fmdistill.eval import metrics

Array = jax.Array


def generate(config: ml_collections.ConfigDict, net: Any, params: Any, key: Array, n: int,
             nfe: int, *, sampler: str | None = None, guidance: float = 1.0,
             guidance_interval: tuple | None = None) -> np.ndarray:
  """``n`` samples with ``nfe`` network evaluations: ODE solve of the velocity
  (``sampler='ode'``, solver ``config.eval.solver``, classifier-free guidance ``guidance``) or
  multistep flow-map jumps; a student that takes the guidance scale as an input
  (``model.guidance_embed``) is given ``guidance`` (a student with a baked-in scale ignores
  it). ``guidance_interval = (lo, hi)`` (fractions of ``T``; default
  ``config.eval.guidance_interval``, ``()`` = everywhere): guidance only there -- an input of
  students built with ``model.guidance_interval``; for ODE teachers and other guidance-input
  students the scale is 1 at times outside it (per solver step / per jump start)."""
  fn = sampler_fn(config, net, n, nfe, sampler=sampler, guidance=guidance,
                  guidance_interval=guidance_interval)
  return np.asarray(fn(params, key))


def sampler_fn(config: ml_collections.ConfigDict, net: Any, n: int, nfe: int, *,
               sampler: str | None = None, guidance: float = 1.0,
               guidance_interval: tuple | None = None):
  """The jitted ``(params, key) -> n samples`` that ``generate`` calls (cached per setting;
  ``.lower(params, key).compile()`` to time its compilation apart from its runs)."""
  o = config.objective
  sampler = sampler or objectives.entry(config.method).sampler
  if objectives.samples_with_teacher(config) and not isinstance(net, objectives.SamplingNet):
    raise ValueError(f"this {config.method!r} run samples through its teacher; pass the network "
                     "of fmdistill.teacher.sampling_run(run) (or load_sampling_run), not the "
                     "raw one")
  if guidance_interval is None:
    guidance_interval = config.eval.get("guidance_interval", ())
  if isinstance(net, objectives.SamplingNet):
    net = net.without_weights()  # the cache's key keeps no teacher weights alive
  return _sampler_fn(net, tuple(config.data_shape), o.path, o.sigma_d, o.param, o.num_classes,
                     sampler, nfe, config.eval.solver, config.eval.gamma, guidance, n,
                     bool(config.model.get("guidance_embed", False)),
                     tuple(float(v) for v in guidance_interval),
                     bool(config.model.get("guidance_interval", False)))


@functools.lru_cache(maxsize=64)
def _sampler_fn(net, shape, path_name, sigma_d, param_name, num_classes, sampler, nfe, solver,
                gamma, guidance, n, guidance_input=False, interval=(), interval_input=False):
  path = paths.get_path(path_name, sigma_d)
  param = flowmap.Parameterization(param_name, sigma_d)

  @jax.jit
  def run(params, key):
    kx, kc, kg = jax.random.split(key, 3)
    x = path.sigma(jnp.float32(path.T)) * jax.random.normal(kx, (n,) + shape)
    cond = jax.random.randint(kc, (n,), 0, num_classes) if num_classes else None
    if sampler == "ode":
      v = flowmap.teacher_velocity(net, params, param, guidance=guidance,
                                   null_label=num_classes or None)
      steps = sampling.solver_steps_for_nfe(nfe, solver)
      vc = lambda x_, t_: v(x_, t_, cond)
      if interval and cond is not None and guidance != 1.0:
        vc = lambda x_, t_: v(x_, t_, flowmap.in_interval(cond, jnp.broadcast_to(t_, (n,)),
                                                          interval, path.T, guidance))
      return sampling.solve_ode(vc, x, sampling.time_grid(steps, path.T), solver)
    f = lambda x_, t_, s_: param.apply(net, params, x_, t_, s_, cond)
    if guidance_input and cond is not None:
      c = {"label": cond, "w": jnp.full((n,), guidance, jnp.float32)}
      if interval_input:
        c["interval"] = jnp.broadcast_to(jnp.asarray(interval or (0.0, 1.0), jnp.float32), (n, 2))
      f = lambda x_, t_, s_: param.apply(net, params, x_, t_, s_, c)
      if interval and not interval_input:  # the scale switches at each jump's start time
        f = lambda x_, t_, s_: param.apply(net, params, x_, t_, s_,
                                           flowmap.in_interval(c, t_, interval, path.T))
    return sampling.sample_flow_map(f, x, sampling.time_grid(nfe, path.T), path=path,
                                    gamma=gamma, key=kg)
  return run


def _memo(memo: dict | None, reference: np.ndarray, name: str, fn: Callable[[], Any]) -> Any:
  """``fn()``, kept in ``memo`` under ``reference``'s content (shape, dtype, SHA-1 of its bytes)
  and ``name``: the terms of a distance that depend on the reference alone are computed once
  for every model, NFE and draw scored against it, and a sample set's once for all the
  references it is scored against."""
  if memo is None:
    return fn()
  ref = np.ascontiguousarray(reference)
  key = (ref.shape, str(ref.dtype), hashlib.sha1(ref.tobytes()).hexdigest(), name)
  if key not in memo:
    memo[key] = fn()
  return memo[key]


def quality(samples: np.ndarray, reference: np.ndarray, clf=None, fid=None,
            memo: dict | None = None) -> dict:
  """Distances of ``samples`` to ``reference``: sliced W2 always; energy distance and MMD for
  vectors; for images with a classifier ``clf`` (``classifier.Classifier``), the Fréchet
  distance on its features and the per-class coverage of its predictions
  (``metrics.class_coverage``); ``fid``: a function ``samples -> Inception FID``
  (``fid.FID``) when Inception weights are given. ``memo``: a dict the caller keeps across
  calls with the same references (and classifier): the self-terms of each reference and each
  sample set and the references' feature statistics are computed once (the figures are the
  same to the last bit)."""
  out = {"sliced_w2": metrics.sliced_w2(samples, reference)}
  if samples.ndim == 2:
    own = lambda x, name, fn: _memo(memo, x, name, lambda: fn(x))  # noqa: E731
    out["energy"] = metrics.energy_distance(
        samples, reference, own(reference, "energy", metrics.energy_self),
        own(samples, "energy", metrics.energy_self))
    out["mmd"] = metrics.mmd_rbf(samples, reference,
                                 self_b=own(reference, "mmd", metrics.mmd_self),
                                 self_a=own(samples, "mmd", metrics.mmd_self))
  finite = bool(np.all(np.isfinite(samples)))
  if clf is not None:
    stats = _memo(memo, reference, "fd",
                  lambda: metrics.gaussian_stats(clf.features(reference)))
    out["fd"] = metrics.frechet_from_stats(*metrics.gaussian_stats(clf.features(samples)),
                                           *stats)
    out.update(metrics.class_coverage(clf.predict(samples), clf.num_classes))
  if fid is not None:
    out["fid"] = fid(samples) if finite else float("nan")
  if not finite:
    out = {k: float("nan") for k in out}
  return out


def references(source, n: int, k: int) -> list[np.ndarray]:
  """The held-out data samples of size ``n`` a figure is scored against:
  ``source.reference(n, i)`` for ``i < k``, capped at the draws the source has that differ
  (a finite dataset has two, its disjoint halves; a toy sampler any number). One draw moves
  sliced W2 at 2000 samples by up to +-30% (``benchmarks/metric_noise.py``)."""
  return [source.reference(n, i) for i in range(min(k, source.distinct_references))]


def mean_sliced_w2(samples: np.ndarray, refs: list[np.ndarray]) -> float:
  """Sliced W2 of ``samples`` to each of ``refs``, averaged (the figure ``scores`` reports, alone:
  no energy/MMD/classifier work)."""
  return float(np.mean([metrics.sliced_w2(samples, r) for r in refs]))


def _summary(qs: list[dict]) -> tuple[dict, dict]:
  """Per metric: the mean over ``qs``, and ``[min, max]``."""
  mean = {k: float(np.mean([q[k] for q in qs])) for k in qs[0]}
  span = {k: [float(np.min([q[k] for q in qs])), float(np.max([q[k] for q in qs]))]
          for k in qs[0]}
  return mean, span


def scores(samples: np.ndarray, refs: list[np.ndarray], clf=None,
           fid=None, memo: dict | None = None) -> tuple[dict, dict]:
  """``quality`` of ``samples`` against each of ``refs``: ``(mean, {metric: [min, max]})``.
  FID does not depend on the reference sample (it uses the dataset's statistics): computed
  once. ``memo``: as ``quality``'s."""
  mean, span = _summary([quality(samples, r, clf, memo=memo) for r in refs])
  if fid is not None:
    v = fid(samples) if np.all(np.isfinite(samples)) else float("nan")
    mean["fid"], span["fid"] = v, [v, v]
  return mean, span


def draw_key(seed: int, d: int) -> Array:
  """The sampling key of sample draw ``d`` of an evaluation with seed ``seed``:
  ``PRNGKey(seed + d)``. Draw 0 is the key a one-draw report uses; seed 0's draws are
  ``benchmarks/metric_noise.py --draws``'s keys 0..K-1 (seeds ``s`` and ``s + 1`` share
  noise for draws ``d + 1`` and ``d``: different models, the same starting points)."""
  return jax.random.PRNGKey(seed + d)


def scores_over_draws(sample: Callable[[int], np.ndarray], draws: int,
                      refs: list[np.ndarray], clf=None, fid=None,
                      memo: dict | None = None) -> tuple[dict, dict, dict, np.ndarray]:
  """``scores`` of ``draws`` sample sets (``sample(d)``, ``d < draws``) against ``refs``:
  ``(mean, span, per_draw, first)`` -- per metric the mean over draws of each draw's mean over
  ``refs``, ``[min, max]`` over every draw and reference, the list of the per-draw means
  (``{}`` for one draw), and draw 0's samples (the ones a report plots). The draw moves a figure
  as much as the reference does: at 2000 samples 16 draws of the moons teacher's sliced W2
  span 0.033-0.074 (``docs/leaderboard.md``, "The model's own sample draw"). ``memo``: as
  ``quality``'s (one is made for the draws if ``None``)."""
  if not (isinstance(draws, int) and draws >= 1):
    raise ValueError(f"draws must be a positive integer, got {draws!r}")
  memo = {} if memo is None else memo
  first, means, spans = None, [], []
  for d in range(draws):
    x = sample(d)
    first = x if first is None else first
    m, s = scores(x, refs, clf, fid, memo)
    means.append(m)
    spans.append(s)
  mean = {k: float(np.mean([m[k] for m in means])) for k in means[0]}
  span = {k: [min(s[k][0] for s in spans), max(s[k][1] for s in spans)] for k in spans[0]}
  per_draw = {k: [m[k] for m in means] for k in means[0]} if draws > 1 else {}
  return mean, span, per_draw, first


def draw_std(per_draw: dict) -> dict:
  """The standard deviation over draws (``ddof=1``) of each metric's per-draw figures."""
  return {k: float(np.std(v, ddof=1)) for k, v in per_draw.items()}


def floor(refs: list[np.ndarray], clf=None, fid=None,
          memo: dict | None = None) -> tuple[dict, dict]:
  """The data-vs-data noise floor: ``quality`` between every pair of ``refs`` (at least two),
  ``(mean, {metric: [min, max]})``; FID: each reference sample against the statistics.
  ``memo``: as ``quality``'s."""
  if len(refs) < 2:
    raise ValueError(f"the noise floor needs two reference samples, got {len(refs)}")
  pairs = [(a, b) for i, a in enumerate(refs) for b in refs[i + 1:]]
  mean, span = _summary([quality(a, b, clf, memo=memo) for a, b in pairs])
  if fid is not None:
    fm, fs = _summary([{"fid": fid(r)} for r in refs])
    mean.update(fm)
    span.update(fs)
  return mean, span


def noise_floor(source, n: int, clf=None, fid=None) -> dict:
  """``quality`` between two independent data samples of size ``n`` (references 0 and 1; for
  FID: the mean of both against the reference statistics)."""
  return floor(references(source, n, 2), clf, fid)[0]


def periodic_eval_fn(config, source, n: int = 1000):
  """The train loop's evaluation hook: sliced W2 to held-out data at the method's smallest
  evaluation NFE (flow-map students) or largest (ODE teachers), on ``config.eval.which``,
  the mean over the report's ``eval.references`` held-out samples (so with
  ``eval.num_samples = n`` the report gives the same number for the same checkpoint); the
  samples come back too (``samples_nfe<n>``: the loop draws them for TensorBoard)."""
  refs = references(source, n, int(config.eval.get("references", 4)))
  reference = refs[0]
  sampler = objectives.entry(config.method).sampler
  nfe = max(config.eval.teacher_nfe) if sampler == "ode" else min(config.eval.student_nfe)

  def fn(net, state):
    which = config.eval.which
    params = objectives.sampling_params(net, state.ema[which] if which in state.ema
                                        else state.params)
    x = generate(config, net, params, jax.random.PRNGKey(config.seed), len(reference), nfe)
    return {f"sliced_w2_nfe{nfe}": mean_sliced_w2(x, refs), f"samples_nfe{nfe}": x}
  return fn
