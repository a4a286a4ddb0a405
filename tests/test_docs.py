"""Every fenced code block in ``README.md`` and ``docs/*.md`` runs or is checked, so the docs
cannot rot.

* ```` ```python ```` blocks are **executed**, each in a fresh namespace, all in one
  subprocess (a block that registers a method does not leak into this process's registry).
* ```` ```bash ```` blocks are **checked**, not run: they are training runs and benchmarks of
  minutes to hours (and TPU-pod / GPU-cluster launches) that CI cannot afford. Each command is
  checked for what can rot without running it: ``python -m fmdistill.main`` commands are parsed
  with the entry point's own flags and config loader (the config file and string resolve, every
  ``--config.*`` override names an existing field of the right type, the resolved config — each
  stage of a chain — passes ``config.validate`` as on a machine with as many devices as its
  mesh names); ``python benchmarks/X.py ...`` commands parse
  their arguments with the script's own argparse parser (stopped before it measures anything);
  ``pytest`` commands name test files that exist; ``pip install`` names extras that
  ``setup.cfg`` defines; ``gcloud ... --command "..."`` is checked for the command it carries.
  Any other command fails the test.
* ```` ```text ```` blocks (recorded output, formulas) are neither, except that a recorded
  benchmark's ``command: python benchmarks/...`` line is checked like a shell command; a block
  without a language tag fails the test, so every block says which it is.
"""
import configparser
import copy
import glob
import json
import math
import os
import re
import shlex
import subprocess
import sys
from unittest import mock

import jax
import pytest

from conftest import ROOT

DOCS = ["README.md"] + sorted(os.path.relpath(p, ROOT)
                              for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))
EXECUTED, CHECKED, SKIPPED = ("python",), ("bash", "sh", "shell"), ("text", "console", "output")
FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```[ \t]*$", re.S | re.M)


def blocks() -> list[tuple[str, str, str]]:
  """``[(id 'file:line', language, body)]`` of every fenced block."""
  out = []
  for name in DOCS:
    with open(os.path.join(ROOT, name), encoding="utf-8") as f:
      text = f.read()
    for m in FENCE.finditer(text):
      line = text.count("\n", 0, m.start()) + 1
      out.append((f"{name}:{line}", m.group(1).strip(), m.group(2)))
  return out


BLOCKS = blocks()
IDS = [b[0] for b in BLOCKS]


def test_every_block_says_what_it_is():
  bad = [f"{i} ({lang!r})" for i, lang, _ in BLOCKS if lang not in EXECUTED + CHECKED + SKIPPED]
  assert not bad, ("tag these blocks python (executed), bash (checked) or text (output): "
                   + ", ".join(bad))
  assert any(lang in EXECUTED for _, lang, _ in BLOCKS)


# --------------------------------------------------------------------------- python: executed

_RUNNER = r"""
import json, sys, traceback
out = {}
for bid, code in json.load(sys.stdin):
  try:
    exec(compile(code, bid, "exec"), {"__name__": "__docs__"})
    out[bid] = None
  except BaseException:
    out[bid] = traceback.format_exc(limit=-3)
print("\n@@RESULTS@@" + json.dumps(out))
"""


def _env() -> dict:
  env = dict(os.environ, JAX_PLATFORMS="cpu", MPLBACKEND="Agg")
  env["PYTHONPATH"] = os.pathsep.join([ROOT] + [p for p in env.get("PYTHONPATH", "").split(
      os.pathsep) if p])
  return env


def _run_batch(runner: str, payload) -> dict:
  r = subprocess.run([sys.executable, "-c", runner], input=json.dumps(payload), cwd=ROOT,
                     env=_env(), capture_output=True, text=True, timeout=300)
  if "@@RESULTS@@" not in r.stdout:
    pytest.fail(f"the block runner died (rc {r.returncode}):\n{r.stderr[-3000:]}")
  return json.loads(r.stdout.rsplit("@@RESULTS@@", 1)[1])


@pytest.fixture(scope="module")
def python_results() -> dict:
  return _run_batch(_RUNNER, [(i, body) for i, lang, body in BLOCKS if lang in EXECUTED])


@pytest.mark.parametrize("bid", [i for i, lang, _ in BLOCKS if lang in EXECUTED])
def test_python_block_runs(bid, python_results):
  assert python_results[bid] is None, f"{bid} raised:\n{python_results[bid]}"


# --------------------------------------------------------------------------- shell: checked

def commands(body: str) -> list[list[str]]:
  """The simple commands of a shell block: continuation lines joined, comments dropped, split
  on ``&&``, ``;`` and ``|``, leading ``VAR=value`` assignments removed."""
  text = body.replace("\\\n", " ")
  out = []
  for line in text.splitlines():
    lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split, lexer.commenters = True, "#"
    words, cmd = list(lexer), []
    for w in words + [";"]:
      if w and set(w) <= set(";&|"):
        while cmd and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", cmd[0]):
          cmd.pop(0)
        if cmd:
          out.append(cmd)
        cmd = []
      else:
        cmd.append(w)
  return out


def _main_flags():
  from absl import flags
  from fmdistill import main  # noqa: F401  (defines the entry point's flags)
  return {f.name: f for f in flags.FLAGS.flags_by_module_dict()["fmdistill.main"]
          if f.name != "config"}


def check_main(args: list[str]) -> None:
  """Parse ``python -m fmdistill.main ARGS`` as the entry point does, with a fresh flag set,
  and validate the resolved config."""
  from absl import flags
  from ml_collections import config_flags

  from fmdistill import config as config_lib, main
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "experiment config", flag_values=fv)
  for name, flag in _main_flags().items():
    fv[name] = copy.deepcopy(flag)
  argv = ["fmdistill.main", *args]
  saved = sys.argv
  sys.argv = argv  # config_flags reads the --config.* overrides from sys.argv
  try:
    fv(argv)
  finally:
    sys.argv = saved
  assert fv["config"].present and fv["workdir"].present, f"--config and --workdir: {args}"
  for _, stage in main.stages(fv.config):
    # validated as on the machine the command is for: as many devices as its mesh names
    devices = math.prod(max(int(stage.mesh[a]), 1) for a in ("data", "fsdp", "tensor"))
    with mock.patch.object(jax, "device_count", lambda: devices):
      config_lib.validate(stage)


def check_pytest(args: list[str]) -> None:
  paths = [a for a in args if not a.startswith("-") and a not in ("auto", "slow", "not slow")]
  missing = [p for p in paths if not os.path.exists(os.path.join(ROOT, p.split("::")[0]))]
  assert not missing, f"pytest names paths that do not exist: {missing}"


def check_pip(args: list[str]) -> None:
  cfg = configparser.ConfigParser()
  cfg.read(os.path.join(ROOT, "setup.cfg"))
  extras = set(cfg["options.extras_require"]) if cfg.has_section("options.extras_require") else set()
  for a in args[1:]:
    m = re.fullmatch(r"\.(?:\[([\w,-]+)\])?", a)
    if m and m.group(1):
      assert set(m.group(1).split(",")) <= extras, f"unknown extras in {a!r}; setup.cfg: {extras}"


def classify(cmd: list[str]) -> tuple[str, list[str]]:
  """``(kind, args)`` of one simple command; raises on a command the docs should not hold."""
  if cmd[:3] == ["python", "-m", "fmdistill.main"]:
    return "main", cmd[3:]
  if cmd[0] == "python" and len(cmd) > 1 and cmd[1].startswith("benchmarks/"):
    return "benchmark", cmd[1:]
  if cmd[0] == "pytest" or cmd[:3] == ["python", "-m", "pytest"]:
    return "pytest", cmd[1:] if cmd[0] == "pytest" else cmd[3:]
  if cmd[:2] == ["pip", "install"]:
    return "pip", cmd[2:]
  if cmd[0] == "cd":
    return "cd", cmd[1:]
  if cmd[0] == "gcloud" and "--command" in cmd:
    return "gcloud", [cmd[cmd.index("--command") + 1]]
  raise AssertionError(f"a shell block holds a command this test does not know: "
                       f"{shlex.join(cmd)!r}; tag the block text if it is output")


def recorded_commands(body: str) -> list[list[str]]:
  """The ``command: python benchmarks/...`` lines that recorded benchmark output starts with
  (placeholders such as ``<runs>`` kept as strings, an optional ``[--flag]`` unbracketed)."""
  lines = re.findall(r"^command: (python benchmarks/.*)$", body, re.M)
  return [c for line in lines for c in commands(re.sub(r"\[(--[^\]]+)\]", r"\1", line))]


def shell_commands() -> list[tuple[str, str, list[str]]]:
  out = []
  for bid, lang, body in BLOCKS:
    if lang in SKIPPED:
      out += [(bid, "benchmark", cmd[1:]) for cmd in recorded_commands(body)]
    if lang in CHECKED:
      pending = commands(body)
      while pending:
        kind, args = classify(pending.pop(0))
        if kind == "gcloud":
          pending = commands(args[0]) + pending
        else:
          out.append((bid, kind, args))
  return out


SHELL = shell_commands()

_ARGPARSE_RUNNER = r"""
import argparse, importlib.util, json, os, sys, traceback

class Parsed(BaseException):
  pass

real = argparse.ArgumentParser.parse_args

def stop(self, args=None, namespace=None):
  real(self, args, namespace)  # a bad argument exits here with argparse's message
  raise Parsed()

argparse.ArgumentParser.parse_args = stop
out = {}
for key, args in json.load(sys.stdin):
  script = args[0]
  sys.argv = list(args)
  sys.path.insert(0, os.path.dirname(os.path.abspath(script)))  # as `python script` does
  try:
    spec = importlib.util.spec_from_file_location("_bench_" + str(len(out)), script)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # a script that parses at import stops here
    mod.main()
    out[key] = "the script ran to the end without parsing its arguments"
  except Parsed:
    out[key] = None
  except SystemExit as e:
    out[key] = f"argparse refused {args[1:]} (exit {e.code})"
  except BaseException:
    out[key] = traceback.format_exc(limit=-3)
  finally:
    sys.path.pop(0)
print("\n@@RESULTS@@" + json.dumps(out))
"""


@pytest.fixture(scope="module")
def benchmark_results() -> dict:
  todo = [(f"{bid}#{n}", args) for n, (bid, kind, args) in enumerate(SHELL) if kind == "benchmark"]
  todo.append(("bad argument", ["benchmarks/teacher_init.py", "--no-such-argument"]))
  missing = [args[0] for _, args in todo if not os.path.isfile(os.path.join(ROOT, args[0]))]
  assert not missing, f"benchmark scripts that do not exist: {missing}"
  return _run_batch(_ARGPARSE_RUNNER, todo)


@pytest.mark.parametrize("n", range(len(SHELL)),
                         ids=[f"{bid}:{kind}:{' '.join(a)[:60]}" for bid, kind, a in SHELL])
def test_shell_command_is_valid(n, request):
  bid, kind, args = SHELL[n]
  if kind == "main":
    check_main(args)
  elif kind == "pytest":
    check_pytest(args)
  elif kind == "pip":
    check_pip(["pip", *args])
  elif kind == "benchmark":
    results = request.getfixturevalue("benchmark_results")
    err = results[f"{bid}#{n}"]
    assert err is None, f"{bid}: python {' '.join(args)}: {err}"


def test_readme_keeps_two_setup_commands():
  """The README's set-up is the quickstart and the test command, nothing more."""
  readme = [b for b in BLOCKS if b[0].startswith("README.md:")]
  setup = [body.strip() for _, lang, body in readme if lang in CHECKED and "pip install" in body]
  assert len(setup) == 2, setup
  assert setup[0].startswith("pip install -e . && python -m fmdistill.main"), setup[0]
  assert setup[1].startswith("pip install -e '.[test]' && pytest"), setup[1]


def test_methods_table_names_every_method_with_a_config_that_resolves():
  from fmdistill import objectives
  with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
    text = f.read()
  section = text.split("\n## Methods\n", 1)[1].split("\n## ", 1)[0]
  rows = [r for r in section.splitlines() if r.startswith("| `")]
  named = {re.match(r"\| `(\w+)`", r).group(1): r for r in rows}
  assert sorted(named) == objectives.names(), "README's Methods table vs the registry"
  for name, row in named.items():
    specs = re.findall(r"`(experiments/\w+\.py:[^`]+)`", row)
    assert specs and specs[-1].split(":")[1].split(",")[0] == name, row
    check_main(["--config", specs[-1], "--workdir", "runs/x"])
    needs = objectives.entry(name).needs_teacher
    assert ("†" in row.split("|")[1]) == needs, f"{name}: † marks the teacher-distilling methods"


def test_the_checks_catch_rot(benchmark_results):
  """A stale override, flag, method or config value, a stale benchmark argument, a missing test
  file and an unknown command are each refused (the checks above can fail)."""
  from absl import flags
  from fmdistill.errors import ConfigError
  fm = ["--config", "experiments/toy2d.py:flow_matching", "--workdir", "w"]
  with pytest.raises(AttributeError, match="no_such_field"):
    check_main(fm + ["--config.train.no_such_field=1"])
  with pytest.raises(flags.IllegalFlagValueError, match="many"):
    check_main(fm + ["--config.train.steps=many"])
  with pytest.raises(flags.UnrecognizedFlagError, match="no_such_flag"):
    check_main(fm + ["--no_such_flag"])
  with pytest.raises(ConfigError, match="batch_size"):  # 3 batch shards do not divide 256
    check_main(fm + ["--config.mesh.data=3"])
  with pytest.raises(flags.IllegalFlagValueError, match="no_such_method"):
    check_main(["--config", "experiments/toy2d.py:no_such_method", "--workdir", "w"])
  assert "argparse refused" in benchmark_results["bad argument"]
  with pytest.raises(AssertionError, match="does not know"):
    classify(["make", "all"])
  with pytest.raises(AssertionError, match="do not exist"):
    check_pytest(["tests/no_such_test.py"])
