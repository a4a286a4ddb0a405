r"""The entry point.

    python -m fmdistill.main --config experiments/toy2d.py:quickstart --workdir runs/quickstart
    python -m fmdistill.main --config experiments/toy2d.py:flow_matching --workdir runs/fm \
        --config.train.steps=5000 --config.train.lr=3e-4
    python -m fmdistill.main --config ... --workdir runs/fm --mode=eval

Modes: ``train`` (train, then write the quality report), ``eval`` (report only) and ``sample``
(write ``samples.npy`` and a PNG for ``--nfe``). A config with ``stages`` (a stage chain, e.g.
the quickstart's teacher -> student, ReFlow rounds, progressive halving) runs each stage in
``<workdir>/<stage>``; a stage whose method needs a teacher and names no ``teacher.workdir``
distils the stage named by its ``teacher.stage``, or else the previous stage. A stage whose run
is already finished is skipped on rerun.
"""
from __future__ import annotations

import os
import re
import sys

import jax
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from fmdistill import objectives, parallel, runs as runs_lib, train, workdir as workdir_lib
from fmdistill.errors import ConfigError, Preempted
from fmdistill.eval import evaluate as evaluate_lib, plots, report

_CONFIG = config_flags.DEFINE_config_file("config", None, "experiment config file[:variant]")
_WORKDIR = flags.DEFINE_string("workdir", None, "directory for checkpoints, logs and reports")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval", "sample"], "what to do")
_NFE = flags.DEFINE_integer("nfe", 1, "network evaluations per sample, for --mode=sample")
_GUIDANCE = flags.DEFINE_float("guidance", 1.0, "classifier-free guidance scale for sampling and "
                               "the report: teachers (ODE) and students that take the scale as "
                               "an input (model.guidance_embed); baked-in students ignore it")
_PROGRESS = flags.DEFINE_bool("progress", True, "show a progress bar")
_EVAL = flags.DEFINE_bool("eval", True, "after training, evaluate and write report.md")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "move a workdir that holds a different "
                               "experiment aside (to <workdir>.replaced-<time>) and start fresh")
flags.mark_flags_as_required(["config", "workdir"])


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


def run(config, workdir: str, mode: str = "train", nfe: int = 1, progress: bool = True,
        overwrite: bool = False, evaluate: bool = True, guidance: float = 1.0) -> dict:
  """Programmatic form of the command line; returns the evaluation result (or {})."""
  steps = stages(config)
  chain = "stages" in config
  dirs = resolve_teachers(steps, workdir) if chain else {"run": workdir}
  runs = {}
  for name, cfg in steps:
    wd = dirs[name]
    if mode == "train":
      if (chain and not overwrite and runs_lib.is_finished(wd, cfg.train.steps)
          and workdir_lib.same_experiment(wd, cfg)):
        print(f"stage {name!r}: already finished in {wd}, skipping", file=sys.stderr)
      else:
        train.train_and_evaluate(cfg, wd, progress=progress, overwrite=overwrite)
    runs[name] = wd
  if mode == "sample":
    return _sample(runs, workdir, nfe, guidance)
  if not evaluate:
    return {}
  result = report.evaluate_runs(runs, workdir, guidance=guidance)
  title = f"fmdistill report: {workdir}"
  text = report.markdown(result, title, extra=config.get("description", ""))
  with open(os.path.join(workdir, "report.md"), "w") as f:
    f.write(text)
  return result


def _sample(runs: dict, workdir: str, nfe: int, guidance: float = 1.0) -> dict:
  name, wd = list(runs.items())[-1]
  config, net, params = runs_lib.load_params(wd, runs_lib.read_config(wd).eval.which)
  x = evaluate_lib.generate(config, net, params, jax.random.PRNGKey(config.seed),
                            config.eval.num_samples, nfe, guidance=guidance)
  np.save(os.path.join(workdir, f"samples_{name}_nfe{nfe}.npy"), x)
  plots.samples_figure({f"{name} {nfe} NFE": x}, os.path.join(workdir,
                                                              f"samples_{name}_nfe{nfe}.png"))
  return {"samples": x.shape}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.ERROR)
  parallel.initialize()  # multi-process jobs: before anything touches the devices
  try:
    run(_CONFIG.value, _WORKDIR.value, _MODE.value, _NFE.value, _PROGRESS.value,
        _OVERWRITE.value, _EVAL.value, guidance=_GUIDANCE.value)
  except Preempted as e:
    print(str(e), file=sys.stderr)
    sys.exit(0)
  except (ValueError, FileNotFoundError, FloatingPointError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  if _EVAL.value and _MODE.value != "sample":
    print(f"done: see {os.path.join(_WORKDIR.value, 'report.md')}")


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
