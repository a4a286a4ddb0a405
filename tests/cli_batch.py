"""Run ``python -m fmdistill.main`` for several argument lists in one process, so that a test
can try many faults for one jax import: ``python tests/cli_batch.py CASES.json RESULTS.json``.

``CASES.json`` is a list of ``{"name", "args", "before": python code run first, "after":
python code run last, "fsize": a file-size limit in bytes (RLIMIT_FSIZE: a write beyond it fails
as on a full disk)}``. Each case goes through ``main.parse_flags`` and ``main.main`` exactly as
the command line does (flags reset in between); its exit code (1 if an exception escaped,
with the traceback on its stderr as Python would print it), stdout and stderr (file
descriptors 1 and 2, so library output is caught too) are written to ``RESULTS.json``.
"""
import gc
import json
import os
import resource
import sys
import tempfile
import traceback

from absl import flags

from fmdistill import main as main_lib, preempt


def run_case(case: dict) -> dict:
  exec(case.get("before", ""), {"os": os, "json": json})  # noqa: S102  test fixtures only
  files = [tempfile.TemporaryFile(), tempfile.TemporaryFile()]
  sys.stdout.flush()
  sys.stderr.flush()
  saved = [os.dup(1), os.dup(2)]
  os.dup2(files[0].fileno(), 1)
  os.dup2(files[1].fileno(), 2)
  limit = resource.getrlimit(resource.RLIMIT_FSIZE)
  if case.get("fsize"):
    resource.setrlimit(resource.RLIMIT_FSIZE, (case["fsize"], limit[1]))
  for name in [n for n in flags.FLAGS if n.startswith("config.")]:  # defined per parse
    delattr(flags.FLAGS, name)
  flags.FLAGS.unparse_flags()
  sys.argv = ["fmdistill.main", *case["args"]]  # config_flags reads its overrides from here
  rc = 0
  try:
    main_lib.main(main_lib.parse_flags(sys.argv))
  except SystemExit as e:
    rc = 0 if e.code is None else e.code if isinstance(e.code, int) else 1
  except BaseException:  # noqa: BLE001  what `python -m` would print as a traceback
    traceback.print_exc()
    rc = 1
  finally:
    gc.collect()  # what the interpreter's exit would report (abandoned coroutines) lands here
    resource.setrlimit(resource.RLIMIT_FSIZE, limit)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(saved[0], 1)
    os.dup2(saved[1], 2)
  out = []
  for f in files:
    f.seek(0)
    out.append(f.read().decode(errors="replace"))
  exec(case.get("after", ""), {"os": os, "json": json})  # noqa: S102
  print(f"{case['name']}: rc {rc}", file=sys.stderr, flush=True)
  return {"name": case["name"], "rc": rc, "stdout": out[0], "stderr": out[1]}


if __name__ == "__main__":
  preempt.install()
  cases_path, results_path = sys.argv[1:3]  # run_case replaces sys.argv
  with open(cases_path) as f:
    cases = json.load(f)
  results = [run_case(c) for c in cases]
  with open(results_path, "w") as f:
    json.dump(results, f, indent=1)
