r"""The entry point.

    python -m fmdistill.main --config experiments/toy2d.py:quickstart --workdir runs/quickstart
    python -m fmdistill.main --config experiments/toy2d.py:flow_matching --workdir runs/fm \
        --config.train.steps=5000 --config.train.lr=3e-4
    python -m fmdistill.main --config ... --workdir runs/fm --mode=eval
    python -m fmdistill.main --config ... --workdir runs/fm --mode=sample --nfe=1,2,4 --step=500
    python -m fmdistill.main --list                       # the methods, one line each
    python -m fmdistill.main --config experiments/toy2d.py:meanflow --show_config

Modes: ``train`` (train, then write the quality report), ``eval`` (report only) and ``sample``
(for each of ``--nfe=1,2,4`` a PNG of the samples, and all of them in one ``.npz``; from the
newest good checkpoint or ``--step``). ``--list`` and ``--show_config`` (the config with every
field, overrides applied) print and exit without a workdir.

A config with ``stages`` (a stage chain, e.g. the quickstart's teacher -> student, ReFlow
rounds, progressive halving) runs each stage in ``<workdir>/<stage>``; a stage whose method
needs a teacher and names no ``teacher.workdir`` distils the stage named by its
``teacher.stage``, or else the previous stage. A stage whose run is already finished is skipped
on rerun. Each stage logs ``metrics.jsonl`` and TensorBoard files (``fmdistill.tblog``) in its
workdir.

``--mode=eval`` and ``--mode=sample`` use the ``eval`` section of the config given on the
command line (overrides included), read the runs at their newest good checkpoint (``--mode=sample``:
or ``--step``), and name
that step (and whether the run is finished) in what they write. Errors are one line and exit
code 2; SIGTERM at any point ends the process with one line (exit 0), after saving a
checkpoint if it arrives during training.
"""
from __future__ import annotations

# SIGTERM first: a preemption that arrives while jax loads is then a flag, not rc 143
from fmdistill import preempt  # noqa: I001  (must come before the heavy imports)

if __name__ == "__main__":
  preempt.install()

import json  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
from typing import Sequence  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from fmdistill import config as config_lib, objectives, parallel, runs as runs_lib  # noqa: E402
from fmdistill import tblog, teacher as teacher_lib, train, workdir as workdir_lib  # noqa: E402
from fmdistill.errors import ConfigError, Preempted, one_line  # noqa: E402
from fmdistill.eval import evaluate as evaluate_lib, plots, report  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "experiment config file[:variant]")
_WORKDIR = flags.DEFINE_string("workdir", None, "directory for checkpoints, logs and reports")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval", "sample"], "what to do")


class _NfeParser(flags.ListParser):
  """``--nfe=1,2,4``: positive integers separated by commas."""

  def parse(self, argument):
    items = super().parse(argument)
    try:
      nfes = [int(a) for a in items]
    except ValueError:
      nfes = []
    if not nfes or min(nfes) < 1:
      raise ValueError("expected positive integers separated by commas, e.g. --nfe=1,2,4")
    return nfes

  def flag_type(self):
    return "list of positive integers"


_NFE = flags.DEFINE(_NfeParser(), "nfe", "1", "network evaluations per sample for "
                    "--mode=sample, one sample grid each: e.g. 1,2,4",
                    serializer=flags.CsvListSerializer(","))
_STEP = flags.DEFINE_integer("step", None, "the checkpoint step to sample (--mode=sample; "
                             "default: the newest good one)")
_LIST = flags.DEFINE_bool("list", False, "print the registered methods, one line each, and exit")
_SHOW = flags.DEFINE_bool("show_config", False, "print the config of --config with every field "
                          "(overrides applied) and exit")
_GUIDANCE = flags.DEFINE_float("guidance", 1.0, "classifier-free guidance scale for sampling and "
                               "the report: teachers (ODE) and students that take the scale as "
                               "an input (model.guidance_embed); baked-in students ignore it")
_PROGRESS = flags.DEFINE_bool("progress", True, "show a progress bar")
_EVAL = flags.DEFINE_bool("eval", True, "after training, evaluate and write report.md")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "move a workdir that holds a different "
                               "experiment aside (to <workdir>.replaced-<time>) and start fresh")
_ALLOW_CHANGE = flags.DEFINE_bool("allow_config_change", False, "resume a run with settings "
                                  "that differ from the ones it was started with (the changes "
                                  "are recorded in provenance.json)")


def stages(config) -> list[tuple[str, object]]:
  """``[(name, stage_config)]``: the stages of a chain config, or the config itself."""
  if "stages" not in config:
    return [("run", config)]
  order = tuple(config.get("stage_order", ())) or tuple(config.stages.keys())
  missing = [n for n in order if n not in config.stages]
  if missing:
    raise ConfigError(f"config.stage_order names stages that do not exist: {missing}; "
                      f"stages: {sorted(config.stages)}")
  return [(name, config.stages[name]) for name in order]


def resolve_teachers(steps: list[tuple[str, object]], workdir: str) -> dict[str, str]:
  """Point every stage that distils a teacher but names no ``teacher.workdir`` at its
  ``teacher.stage`` (or the previous stage); returns ``{stage: workdir}``."""
  dirs = {name: os.path.join(workdir, name) for name, _ in steps}
  seen = []
  for name, cfg in steps:
    wants = objectives.entry(cfg.method).needs_teacher or cfg.teacher.get("stage", "")
    if wants and not cfg.teacher.workdir:
      src = cfg.teacher.get("stage", "") or (seen[-1] if seen else "")
      if not src:
        raise ConfigError(f"stage {name!r} ({cfg.method}) needs a teacher but no earlier stage "
                          "trains one; set its teacher.workdir or teacher.stage")
      if src not in seen:
        raise ConfigError(f"stage {name!r}: teacher.stage={src!r} is not an earlier stage; "
                          f"earlier stages: {seen}")
      with cfg.unlocked():
        cfg.teacher.workdir = dirs[src]
    seen.append(name)
  return dirs


def run(config, workdir: str, mode: str = "train", nfe: int | Sequence[int] = 1,
        progress: bool = True, overwrite: bool = False, evaluate: bool = True,
        guidance: float = 1.0, allow_config_change: bool = False,
        step: int | None = None) -> dict:
  """Programmatic form of the command line; returns the evaluation result (or {}).
  ``nfe`` and ``step`` are for ``mode='sample'``."""
  steps = stages(config)
  chain = "stages" in config
  dirs = resolve_teachers(steps, workdir) if chain else {"run": workdir}
  if mode != "train":
    for name, cfg in steps:  # before anything is read or written
      if not os.path.isfile(os.path.join(dirs[name], "config.json")):
        raise FileNotFoundError(f"no run to {mode} at {dirs[name]!r} (no config.json there); "
                                "train it first")
      run_config = runs_lib.read_config(dirs[name])  # what is evaluated: the run as trained,
      with run_config.unlocked():                    # with this command's eval section
        run_config.eval, run_config.mesh = cfg.eval, cfg.mesh
      config_lib.validate(run_config)
  runs = {}
  for name, cfg in steps:
    wd = dirs[name]
    if mode == "train":
      preempt.check(f"before stage {name!r}" if chain else "")
      if (chain and not overwrite and runs_lib.is_finished(wd, cfg.train.steps)
          and workdir_lib.same_experiment(wd, cfg)):
        print(f"stage {name!r}: already finished in {wd}, skipping", file=sys.stderr)
      else:
        train.train_and_evaluate(cfg, wd, progress=progress, overwrite=overwrite,
                                 allow_config_change=allow_config_change)
    runs[name] = wd
  evals = {name: cfg.eval for name, cfg in steps}
  if mode == "sample":
    return _sample(runs, workdir, [nfe] if isinstance(nfe, int) else list(nfe), evals,
                   guidance, step)
  if not evaluate:
    return {}
  preempt.check("after training, before the evaluation")
  result = report.evaluate_runs(runs, workdir, evals=evals, guidance=guidance)
  if mode == "train" and jax.process_index() == 0:
    for name, cfg in steps:
      if cfg.train.get("tensorboard", True):
        report.to_tensorboard(result, name, workdir)
  title = f"fmdistill report: {workdir}"
  text = report.markdown(result, title, extra=config.get("description", ""))
  with open(os.path.join(workdir, "report.md"), "w") as f:
    f.write(text)
  return result


def _sample(runs: dict, workdir: str, nfes: list[int], evals: dict, guidance: float = 1.0,
            step: int | None = None) -> dict:
  """Samples of the last run at each of ``nfes`` (classifier-free guidance scale ``guidance``)
  from its newest good checkpoint or ``step``: ``samples_<run>_step<step>_nfe<n>.png`` per NFE,
  and ``samples_<run>_step<step>_nfe<n1>-<n2>.{npz,json}`` (the arrays, keyed ``nfe<n>``; the
  JSON names the run, its checkpoint step, whether it is finished, the weights and the scale).
  Every NFE starts from the same noise (``PRNGKey(config.seed)``), as the train-time
  evaluation does."""
  name, wd = list(runs.items())[-1]
  ecfg = evals[name]
  r = teacher_lib.load_sampling_run(wd, ecfg.which, step=step)
  config = r.config
  with config.unlocked():
    config.eval = ecfg
  if not r.finished:
    print(f"warning: run {name!r} in {wd} is unfinished; sampling its checkpoint at "
          f"{r.describe()}", file=sys.stderr)
  base = os.path.join(workdir, f"samples_{name}_step{r.step}")
  samples = {}
  for nfe in nfes:
    x = evaluate_lib.generate(config, r.net, r.params, jax.random.PRNGKey(config.seed),
                              ecfg.num_samples, nfe, guidance=guidance)
    plots.samples_figure({f"{name} {nfe} NFE, {r.describe()}": x}, f"{base}_nfe{nfe}.png")
    samples[f"nfe{nfe}"] = x
  base += "_nfe" + "-".join(map(str, nfes))
  np.savez(base + ".npz", **samples)
  info = dict(run=name, workdir=wd, method=config.method, step=r.step, steps=r.steps,
              finished=r.finished, which=r.which, nfe=nfes, guidance=float(guidance),
              num_samples=int(ecfg.num_samples), seed=int(config.seed))
  with open(base + ".json", "w") as f:
    json.dump(info, f, indent=1)
  print(f"wrote {ecfg.num_samples} samples of {name!r} ({r.describe()}, {r.which}) at NFE "
        f"{','.join(map(str, nfes))} to {base}.npz (+ .json, a .png per NFE)")
  return {"path": base + ".npz", **info}


def list_methods() -> str:
  """``--list``: every registered method and the first line of its description."""
  names = objectives.names()
  width = max(map(len, names))
  doc = lambda n: (objectives.entry(n).doc.strip().splitlines() or [""])[0]
  return "\n".join(f"{n:<{width}}  {doc(n)}" for n in names)


def show_config(config) -> str:
  """``--show_config``: every field of ``config`` (references resolved, overrides applied), one
  ``field = value`` line each, in the syntax of a ``--config.<field>=<value>`` override."""
  def walk(d, prefix):
    for k, v in d.items():
      if isinstance(v, dict):
        yield from walk(v, f"{prefix}{k}.") if v else [f"{prefix}{k} = {{}}"]
      else:
        yield f"{prefix}{k} = {v!r}"
  return "\n".join(walk(config.copy_and_resolve_references().to_dict(), ""))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.ERROR)
  if _LIST.value:
    print(list_methods())
    return
  needed = ["config"] + ([] if _SHOW.value else ["workdir"])
  missing = [f"--{n}" for n in needed if flags.FLAGS[n].value is None]
  if missing:
    _fail(f"{' and '.join(missing)} must be given (see --help; --list needs neither)")
  if _SHOW.value:
    print(show_config(_CONFIG.value))
    return
  if _STEP.value is not None and _MODE.value != "sample":
    _fail(f"--step={_STEP.value} is for --mode=sample (this is --mode={_MODE.value})")
  try:
    preempt.check()
    parallel.initialize()  # multi-process jobs: before anything touches the devices
    run(_CONFIG.value, _WORKDIR.value, _MODE.value, _NFE.value, _PROGRESS.value,
        _OVERWRITE.value, _EVAL.value, guidance=_GUIDANCE.value,
        allow_config_change=_ALLOW_CHANGE.value, step=_STEP.value)
  except Preempted as e:
    print(str(e), file=sys.stderr)
    sys.exit(0)
  except (ValueError, OSError, FloatingPointError) as e:  # OSError: FileNotFoundError, ...
    _fail(one_line(e))
  if _EVAL.value and _MODE.value != "sample":
    print(f"done: see {os.path.join(_WORKDIR.value, 'report.md')}")


def _fail(message: str) -> None:
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing that reports a bad ``--config`` or ``--config.*`` in one line."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    lines = [l for l in str(e).splitlines() if l.strip()]
    # a config file that raised: keep the flag and the exception line, drop the traceback
    msg = lines[0] + (" " + lines[-1] if len(lines) > 1 else "")
    print(f"error: {msg}", file=sys.stderr)
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    text = str(e).replace("\\'", "'").replace("\\n", " ")
    field = re.search(r"'(\w+)'", text)
    hint = re.search(r'Did you mean "(\w+)"', text)
    name = field.group(1) if field else "?"
    flag = next((a.split("=")[0] for a in argv if a.startswith("--config.")
                 and a.split("=")[0].endswith("." + name)), "--config")
    print(f"error: {flag}: unknown config field {name!r}"
          + (f" (did you mean {hint.group(1)!r}?)" if hint else ""), file=sys.stderr)
  sys.exit(2)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
