"""Reliability at the process level: real SIGKILL/SIGTERM, two processes on one workdir, and
faults a user can inject from the command line (one clear line, exit 2, nothing written).

The command-line faults run in one subprocess (``tests/cli_batch.py``: one jax import for all
of them) that obeys file permissions even as root. In-process faults are in ``tests/test_reliability_state.py``
(checkpoints, non-finite values, metrics.jsonl) and ``tests/test_reliability_workdir.py`` (drift,
teachers, locks, library logs)."""
import ctypes
import fcntl
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from fmdistill import checkpoint, runs

CLI_TINY = ["--config.model.width=16", "--config.model.depth=1", "--config.train.batch_size=32",
            "--config.train.ckpt_every=5", "--config.train.keep=3", "--config.train.log_every=5",
            "--progress=false", "--noeval"]


def _cmd(wd, *extra, method="flow_matching"):
  return [sys.executable, "-m", "fmdistill.main", "--config",
          f"experiments/toy2d.py:{method}", "--workdir", str(wd), *CLI_TINY, *extra]


def _env(root):
  return dict(os.environ, PYTHONPATH=root, JAX_PLATFORMS="cpu")


def _final_state(wd):
  return runs.load_state(str(wd))


def _assert_identical(a, b):
  la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
  assert len(la) == len(lb)
  for x, y in zip(la, lb):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _lines(text):
  return [l for l in text.splitlines() if l.strip()]


def _wait_for_checkpoint(wd, at_least, proc, timeout=120):
  ck = os.path.join(wd, "checkpoints")
  t0 = time.time()
  while time.time() - t0 < timeout:
    steps = [int(d) for d in os.listdir(ck) if d.isdigit()] if os.path.isdir(ck) else []
    if steps and max(steps) >= at_least:
      return max(steps)
    assert proc.poll() is None, proc.communicate()[1][-2000:]
    time.sleep(0.02)
  raise TimeoutError("no checkpoint appeared")


@pytest.fixture(scope="session")
def tiny_teacher(root, tmp_path_factory):
  """A finished (tiny) flow-matching run for the distillation methods."""
  wd = tmp_path_factory.mktemp("teacher") / "fm"
  r = subprocess.run(_cmd(wd, "--config.train.steps=10"), cwd=root, env=_env(root),
                     capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-2000:]
  return str(wd)


@pytest.mark.parametrize("method", ["flow_matching", pytest.param("scm_ct", marks=pytest.mark.slow),
                                    pytest.param("dmd", marks=pytest.mark.slow)])
def test_sigkill_then_rerun_is_bit_identical(root, tmp_path, method, request):
  """FM, a tangent-family method with a jointly trained part (sCM: one jvp per step, learned
  weighting) and a method with a critic part (alternating updates, two optimisers): killed at
  a random step, rerun, identical to an uninterrupted run. The killed process leaves its lock
  file behind (stale); the rerun takes the workdir over (the kernel released the lock)."""
  steps = ["--config.train.steps=60"]
  if method == "dmd":
    steps.append(f"--config.teacher.workdir={request.getfixturevalue('tiny_teacher')}")
  ref = subprocess.run(_cmd(tmp_path / "ref", *steps, method=method), cwd=root, env=_env(root),
                       capture_output=True, text=True, timeout=300)
  assert ref.returncode == 0, ref.stderr[-2000:]
  wd = tmp_path / "killed"
  rng = np.random.default_rng(int(time.time()))
  kill_after = int(rng.integers(10, 45))
  p = subprocess.Popen(_cmd(wd, *steps, method=method), cwd=root, env=_env(root),
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  _wait_for_checkpoint(str(wd), kill_after, p)
  p.send_signal(signal.SIGKILL)
  p.wait()
  assert p.returncode == -signal.SIGKILL
  assert json.loads((wd / "lock").read_text())["pid"] == p.pid  # stale lock left behind
  again = subprocess.run(_cmd(wd, *steps, method=method), cwd=root, env=_env(root),
                         capture_output=True, text=True, timeout=300)
  assert again.returncode == 0, again.stderr[-2000:]
  assert not (wd / "lock").exists()   # released (and removed) on a normal exit
  a, b = _final_state(tmp_path / "ref"), _final_state(wd)
  assert int(a["step"]) == int(b["step"]) == 60
  _assert_identical(a, b)  # params, EMA, optimiser states (critic too), RNG key, counters
  if method == "scm_ct":
    assert int(a["parts"]["weighting"]["count"]) == 60
  if method == "dmd":
    assert set(a["parts"]["critic"]) >= {"params", "opt_state", "count", "skipped"}
    assert int(a["parts"]["critic"]["count"]) == 60 * 5  # 5 critic updates per student step
    assert json.loads((wd / "teacher.json").read_text())["step"] == 10


def test_sigterm_saves_and_a_second_process_is_refused(root, tmp_path):
  """A second process on a workdir in use is refused in one line and writes nothing; SIGTERM
  then saves a checkpoint and exits 0 with one line."""
  wd = tmp_path / "term"
  p = subprocess.Popen(_cmd(wd, "--config.train.steps=100000"), cwd=root, env=_env(root),
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  _wait_for_checkpoint(str(wd), 10, p)
  second = subprocess.run(_cmd(wd, "--config.train.steps=100000"), cwd=root, env=_env(root),
                          capture_output=True, text=True, timeout=120)
  assert p.poll() is None   # the first process is still training, undisturbed
  assert second.returncode == 2
  assert _lines(second.stderr) == [l for l in _lines(second.stderr) if "is in use by another "
                                   f"process (pid {p.pid} on " in l], second.stderr
  assert len(_lines(second.stderr)) == 1
  p.send_signal(signal.SIGTERM)
  _, err = p.communicate(timeout=60)
  assert p.returncode == 0, err[-2000:]
  assert "preempted: saved a checkpoint at step" in err
  step = int(err.split("at step ")[1].split(";")[0])
  assert checkpoint.manager(str(wd), read_only=True).latest_step() == step
  assert not list((wd / "checkpoints").glob("*orbax-checkpoint-tmp*"))
  prov = json.loads((wd / "provenance.json").read_text())
  assert len(prov) == 1    # the refused process did not record itself


def test_sigterm_before_the_loop_is_one_line_not_rc_143(root, tmp_path):
  """SIGTERM while the process is still importing jax and building the run."""
  wd = tmp_path / "early"
  p = subprocess.Popen(_cmd(wd, "--config.train.steps=10"), cwd=root, env=_env(root),
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  time.sleep(1.0)
  p.send_signal(signal.SIGTERM)
  _, err = p.communicate(timeout=120)
  assert p.returncode == 0, err[-2000:]
  assert _lines(err) == ["preempted before training started: nothing new to save; rerun the "
                         "same command to continue"], err[-2000:]
  assert not wd.exists()


# ------------------------------------------------------------------ command-line faults

def _drop_root_file_powers():
  """``preexec_fn``: as root, drop CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH from the bounding
  set, so the exec'd process obeys file permissions like any user (a no-op for non-root)."""
  if os.geteuid() == 0:
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2):
      assert libc.prctl(24, cap, 0, 0, 0) == 0  # PR_CAPBSET_DROP


@pytest.fixture(scope="session")
def cli(root, tmp_path_factory):
  """Every command-line fault case, run in one subprocess; ``{name: result}`` and the dir.

  Built once per test session: xdist workers share it through a directory of the session
  (the first worker builds it under a file lock, the others wait and read its results)."""
  base = tmp_path_factory.getbasetemp()
  shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
  t = shared / "cli"
  with open(shared / "cli.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not (t / "results.json").exists():
      _run_cli_batch(root, t)
  return {c["name"]: c for c in json.loads((t / "results.json").read_text())}, t


def _run_cli_batch(root, t):
  t.mkdir(exist_ok=True)
  (t / "afile").write_text("not a directory")
  (t / "ro").mkdir()
  (t / "ro").chmod(0o555)
  (t / "tfds" / "mydata" / "1.0.0").mkdir(parents=True)
  snap = ("snap = {os.path.join(d, f): os.path.getmtime(os.path.join(d, f)) "
          "for d, _, fs in os.walk(W) for f in fs}; json.dump(snap, open(W + '.snap', 'w'))")
  good, full = str(t / "good"), str(t / "full")
  # the arguments after `python -m fmdistill.main` (3 steps unless a case says otherwise)
  flat = lambda wd, *a, method="flow_matching": _cmd(wd, "--config.train.steps=3", *a,
                                                      method=method)[3:]
  report = lambda *a: [x for x in flat(*a) if x != "--noeval"]
  tfds = ["--config.data.name=tfds", "--config.model.name=dit", "--config.data.tfds_name=mydata",
          f"--config.data.data_dir={t / 'tfds'}"]
  cases = [
      dict(name="workdir is a file", args=flat(t / "afile")),
      dict(name="workdir under a file", args=flat(t / "afile" / "run")),
      dict(name="workdir not writable", args=flat(t / "ro" / "run")),
      dict(name="eval.student_nfe=abc", args=flat(t / "w1", "--config.eval.student_nfe=abc")),
      dict(name="seed=-1", args=flat(t / "w2", "--config.seed=-1")),
      dict(name="eval.which not kept", args=flat(t / "w3", "--config.eval.which=ema_0.5")),
      dict(name="train.lr=inf", args=flat(t / "w4", "--config.train.lr=inf")),
      dict(name="objective.sigma_d=nan", args=flat(t / "w5", "--config.objective.sigma_d=nan")),
      dict(name="eval.gamma=nan", args=flat(t / "w6", "--config.eval.gamma=nan")),
      dict(name="TFDS version without dataset_info.json", args=flat(t / "w7", *tfds)),
      dict(name="eval of a missing workdir", args=report(t / "nowhere", "--mode=eval")),
      dict(name="train good", args=flat(good, "--config.train.steps=5",
                                        "--config.train.eval_every=5")),
      dict(name="eval at the trained step",
           args=report(good, "--mode=eval", "--config.eval.num_samples=1000",
                       "--config.eval.teacher_nfe=(64,)"),
           after=f"W = {good!r}; os.replace(W + '/metrics.json', W + '/metrics_at_5.json')"),
      dict(name="unreadable checkpoint directory", args=flat(good, "--config.train.steps=5"),
           before=f"W = {good!r}; {snap}; os.chmod(W + '/checkpoints', 0)",
           after=f"W = {good!r}; os.chmod(W + '/checkpoints', 0o755); "
                 + snap.replace(".snap", ".snap2")),
      dict(name="train noisy", args=flat(t / "noisy", "--config.train.steps=5"),
           before=f"W = {str(t / 'noisy')!r}; os.makedirs(W); open(W + '/tensorboard', 'w')",
           after=f"W = {str(t / 'noisy')!r}; os.remove(W + '/tensorboard'); json.dump("
                 "sorted(os.listdir(W + '/checkpoints')), open(W + '.ckpts', 'w'))"),
      dict(name="train full", args=flat(full, "--config.train.steps=5")),
      dict(name="full disk", args=flat(full, "--config.train.steps=10", "--allow_config_change"),
           fsize=20000),
      dict(name="eval overrides on an unfinished run",
           args=report(good, "--mode=eval", "--config.eval.num_samples=100",
                       "--config.eval.teacher_nfe=(2,)"),
           before=f"p = {good!r} + '/config.json'; c = json.load(open(p)); "
                  "c['train']['steps'] = 8; json.dump(c, open(p, 'w'))"),
      dict(name="sample", args=flat(good, "--mode=sample", "--nfe=1,64", "--step=5",
                                    "--config.eval.num_samples=1000")),
      dict(name="sample at a missing step", args=flat(good, "--mode=sample", "--step=3")),
      dict(name="list", args=["--list"]),
      dict(name="show_config", args=["--config", "experiments/toy2d.py:meanflow",
                                     "--show_config", "--config.train.lr=0.5"]),
      dict(name="nfe=0", args=flat(t / "w8", "--mode=sample", "--nfe=0")),
      dict(name="nfe=abc", args=flat(t / "w9", "--mode=sample", "--nfe=1,abc")),
      dict(name="step when training", args=flat(t / "w10", "--step=3")),
      dict(name="missing teacher", args=flat(t / "student", f"--config.teacher.workdir="
                                             f"{t / 'nope'}", method="direct_distill")),
      dict(name="experiment", args=flat(t / "exp")),
      dict(name="another experiment", args=flat(t / "exp", "--config.data.toy=moons")),
      dict(name="overwrite", args=flat(t / "exp", "--config.data.toy=moons", "--overwrite")),
  ] + [dict(name=f"bad input {i}", args=flat(t / f"bad{i}", *a))
       for i, (a, _) in enumerate(BAD_INPUTS)]
  (t / "cases.json").write_text(json.dumps(cases))
  env = _env(root)  # without the suite's compilation cache (conftest.py): under the "full
  env.pop("JAX_COMPILATION_CACHE_DIR", None)  # disk" file-size limit its writes fail too
  r = subprocess.run([sys.executable, os.path.join(root, "tests", "cli_batch.py"),
                      str(t / "cases.json"), str(t / "results.json")], cwd=root,
                     env=env, capture_output=True, text=True, timeout=900,
                     preexec_fn=_drop_root_file_powers)
  assert r.returncode == 0, r.stderr[-3000:]


BAD_INPUTS = [
    (["--config.train.stepz=5"], "unknown config field 'stepz'"),
    (["--config.train.steps=ten"], "invalid literal"),
    (["--config.method=meanflw"], "config.method='meanflw' is invalid"),
    (["--config.data.name=digits"], "config.model.name='mlp' is invalid"),
    (["--config.model.dtype=float16"], "config.model.dtype"),
    (["--config.data.toy=swissroll"], "config.data.toy"),
    (["--config.train.batch_size=0"], "config.train.batch_size"),
    (["--config.data.name=tfds", "--config.model.name=dit",
      "--config.data.tfds_name=mnist"], "data.data_dir is empty"),
    (["--config.data.name=tfds", "--config.model.name=dit", "--config.data.tfds_name=mnist",
      "--config.data.data_dir=/nonexistent"], "not found under"),
]


@pytest.mark.parametrize("args,match", BAD_INPUTS, ids=[a[0][0] for a in BAD_INPUTS])
def test_bad_input_is_one_line_and_writes_nothing(cli, args, match):
  results, t = cli
  i = [a for a, _ in BAD_INPUTS].index(args)
  r = results[f"bad input {i}"]
  assert r["rc"] == 2
  lines = _lines(r["stderr"])
  assert len(lines) == 1 and match in lines[0], r["stderr"][-2000:]
  assert not (t / f"bad{i}").exists()


def test_missing_teacher_is_one_line_and_writes_nothing(cli):
  results, t = cli
  r = results["missing teacher"]
  assert r["rc"] == 2
  lines = _lines(r["stderr"])
  assert len(lines) == 1 and "no finished run at" in lines[0], r["stderr"]
  assert not (t / "student").exists()


def test_workdir_holding_another_experiment_is_refused(cli):
  results, t = cli
  assert results["experiment"]["rc"] == 0, results["experiment"]["stderr"][-2000:]
  other = results["another experiment"]
  assert other["rc"] == 2 and "holds a different experiment" in other["stderr"]
  assert "data.toy: 'checkerboard' != 'moons'" in other["stderr"]
  assert results["overwrite"]["rc"] == 0, results["overwrite"]["stderr"][-2000:]
  moved = [p for p in t.iterdir() if p.name.startswith("exp.replaced-")]
  assert len(moved) == 1 and (moved[0] / "checkpoints").is_dir()   # the old run is kept
  assert runs.read_config(str(t / "exp")).data.toy == "moons"
  prov = json.loads((t / "exp" / "provenance.json").read_text())
  assert "git_commit" in prov[0] and "argv" in prov[0] and len(prov) == 1


ONE_LINE_FAULTS = [
    ("workdir is a file", "--workdir '{t}/afile' is a file, not a directory", None),
    ("workdir under a file", "cannot be created: '{t}/afile' is a file", None),
    ("workdir not writable", "is not writable ('{t}/ro': permission denied)", "ro/run"),
    ("eval.student_nfe=abc", "config.eval.student_nfe=('abc',) is invalid", "w1"),
    ("seed=-1", "config.seed=-1 is invalid", "w2"),
    ("eval.which not kept", "config.eval.which='ema_0.5' is invalid; accepted: the weights this "
     "run keeps: ['params', 'ema_0.999']", "w3"),
    ("train.lr=inf", "config.train.lr=inf is invalid; accepted: a finite number", "w4"),
    ("objective.sigma_d=nan", "config.objective.sigma_d=nan is invalid", "w5"),
    ("eval.gamma=nan", "config.eval.gamma=nan is invalid", "w6"),
    ("TFDS version without dataset_info.json", "1.0.0 has no dataset_info.json", "w7"),
    ("eval of a missing workdir", "no run to eval at '{t}/nowhere'", "nowhere"),
    ("unreadable checkpoint directory", "checkpoint directory {t}/good/checkpoints is not "
     "readable and writable (permission denied)", None),
    ("full disk", "could not write checkpoint step 10 to {t}/full/checkpoints", None),
    ("sample at a missing step", "run '{t}/good' has no checkpoint step 3 (it has [1, 5])", None),
    ("nfe=0", "flag --nfe=0: expected positive integers separated by commas", "w8"),
    ("nfe=abc", "flag --nfe=1,abc: expected positive integers separated by commas", "w9"),
    ("step when training", "--step=3 is for --mode=sample", "w10"),
]


@pytest.mark.parametrize("name,message,unwritten", ONE_LINE_FAULTS,
                         ids=[f[0] for f in ONE_LINE_FAULTS])
def test_fault_is_one_line_exit_2_and_writes_nothing(cli, name, message, unwritten):
  results, t = cli
  r = results[name]
  assert r["rc"] == 2, r["stderr"][-3000:]
  lines = _lines(r["stderr"])
  assert len(lines) == 1 and "Traceback" not in r["stderr"], r["stderr"][-3000:]
  assert lines[0].startswith("error: ") and message.format(t=t) in lines[0], lines[0]
  if unwritten:
    assert not (t / unwritten).exists()


def test_unreadable_checkpoint_directory_touches_nothing(cli):
  _, t = cli
  before = json.loads((t / "good.snap").read_text())
  after = json.loads((t / "good.snap2").read_text())   # right after the refusal
  assert before == after and any("/checkpoints/5/" in k for k in before)


def test_corrupt_checkpoint_is_one_warning_line_not_pages_of_tracebacks(cli, root):
  """Emptied array data files: orbax's coroutines fail and, at interpreter exit, Python used
  to print ~140 lines of their tracebacks (a real process, so that its exit is real)."""
  results, t = cli
  assert results["train noisy"]["rc"] == 0
  wd = t / "noisy"
  for f in (wd / "checkpoints" / "5" / "state" / "ocdbt.process_0" / "d").iterdir():
    f.write_bytes(b"")
  r = subprocess.run(_cmd(wd, "--config.train.steps=5"), cwd=root, env=_env(root),
                     capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  lines = _lines(r.stderr)
  assert len(lines) == 1 and lines[0].startswith("warning: checkpoint step 5 is unreadable"), \
      r.stderr[-3000:]
  assert (wd / "corrupt_checkpoints" / "5").is_dir()


def test_full_disk_keeps_the_older_checkpoints_and_logs_the_details(cli):
  results, t = cli
  r = results["full disk"]
  assert "details in" in r["stderr"] and (t / "full" / "library.log").stat().st_size > 0
  assert not list((t / "full" / "checkpoints").glob("*orbax-checkpoint-tmp*"))
  state = runs.load_state(str(t / "full"))   # the step-5 checkpoint is intact (checksums)
  assert int(state["step"]) == 5


def test_eval_honours_overrides_and_names_the_unfinished_step(cli):
  results, t = cli
  r = results["eval overrides on an unfinished run"]
  assert r["rc"] == 0, r["stderr"][-3000:]
  assert _lines(r["stderr"]) == [f"warning: run 'run' in {t}/good is unfinished; evaluating "
                                 "its checkpoint at step 5 of 8 (unfinished)"]
  m = json.loads((t / "good" / "metrics.json").read_text())
  assert m["num_samples"] == 100 and set(m["runs"]["run"]["nfe"]) == {"2"}
  assert (m["runs"]["run"]["step"], m["runs"]["run"]["steps"]) == (5, 8)
  assert m["runs"]["run"]["finished"] is False
  assert "checkpoint step 5 of 8 — **unfinished run**" in (t / "good" / "report.md").read_text()
