"""The leaderboard's arithmetic and its outputs (``benchmarks/leaderboard.py`` measures).

Pure functions over plain dicts, so the numbers in the table, the CSV and the plot are the ones
``fmdistill.eval.report.evaluate_runs`` computed:

* ``evals[seed]``: ``{'floor': {metric: v}, 'runs': {name: {'method', 'step', 'steps',
  'nfe': {nfe: {metric: v}}}}}`` (the teacher is the run named ``'teacher'``);
* ``costs[name]``: ``{'step_s', 'flops', 'temp_bytes', 'compile_s', 'loops'}`` (one train step);
* ``times[(name, nfe)]``: ``{'run_s', 'compile_s'}`` (sampling ``num_samples`` at ``nfe``).
"""
from __future__ import annotations

import csv
import math

import numpy as np

from fmdistill.eval import plots

TEACHER = "teacher"
REFERENCE = 64  # the teacher NFE students are compared with (its largest if it has no 64)


def metric_of(floor: dict) -> str:
  """The headline figure: the classifier Fréchet distance for images, else sliced W2."""
  return "fd" if "fd" in floor else "sliced_w2"


def matched_nfe(teacher: dict[int, float], quality: float) -> int | None:
  """The smallest teacher NFE whose figure is at least as good (``<=``) as ``quality``, or
  ``None`` when no teacher NFE reaches it (or ``quality`` is not finite)."""
  if not math.isfinite(quality):
    return None
  ok = [n for n, q in teacher.items() if math.isfinite(q) and q <= quality]
  return min(ok) if ok else None


def speedup(teacher: dict[int, float], quality: float, student_s: float,
            teacher_s: dict[int, float]) -> tuple[int | None, float | None]:
  """``(matched teacher NFE, teacher seconds at it / student seconds)`` for a student of figure
  ``quality`` sampling in ``student_s``; ``(None, None)`` when not matched."""
  n = matched_nfe(teacher, quality)
  if n is None or n not in teacher_s:
    return n, None
  return n, teacher_s[n] / student_s


def mean_std(values: list[float]) -> tuple[float, float]:
  """Mean and sample standard deviation (``nan`` for one value)."""
  a = np.asarray(values, float)
  return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else float("nan")


def curve(evals: dict, name: str, metric: str, nfe: int) -> list[float]:
  """The figure of run ``name`` at ``nfe`` for each seed that has it."""
  out = []
  for e in evals.values():
    r = e["runs"].get(name)
    if r is not None and nfe in r["nfe"]:
      out.append(float(r["nfe"][nfe][metric]))
  return out


def teacher_curve(evals: dict, metric: str) -> dict[int, float]:
  """``{nfe: mean figure over seeds}`` of the teacher."""
  nfes = sorted({n for e in evals.values() for n in e["runs"][TEACHER]["nfe"]})
  return {n: mean_std(curve(evals, TEACHER, metric, n))[0] for n in nfes}


def reference_nfe(evals: dict) -> int:
  """``REFERENCE`` if the teacher was evaluated there, else its largest NFE."""
  nfes = {n for e in evals.values() for n in e["runs"][TEACHER]["nfe"]}
  return REFERENCE if REFERENCE in nfes else max(nfes)


def student_rows(evals: dict, metric: str, nfes=(1, 2, 4)) -> list[dict]:
  """One dict per student run: ``q[nfe]`` and ``ratio[nfe]`` (figure / the teacher's
  ``reference_nfe`` figure of the same seed) as ``(mean, std)`` over seeds."""
  ref = reference_nfe(evals)
  names = [n for n in next(iter(evals.values()))["runs"] if n != TEACHER]
  rows = []
  for name in names:
    r0 = next(e["runs"][name] for e in evals.values() if name in e["runs"])
    row = dict(name=name, method=r0["method"], steps=r0["steps"], seeds=0, q={}, ratio={},
               evals_per_jump=int(r0.get("evals_per_jump", 1)))
    for nfe in nfes:
      qs, ratios = [], []
      for e in evals.values():
        r, t = e["runs"].get(name), e["runs"][TEACHER]["nfe"].get(ref)
        if r is None or nfe not in r["nfe"]:
          continue
        qs.append(float(r["nfe"][nfe][metric]))
        if t is not None:
          ratios.append(qs[-1] / float(t[metric]))
      if qs:
        row["q"][nfe] = mean_std(qs)
        row["seeds"] = max(row["seeds"], len(qs))
      if ratios:
        row["ratio"][nfe] = mean_std(ratios)
    rows.append(row)
  return rows


def fmt(ms: tuple[float, float] | None, spec: str = ".4g") -> str:
  """``'0.0932'`` or ``'0.0932 ± 0.0011'`` (with a standard deviation), ``'–'`` if absent."""
  if ms is None:
    return "–"
  m, s = ms
  return f"{m:{spec}}" + ("" if math.isnan(s) else f" ± {s:{spec}}")


def _rel(costs: dict, name: str, key: str) -> float | None:
  c, ref = costs.get(name), costs.get(TEACHER)
  if c is None or ref is None or not ref.get(key):
    return None
  return c[key] / ref[key]


def quality_table(rows: list[dict], metric: str, ref: int = REFERENCE) -> list[str]:
  lines = [f"| student | method | train steps | {metric} 1 NFE | 2 NFE | 4 NFE | 1 NFE / "
           f"teacher@{ref} | 2 NFE / teacher@{ref} | 4 NFE / teacher@{ref} |",
           "|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    q = [fmt(r["q"].get(n)) for n in (1, 2, 4)]
    x = [fmt(r["ratio"].get(n), ".2f") for n in (1, 2, 4)]
    lines.append(f"| {marked(r)} | {r['method']} | {r['steps']} | " + " | ".join(q + x) + " |")
  return lines + jump_note(rows)


MARK = " ‡"  # a row whose "NFE" counts jumps of more than one network evaluation each


def marked(r: dict) -> str:
  """``r['name']``, with ``MARK`` when its steps are more than one network evaluation each."""
  return r["name"] + (MARK if r.get("evals_per_jump", 1) > 1 else "")


def jump_note(rows: list[dict]) -> list[str]:
  """The footnote of the rows marked ``MARK`` (none when no row samples through its teacher)."""
  k = sorted({r.get("evals_per_jump", 1) for r in rows} - {1})
  if not k:
    return []
  return ["", f"‡ samples through its frozen teacher: each step (\"NFE\" here) is "
          f"{' or '.join(map(str, k))} network evaluations (the teacher's velocity and the "
          "student's correction); the sampling times below are measured, so its speedups "
          "include that cost."]


def cost_table(rows: list[dict], costs: dict) -> list[str]:
  lines = ["| run | ms/step | x FM | compile s | GFLOP/step | x FM | temp MiB | x FM |",
           "|---|---|---|---|---|---|---|---|"]
  for name in [TEACHER] + [r["name"] for r in rows]:
    c = costs.get(name)
    if c is None:
      continue
    f = lambda k: "–" if _rel(costs, name, k) is None else f"{_rel(costs, name, k):.2f}"
    flops = f"{c['flops'] / 1e9:.3g}" + (" †" if c.get("loops") else "")
    label = "teacher (flow matching)" if name == TEACHER else name
    lines.append(f"| {label} | {c['step_s'] * 1e3:.3g} | {f('step_s')} | {c['compile_s']:.1f} "
                 f"| {flops} | {f('flops')} | {c['temp_bytes'] / 2 ** 20:.3g} | "
                 f"{f('temp_bytes')} |")
  return lines


def speedups(rows: list[dict], teacher: dict[int, float], times: dict) -> list[dict]:
  """For each student at 1 and 2 NFE with a timing: matched teacher NFE and speedup. A student
  better than the teacher at every measured NFE has no match: its speedup is then the lower
  bound over the teacher at its largest NFE (``at_least`` = that NFE) when that was timed."""
  out = []
  tsec = {n: v["run_s"] for (name, n), v in times.items() if name == TEACHER}
  for r in rows:
    for nfe in (1, 2):
      t = times.get((r["name"], nfe))
      if t is None or nfe not in r["q"]:
        continue
      match, x = speedup(teacher, r["q"][nfe][0], t["run_s"], tsec)
      top = max(teacher) if teacher else None
      # better than the teacher at every NFE (a NaN figure matches nothing and bounds nothing)
      at_least = match is None and top in tsec and math.isfinite(r["q"][nfe][0])
      ref = top if at_least else match
      out.append(dict(name=r["name"], nfe=nfe, q=r["q"][nfe][0], matched=match,
                      evals_per_jump=r.get("evals_per_jump", 1),
                      speedup=tsec[top] / t["run_s"] if at_least else x,
                      at_least=top if at_least else None,
                      run_s=t["run_s"], compile_s=t["compile_s"],
                      teacher_s=tsec.get(ref), teacher_compile_s=(
                          times.get((TEACHER, ref)) or {}).get("compile_s")))
  return out


def speedup_table(items: list[dict]) -> list[str]:
  lines = ["| student | NFE | figure | matched teacher NFE | student ms | teacher ms | speedup "
           "| compile s (student / teacher) |", "|---|---|---|---|---|---|---|---|"]
  for s in items:
    s = dict(s, name=marked(s))
    if s.get("at_least"):
      lines.append(f"| {s['name']} | {s['nfe']} | {s['q']:.4g} | none: better than the teacher "
                   f"at every NFE up to {s['at_least']} | {s['run_s'] * 1e3:.3g} | "
                   f"{s['teacher_s'] * 1e3:.3g} (at {s['at_least']}) | > {s['speedup']:.1f}x | "
                   f"{s['compile_s']:.2f} / {s['teacher_compile_s']:.2f} |")
      continue
    if s["matched"] is None:
      lines.append(f"| {s['name']} | {s['nfe']} | {s['q']:.4g} | not matched | "
                   f"{s['run_s'] * 1e3:.3g} | – | – | {s['compile_s']:.2f} / – |")
      continue
    if s["speedup"] is None:  # matched, but that teacher NFE was not timed
      lines.append(f"| {s['name']} | {s['nfe']} | {s['q']:.4g} | {s['matched']} | "
                   f"{s['run_s'] * 1e3:.3g} | not timed | – | {s['compile_s']:.2f} / – |")
      continue
    tc = s["teacher_compile_s"]
    lines.append(f"| {s['name']} | {s['nfe']} | {s['q']:.4g} | {s['matched']} | "
                 f"{s['run_s'] * 1e3:.3g} | {s['teacher_s'] * 1e3:.3g} | {s['speedup']:.1f}x | "
                 f"{s['compile_s']:.2f} / {tc:.2f} |")
  return lines


def csv_rows(rows: list[dict], costs: dict, spd: list[dict]) -> list[dict]:
  """The summary CSV: one row per student (means, stds, cost ratios, speedups)."""
  out = []
  for r in rows:
    d = dict(name=r["name"], method=r["method"], train_steps=r["steps"], seeds=r["seeds"],
             evals_per_nfe=r.get("evals_per_jump", 1))
    for n in (1, 2, 4):
      for key, ms in ((f"q_nfe{n}", r["q"].get(n)), (f"ratio_nfe{n}", r["ratio"].get(n))):
        m, s = ms or (None, None)
        d[key], d[key + "_std"] = m, None if s is None or math.isnan(s) else s
    c = costs.get(r["name"], {})
    d.update(step_ms=c.get("step_s", 0) * 1e3 if c else None,
             step_x_fm=_rel(costs, r["name"], "step_s"),
             gflop=c.get("flops", 0) / 1e9 if c else None,
             gflop_x_fm=_rel(costs, r["name"], "flops"), flops_undercounted=c.get("loops"),
             temp_mib=c.get("temp_bytes", 0) / 2 ** 20 if c else None,
             temp_x_fm=_rel(costs, r["name"], "temp_bytes"))
    for s in spd:
      if s["name"] == r["name"]:
        d[f"matched_teacher_nfe_{s['nfe']}"] = s["matched"]
        d[f"speedup_nfe{s['nfe']}"] = s["speedup"]
        d[f"speedup_nfe{s['nfe']}_is_lower_bound"] = bool(s.get("at_least"))
    out.append(d)
  return out


def long_rows(evals: dict) -> list[dict]:
  """Every figure ``evaluate_runs`` returned: one CSV row per seed, run, NFE and metric
  (``draw_std``: its standard deviation over sample draws, empty for one draw)."""
  out = []
  for seed, e in sorted(evals.items()):
    for k, v in e["floor"].items():
      out.append(dict(seed=seed, run="floor", method="data", step="", nfe="", metric=k, value=v))
    for name, r in e["runs"].items():
      for nfe, q in sorted(r["nfe"].items()):
        std = r.get("draw_std", {}).get(nfe, {})
        for k, v in q.items():
          out.append(dict(seed=seed, run=name, method=r["method"], step=r["step"], nfe=nfe,
                          metric=k, value=v, draws=r.get("draws", 1), draw_std=std.get(k)))
  return out


def write_csv(rows: list[dict], path: str) -> None:
  keys = list(dict.fromkeys(k for r in rows for k in r))
  with open(path, "w", newline="") as f:
    w = csv.DictWriter(f, keys)
    w.writeheader()
    w.writerows([{k: "" if r.get(k) is None else (repr(r[k]) if isinstance(r[k], float)
                                                  else r[k]) for k in keys} for r in rows])


def plot(evals: dict, rows: list[dict], metric: str, path: str) -> None:
  """Quality vs network evaluations on log-log axes: the teacher's curve (black), every student
  at its NFEs times its ``evals_per_jump`` (error bars: std over seeds), the data-vs-data floor
  dashed; the legend beside the axes."""
  fig, ax = plots.plt.subplots(figsize=(7 + 2 * (len(rows) > 12), 4.5))
  t = teacher_curve(evals, metric)
  ax.plot(list(t), list(t.values()), "k-", lw=2.5, marker="s", label="teacher (Euler)")
  markers = "os^vD<>ph*"
  for i, r in enumerate(rows):
    nfes = sorted(r["q"])
    ys = [r["q"][n][0] for n in nfes]
    err = [0.0 if math.isnan(r["q"][n][1]) else r["q"][n][1] for n in nfes]
    k = r.get("evals_per_jump", 1)
    ax.errorbar([n * k for n in nfes], ys, yerr=err, marker=markers[i % len(markers)], ms=4,
                lw=1, capsize=2, color=f"C{i % 10}",
                label=r["name"] + (f" ({k} evals per step)" if k > 1 else ""))
  floor = mean_std([e["floor"][metric] for e in evals.values()])[0]
  ax.axhline(floor, ls="--", color="gray", label="data vs data (floor)")
  ax.set_xscale("log", base=2)
  ax.set_yscale("log")
  ax.set_xlabel("network evaluations")
  ax.set_ylabel(metric)
  ax.grid(alpha=0.3, which="both")
  ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0),
            ncol=1 + (len(rows) > 16))
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plots.plt.close(fig)
