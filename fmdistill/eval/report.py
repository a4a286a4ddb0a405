"""Quality-vs-NFE evaluation of finished runs: ``metrics.json``, ``report.md`` and PNGs."""
from __future__ import annotations

import json
import os
import sys
import time

import jax

from fmdistill import data, flowmap, objectives, paths, runs as runs_lib, tblog
from fmdistill import teacher as teacher_lib
from fmdistill.eval import classifier, evaluate, fid as fid_lib, plots, straightness


def _classifier(config, workdir: str) -> classifier.Classifier | None:
  """The data classifier for labelled image data (cached in ``workdir``), else ``None``."""
  if len(config.data_shape) != 3:
    return None
  dcfg = config.data.copy_and_resolve_references()
  dcfg.conditional = True
  src = data.make_source(dcfg, config.seed)
  if src.num_classes == 0:
    return None
  return classifier.train_classifier(src, steps=config.eval.classifier_steps,
                                     cache=os.path.join(workdir, "classifier.npz"))


def _fid(config, source, workdir: str):
  """``samples -> Inception FID`` against the dataset's reference statistics (cached in
  ``workdir``) when ``eval.inception_weights`` names a weight file, else ``None``."""
  path = config.eval.get("inception_weights", "")
  if not path:
    return None
  features = fid_lib.feature_fn(fid_lib.load_params(path),
                                batch=config.eval.get("fid_batch", 50))
  d = config.data
  name = d.tfds_name if d.name == "tfds" else f"{d.name}{d.num_examples}"
  n = min(source.size, config.eval.get("fid_reference_num", 50_000))
  cache = os.path.join(workdir, fid_lib.stats_key(name, d.split if d.name == "tfds" else "all",
                                                  n, fid_lib.file_sha256(path)))
  mu, sigma = fid_lib.reference_stats(lambda idx: source.get(idx)["x"], source.size, features,
                                      cache, max_examples=n)
  return fid_lib.fid_fn(features, mu, sigma)


def evaluate_runs(runs: dict[str, str], out_dir: str, *, seed: int = 0,
                  evals: dict | None = None, guidance: float = 1.0) -> dict:
  """Evaluate each named run directory; write figures and ``metrics.json`` into ``out_dir``.

  Flow-matching runs (``sampler='ode'``) are sampled at ``eval.teacher_nfe`` with
  ``eval.solver``; flow-map students at ``eval.student_nfe`` jumps along a uniform grid;
  ``guidance``: the classifier-free guidance scale (``evaluate.generate``).
  ``evals`` (``{name: eval section}``, e.g. from the command line) replaces the eval section a
  run was trained with. Each run is evaluated at its newest good checkpoint; the result and
  the report name that step and whether the run is finished (an unfinished run also gets a
  one-line warning). Nothing is written if a run is missing.

  Every figure is the mean over ``eval.references`` held-out data samples
  (``evaluate.references``; a finite dataset has two), with its ``[min, max]`` over them in
  ``runs[name]['range'][nfe]``; the floor (``noise_floor``) is the mean over every pair of them,
  its ``[min, max]`` in ``noise_floor_range``. All runs are scored against the same samples.
  With ``eval.draws = K > 1`` each model's figure is also the mean over K sample draws (keys
  ``evaluate.draw_key(seed, d)``; draw 0 is the one-draw figure's and the one plotted), the
  range spans every draw and reference, ``runs[name]['draw_std'][nfe]`` holds the standard
  deviation over draws and ``runs[name]['draw_values'][nfe]`` each draw's figures (draw ``d``
  of every run starts from the same noise).
  """
  stored = {name: runs_lib.read_config(wd) for name, wd in runs.items()}  # before any write
  ecfg = {name: (evals or {}).get(name) or stored[name].eval for name in runs}
  os.makedirs(out_dir, exist_ok=True)
  name0 = next(iter(runs))
  first = stored[name0]
  source = data.make_source(first.data, first.seed)
  n = ecfg[name0].num_samples
  with first.unlocked():
    first.eval = ecfg[name0]
  clf = _classifier(first, out_dir)
  fid = _fid(first, source, out_dir)
  refs = evaluate.references(source, n, int(ecfg[name0].get("references", 4)))
  reference = refs[0]
  memo = {}  # the references' self-terms and feature statistics, computed once for all runs
  floor, floor_span = evaluate.floor(refs, clf, fid, memo)
  result = {"noise_floor": floor, "noise_floor_range": floor_span, "references": len(refs),
            "num_samples": int(len(reference)), "runs": {}}
  if clf is not None:
    result["classifier_accuracy"] = clf.accuracy
  curves = {}
  for name, wd in runs.items():
    run = teacher_lib.load_sampling_run(wd, ecfg[name].which)
    config, net, params = run.config, run.net, run.params
    with config.unlocked():
      config.eval = ecfg[name]
    if not run.finished:
      print(f"warning: run {name!r} in {wd} is unfinished; evaluating its checkpoint at "
            f"{run.describe()}", file=sys.stderr)
    sampler = objectives.entry(config.method).sampler
    nfes = config.eval.teacher_nfe if sampler == "ode" else config.eval.student_nfe
    per_nfe, spans, stds, values, panels = {}, {}, {}, {}, {}
    draws = int(config.eval.get("draws", 1))
    for nfe in nfes:
      t0 = time.time()
      sample = lambda d, nfe=nfe: evaluate.generate(
          config, net, params, evaluate.draw_key(seed, d), len(reference), nfe,
          guidance=guidance)
      q, spans[int(nfe)], per_draw, x = evaluate.scores_over_draws(sample, draws, refs, clf,
                                                                      fid, memo)
      q["seconds"] = time.time() - t0
      per_nfe[int(nfe)] = q
      if per_draw:
        stds[int(nfe)], values[int(nfe)] = evaluate.draw_std(per_draw), per_draw
      panels[f"{name} {nfe} NFE"] = x
    plots.samples_figure(panels, os.path.join(out_dir, f"samples_{name}.png"),
                         reference=reference,
                         title=f"{name} ({config.method}), {run.describe()}")
    per = objectives.evals_per_jump(config)  # network evaluations per sampling step
    result["runs"][name] = {"method": config.method, "sampler": sampler, "workdir": wd,
                            "step": run.step, "steps": run.steps, "finished": run.finished,
                            "which": run.which, "nfe": per_nfe, "range": spans,
                            "draws": draws, "evals_per_jump": per}
    if stds:
      result["runs"][name].update(draw_std=stds, draw_values=values)
    if sampler == "ode":  # ReFlow rounds, teachers: how straight the learned flow is
      result["runs"][name]["straightness"] = ode_straightness(config, net, params, seed,
                                                              len(reference))
    curves[name + (f" ({per} evals per step)" if per > 1 else "")] = {
        k * per: v["sliced_w2"] for k, v in per_nfe.items()}
  plots.quality_figure(curves, floor["sliced_w2"], "sliced W2",
                       os.path.join(out_dir, "quality_vs_nfe.png"))
  with open(os.path.join(out_dir, "metrics.json"), "w") as f:
    json.dump(result, f, indent=1)
  return result


def to_tensorboard(result: dict, name: str, out_dir: str) -> None:
  """``evaluate_runs``'s figures for run ``name`` appended to its TensorBoard files at its
  checkpoint step: ``report/<figure>_nfe<n>``, ``report/floor_<figure>``,
  ``report/straightness`` (velocity models) and the image ``report/samples`` (the
  ``samples_<name>.png`` written into ``out_dir``)."""
  r = result["runs"][name]
  record = {f"report/{k}_nfe{nfe}": v for nfe, q in r["nfe"].items() for k, v in q.items()
            if k != "seconds"}
  record.update({f"report/floor_{k}": v for k, v in result["noise_floor"].items()})
  if "straightness" in r:
    record["report/straightness"] = r["straightness"]
  tb = tblog.TBLog(os.path.join(r["workdir"], tblog.DIR), 0)
  tb.scalars(record, r["step"])
  if tb.active:
    with open(os.path.join(out_dir, f"samples_{name}.png"), "rb") as f:
      tb.image("report/samples", f.read(), r["step"])
  tb.close()


def ode_straightness(config, net, params, seed: int, n: int, steps: int = 64) -> float:
  """``S(Z)`` (``eval.straightness``) of a velocity model's flow from ``n`` noise samples along
  its ``steps``-step Euler trajectory (unconditional; with labels, random classes)."""
  o = config.objective
  path = paths.get_path(o.path, o.sigma_d)
  param = flowmap.Parameterization(o.param, o.sigma_d)
  kx, kc = jax.random.split(jax.random.PRNGKey(seed + 7))
  x = path.sigma(jax.numpy.float32(path.T)) * jax.random.normal(
      kx, (n,) + tuple(config.data_shape))
  cond = jax.random.randint(kc, (n,), 0, o.num_classes) if o.num_classes else None
  v = lambda x_, t_: param.velocity(net, params, x_, t_, cond)
  return float(jax.jit(lambda x_: straightness.straightness(v, x_, path.T, steps))(x))


def markdown(result: dict, title: str, extra: str = "") -> str:
  """A readable report of ``evaluate_runs``'s result (figures referenced by file name)."""
  floor = result["noise_floor"]
  keys = list(floor)
  nref = result.get("references", 1)
  span = result.get("noise_floor_range", {})
  lines = [f"# {title}", "", extra, "",
           f"Samples per evaluation: {result['num_samples']}. Every figure is a distance to "
           "held-out data (lower is better)" + (
               f", the mean over {nref} independent held-out samples" if nref > 1 else "") +
           "; the **floor** row is the same distance between two independent data samples of "
           "the same size" + (" (the two samples)" if nref == 2 else
                              f" (mean over the {nref * (nref - 1) // 2} pairs of those samples, "
                              "min–max in brackets)" if nref > 2 else "") +
           " — no model can be expected to go below it." + _draws_sentence(result), ""]
  for name, r in result["runs"].items():
    if "step" in r:
      lines.append(f"- Run `{name}`: weights `{r['which']}` of checkpoint step {r['step']} of "
                   f"{r['steps']}" + (" (finished)." if r["finished"] else
                                      " — **unfinished run**."))
  lines.append("")
  if "classifier_accuracy" in result:
    lines += [f"FD uses features of a classifier trained on the data "
              f"(accuracy {result['classifier_accuracy']:.3f}); `coverage_max_dev` is the largest "
              "|fraction of samples the classifier assigns to a class - 1/C|, `coverage_low` the "
              "number of classes given under half their uniform share.", ""]
  if "fid" in floor:
    lines += ["`fid`: Inception FID against the dataset's reference statistics (the floor row: "
              "held-out data, which the statistics may include).", ""]
  lines += ["| run | method | NFE | " + " | ".join(keys) + " | seconds |",
            "|---|---|---|" + "---|" * (len(keys) + 1)]
  fl = lambda m: f"{floor[m]:.4g}" + (f" ({span[m][0]:.4g}–{span[m][1]:.4g})"
                                      if m in span and span[m][0] != span[m][1] else "")
  lines.append("| data vs data (floor) | | | " + " | ".join(fl(m) for m in keys) + " | |")
  for name, r in result["runs"].items():
    for nfe, q in r["nfe"].items():
      std = r.get("draw_std", {}).get(nfe, {})
      cell = lambda k: f"{q[k]:.4g}" + (f" ± {std[k]:.2g}" if k in std else "")
      per = r.get("evals_per_jump", 1)  # network evaluations per sampling step
      lines.append(f"| {name} | {r['method']} | {nfe}"
                   + (f" ({nfe * per} evaluations)" if per > 1 else "") + " | "
                   + " | ".join(cell(k) for k in keys) + f" | {q['seconds']:.2f} |")
  straight = {n: r["straightness"] for n, r in result["runs"].items() if "straightness" in r}
  if straight:
    lines += ["", "Straightness `S(Z) = int E||(Z_1 - Z_0) - dZ_t/dt||^2 dt` of each velocity "
              "model's flow (64 Euler steps from noise; 0 = straight lines, one Euler step "
              "exact):", "", "| run | S(Z) |", "|---|---|"]
    lines += [f"| {n} | {v:.4g} |" for n, v in straight.items()]
  lines += ["", "![quality vs NFE](quality_vs_nfe.png)", ""]
  for name in result["runs"]:
    lines += [f"![{name} samples](samples_{name}.png)", ""]
  return "\n".join(lines)


def _draws_sentence(result: dict) -> str:
  """How many sample draws of each model its figures average (empty when every run has one)."""
  draws = {name: r.get("draws", 1) for name, r in result["runs"].items()}
  if set(draws.values()) <= {1}:
    return ""
  if len(set(draws.values())) == 1:
    k = next(iter(draws.values()))
    return (f" Each model's figure is also the mean over {k} sample draws of the model "
            "(± the standard deviation over draws; `seconds` covers all of them).")
  per = ", ".join(f"`{n}` {k}" for n, k in draws.items())
  return (f" Each model's figure is also the mean over its sample draws ({per}; ± the standard "
          "deviation over draws; `seconds` covers all of them).")
