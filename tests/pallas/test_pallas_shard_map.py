"""shard_map over batch and heads on 4 fake CPU devices (run in a subprocess, because the
device count must be fixed before jax is imported)."""
from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import jax
from absl.testing import absltest

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parents[1]


class PallasShardMapInterpretTest(absltest.TestCase):

  def test_shard_map_matches_unsharded(self):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, str(HERE / "shard_map_check.py")], env=env,
                          capture_output=True, text=True, timeout=600)
    self.assertEqual(proc.returncode, 0, proc.stdout + proc.stderr)
    self.assertIn("OK", proc.stdout)


class PallasShardMapTest(absltest.TestCase):
  """Compiled kernels on real devices (needs >= 4 GPUs/TPUs)."""

  def test_shard_map_matches_unsharded(self):
    if jax.default_backend() not in ("gpu", "tpu") or len(jax.devices()) < 4:
      self.skipTest("needs 4 GPU/TPU devices (see the Interpret variant)")
    from shard_map_check import main  # noqa: PLC0415
    main()


if __name__ == "__main__":
  absltest.main()
