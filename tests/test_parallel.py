"""Sharding on fake CPU devices (each check in a subprocess: the device count is fixed when jax
starts). Mesh validation runs in-process on the single real device."""
import json
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest

from fmdistill import config as config_lib, parallel
from fmdistill.errors import ConfigError

SCRIPT = os.path.join(os.path.dirname(__file__), "parallel_check.py")


def _flags(devices: int) -> str:
  """``devices`` fake CPU devices, beside the suite's own XLA flags (conftest.py)."""
  return f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}"


def _run(root, devices, *args, extra_env=None, timeout=600):
  env = dict(os.environ, PYTHONPATH=root, JAX_PLATFORMS="cpu",
             XLA_FLAGS=_flags(devices), **(extra_env or {}))
  r = subprocess.run([sys.executable, SCRIPT, *args], cwd=root, env=env, capture_output=True,
                     text=True, timeout=timeout)
  assert r.returncode == 0, r.stderr[-3000:]
  return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("method,impl", [("flow_matching", "xla"),
                                         pytest.param("meanflow", "pallas", marks=pytest.mark.slow),
                                         pytest.param("dmd", "xla", marks=pytest.mark.slow)])
def test_sharded_step_equals_unsharded(root, tmp_path, method, impl):
  out = _run(root, 8, "equivalence", method, impl, str(tmp_path / "w"))
  assert out["devices"] == 8
  assert abs(out["loss_sharded"] - out["loss_single"]) <= 1e-5 * abs(out["loss_single"])
  assert out["max_param_diff"] < 1e-5
  assert "P('fsdp', None)" in out["specs"] or "P(None, 'fsdp')" in out["specs"]


def _params(path):
  with open(path) as f:
    return [np.asarray(x) for x in json.load(f)["leaves"]]


@pytest.mark.slow
def test_checkpoint_moves_between_meshes(root, tmp_path):
  """Save on 8 devices (data=8), resume on data=2 x fsdp=2 and on one device: the restored
  state lands on each mesh and training continues identically on both."""
  a = tmp_path / "a"
  first = _run(root, 8, "train", str(a), "8", "1", "8", "4")      # 4 of 8 steps on data=8
  assert first["step"] == 4
  shutil.copytree(a, tmp_path / "b")
  shutil.copytree(a, tmp_path / "c")
  _run(root, 4, "train", str(tmp_path / "b"), "2", "2", "8")      # resume on data=2 x fsdp=2
  _run(root, 1, "train", str(tmp_path / "c"), "1", "1", "8")      # resume on one device
  for x, y in zip(_params(tmp_path / "b" / "params_8_4.json"),
                  _params(tmp_path / "c" / "params_8_1.json")):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_agree_with_one(root, tmp_path):
  """Two local processes x 4 fake devices (gloo collectives) = one process x 8 devices."""
  port = _free_port()
  env = dict(os.environ, PYTHONPATH=root, JAX_PLATFORMS="cpu",
             XLA_FLAGS=_flags(4),
             JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2")
  wd = str(tmp_path / "multi")
  procs = [subprocess.Popen([sys.executable, SCRIPT, "train", wd, "2", "4", "6"], cwd=root,
                            env=dict(env, JAX_PROCESS_ID=str(i)), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for i in range(2)]
  outs = [p.communicate(timeout=600) for p in procs]
  for p, (o, e) in zip(procs, outs):
    assert p.returncode == 0, e[-3000:]
    assert json.loads(o.strip().splitlines()[-1])["processes"] == 2
  _run(root, 8, "train", str(tmp_path / "single"), "2", "4", "6")
  # gloo's cross-process all-reduce sums in another order than the in-process one: after six
  # Adam steps single elements differ by float rounding (measured up to 3.2e-6)
  for x, y in zip(_params(tmp_path / "single" / "params_6_8.json"),
                  _params(tmp_path / "multi" / "params_6_8.json")):
    np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5)
  # exactly one process wrote the log
  lines = open(os.path.join(wd, "metrics.jsonl")).read().splitlines()
  assert [json.loads(l)["step"] for l in lines] == [2, 4, 6]


def test_mesh_validation():
  c = config_lib.base("flow_matching").mesh
  assert parallel.mesh_shape(c, 8) == (8, 1, 1)
  c.update(data=2, fsdp=-1)
  assert parallel.mesh_shape(c, 8) == (2, 4, 1)
  c.update(data=3, fsdp=-1)
  with pytest.raises(ConfigError, match="does not divide the 8 devices"):
    parallel.mesh_shape(c, 8)
  c.update(data=2, fsdp=2)
  with pytest.raises(ConfigError, match="uses 4 of 8 devices"):
    parallel.mesh_shape(c, 8)
  c.update(data=-1, fsdp=-1)
  with pytest.raises(ConfigError, match="at most one -1"):
    parallel.mesh_shape(c, 8)


def test_partition_rules():
  import jax
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1, 1), parallel.AXES)
  c = config_lib.base("flow_matching").mesh
  spec = parallel.spec_for("params/block0/qkv/kernel", (32, 96), mesh, parallel.DEFAULT_RULES,
                           16)
  assert tuple(spec) == ("fsdp", "tensor")
  spec = parallel.spec_for("opt_state/1/0/mu/embed/kernel", (4, 32), mesh,
                           parallel.DEFAULT_RULES, 16)
  assert tuple(spec) == ()  # fsdp size 1: replicated
  del c
