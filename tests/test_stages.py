"""Stage chains (teacher -> students, ReFlow rounds, progressive halving are all chains) and the
shared config-string parser."""
import os

import pytest

from fmdistill import config as config_lib, main, runs
from fmdistill.errors import ConfigError
from tests.test_train import tiny


def test_parse_arg_reads_method_and_typed_keys():
  a = config_lib.parse_arg("meanflow,toy=moons,steps=300,seed=2", method="quickstart",
                           toy="checkerboard", steps=0, seed=0)
  assert (a.method, a.toy, a.steps, a.seed) == ("meanflow", "moons", 300, 2)
  assert config_lib.parse_arg("", method="quickstart", steps=0).method == "quickstart"
  assert config_lib.parse_arg("steps=5", method="quickstart", steps=0).steps == 5
  with pytest.raises(ConfigError, match="known keys"):
    config_lib.parse_arg("meanflow,stpes=3", method="x", steps=0)
  with pytest.raises(ConfigError, match="not a int"):
    config_lib.parse_arg("meanflow,steps=many", method="x", steps=0)


def _stage(method, steps=6):
  c = tiny(method, steps=steps)
  c.train.update(log_every=3, ckpt_every=3)
  c.teacher.which = "ema_0.9"
  return c


@pytest.mark.slow  # test_chains covers a chain run and its resumption by default
def test_chain_resolves_teachers_and_skips_finished_stages(tmp_path, capsys):
  chain = config_lib.chain([("teacher", _stage("flow_matching")),
                            ("student", _stage("ayf_emd")),
                            ("second", _stage("fmm_backward"))])
  chain.stages.second.teacher.stage = "teacher"  # not the previous stage: a named one
  wd = str(tmp_path / "chain")
  main.run(chain, wd, evaluate=False, progress=False)
  assert runs.read_config(os.path.join(wd, "student")).teacher.workdir == os.path.join(
      wd, "teacher")
  assert runs.read_config(os.path.join(wd, "second")).teacher.workdir == os.path.join(
      wd, "teacher")
  assert all(runs.is_finished(os.path.join(wd, n)) for n in ("teacher", "student", "second"))
  stamp = os.path.getmtime(os.path.join(wd, "student", "metrics.jsonl"))
  capsys.readouterr()
  main.run(chain, wd, evaluate=False, progress=False)  # rerun: nothing trains again
  err = capsys.readouterr().err
  assert err.count("already finished") == 3
  assert os.path.getmtime(os.path.join(wd, "student", "metrics.jsonl")) == stamp
  # a longer budget for one stage: only that stage continues (a change of its config)
  chain.stages.second.train.steps = 9
  main.run(chain, wd, evaluate=False, progress=False, allow_config_change=True)
  assert runs.latest_step(os.path.join(wd, "second")) == 9
  assert os.path.getmtime(os.path.join(wd, "student", "metrics.jsonl")) == stamp
  # a finished stage of another experiment is not skipped: the workdir check refuses it
  chain.stages.student.objective.tangent_c = 0.3
  with pytest.raises(ValueError, match="holds a different experiment"):
    main.run(chain, wd, evaluate=False, progress=False)


def test_chain_errors_name_the_stage(tmp_path):
  first = config_lib.chain([("student", _stage("ayf_emd"))])
  with pytest.raises(ConfigError, match="stage 'student'.*no earlier stage"):
    main.run(first, str(tmp_path / "a"), evaluate=False, progress=False)
  later = config_lib.chain([("teacher", _stage("flow_matching")), ("s", _stage("ayf_emd")),
                            ("late", _stage("flow_matching"))])
  later.stages.s.teacher.stage = "late"
  with pytest.raises(ConfigError, match="teacher.stage='late' is not an earlier stage"):
    main.run(later, str(tmp_path / "b"), evaluate=False, progress=False)
  assert not os.path.exists(tmp_path / "b")
