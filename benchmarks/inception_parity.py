r"""The Flax InceptionV3 against pytorch-fid's, through the documented weight conversion.

    pip install torch torchvision pytorch-fid     # not dependencies of fmdistill
    python benchmarks/inception_parity.py [--n 32] [--seed 0]

No weights are downloaded: pytorch-fid's ``FIDInceptionV3`` is built with random weights (He-
normal kernels and random batch-norm scale, shift, running mean and variance, so that a swapped
or misread statistic shows), in place of the ``pt_inception-2015-12-05`` file that its loader
would fetch. Those weights go through exactly the conversion ``fmdistill/eval/fid.py`` documents
for the real file (``np.savez`` of the state dict) and ``fid.load_params``; then both networks
embed the same images and the script prints how far apart their pool3 features are, and the
Fréchet distance between two image sets computed from each network's features (and, for the
PyTorch features, also by pytorch-fid's own ``calculate_frechet_distance``). Three kinds of
input: 299x299 RGB (no resizing: the network alone), 32x32 RGB (bilinear resizing to 299) and
8x8 grey (grey to RGB as well). What this cannot show is parity with the real weights, which
this machine does not have: it checks the architecture, the preprocessing and the conversion.
A control row shows the size of the difference one misread statistic makes (one unit's running
variance doubled in our copy only).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings
from unittest import mock

import jax
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from fmdistill.eval import fid, inception, metrics  # noqa: E402


CONTROL = "Mixed_6e.branch7x7_2.bn.running_var"


def _pytorch_fid():
  """``(torch, pytorch_fid.inception, pytorch_fid.fid_score)``. torchvision's compiled operators
  (detection ops such as ``nms``) are not needed by its pure-Python Inception modules; a
  torchvision wheel built against another torch build fails to register them at import, so their
  meta-kernel registration is skipped during that import (nothing else changes)."""
  import torch
  register = torch.library.register_fake
  torch.library.register_fake = lambda *a, **k: (lambda f: f)
  try:
    import torchvision  # noqa: F401
  finally:
    torch.library.register_fake = register
  from pytorch_fid import fid_score, inception as pt_inception
  return torch, pt_inception, fid_score


def random_state_dict(torch, pt_inception, seed: int) -> dict:
  """A state dict with the names and shapes of pytorch-fid's weight file, random values."""
  built = {}
  load = lambda self, sd, *a, **k: built.setdefault("net", self)  # noqa: E731
  with mock.patch.object(pt_inception, "load_state_dict_from_url", lambda *a, **k: {}), \
       mock.patch.object(torch.nn.Module, "load_state_dict", load):
    pt_inception.fid_inception_v3()
  rng = np.random.default_rng(seed)
  out = {}
  for k, v in built["net"].state_dict().items():
    shape = tuple(v.shape)
    if k.endswith("num_batches_tracked"):
      out[k] = v.clone()
      continue
    if k.endswith("conv.weight"):
      a = rng.standard_normal(shape) * np.sqrt(2.0 / np.prod(shape[1:]))
    elif k.endswith("bn.weight"):
      a = rng.uniform(0.5, 1.5, shape)
    elif k.endswith("bn.running_var"):
      a = rng.uniform(0.5, 2.0, shape)
    else:  # bn.bias, bn.running_mean, fc.*
      a = 0.2 * rng.standard_normal(shape)
    out[k] = torch.from_numpy(a.astype(np.float32))
  return out


def torch_features(torch, pt_inception, state: dict):
  """``images (n, H, W, C) in [-1, 1] -> (n, 2048)`` by pytorch-fid's ``InceptionV3([3])``
  (its own resizing and ``2 x - 1`` scaling of inputs in ``[0, 1]``), ``state`` loaded through
  its own (strict) loading path."""
  with mock.patch.object(pt_inception, "load_state_dict_from_url", lambda *a, **k: state):
    net = pt_inception.InceptionV3([3]).eval()

  def run(x: np.ndarray) -> np.ndarray:
    x = np.repeat(x, 3, axis=-1) if x.shape[-1] == 1 else x
    t = torch.from_numpy(np.ascontiguousarray(((x + 1) / 2).transpose(0, 3, 1, 2)))
    with torch.no_grad():
      return net(t.float())[0][:, :, 0, 0].double().numpy()
  return run


def images(kind: str, n: int, seed: int) -> np.ndarray:
  """``n`` images in ``[-1, 1]``: smooth random fields (so resizing sees structure)."""
  size, ch = {"299 RGB": (299, 3), "32 RGB": (32, 3), "8 grey": (8, 1)}[kind]
  rng = np.random.default_rng(seed)
  coarse = rng.uniform(-1, 1, (n, max(size // 4, 2), max(size // 4, 2), ch))
  x = np.asarray(jax.image.resize(coarse, (n, size, size, ch), "cubic"))
  return np.clip(x + 0.1 * rng.standard_normal(x.shape), -1, 1).astype(np.float32)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--n", type=int, default=32, help="images per set (two sets per input kind)")
  p.add_argument("--seed", type=int, default=0)
  args = p.parse_args()
  torch, pt_inception, fid_score = _pytorch_fid()
  torch.set_num_threads(os.cpu_count() or 1)
  import _common
  print(f"machine: {_common.machine()} | torch {torch.__version__}")
  print(f"command: python {' '.join(sys.argv)}")
  state = random_state_dict(torch, pt_inception, args.seed)
  with tempfile.TemporaryDirectory() as d:
    path = os.path.join(d, "inception.npz")
    np.savez(path, **{k: v.numpy() for k, v in state.items()})  # the documented conversion
    params = fid.load_params(path)
    broken = dict(state)  # the control: one unit's running variance doubled in our copy only
    broken[CONTROL] = state[CONTROL] * 2
    np.savez(path, **{k: v.numpy() for k, v in broken.items()})
    control = fid.feature_fn(fid.load_params(path), batch=16)
  ours = fid.feature_fn(params, batch=16)
  theirs = torch_features(torch, pt_inception, state)
  print()
  print("| input | images | max abs diff / max abs feature | relative L2 diff | FD (ours) | "
        "FD (pytorch-fid features, our formula) | FD (pytorch-fid features and formula) | "
        "FD rel. diff | seconds ours / torch |")
  print("|---|---|---|---|---|---|---|---|---|")
  for i, kind in enumerate(("299 RGB", "32 RGB", "8 grey")):
    a = images(kind, args.n, 2 * i + 10 * args.seed)
    b = images(kind, args.n, 2 * i + 1 + 10 * args.seed) * 0.5  # a second, different set
    t0 = time.perf_counter()
    fa, fb = ours(a), ours(b)
    t1 = time.perf_counter()
    ta, tb = theirs(a), theirs(b)
    t2 = time.perf_counter()
    f, t = np.concatenate([fa, fb]), np.concatenate([ta, tb])
    max_rel = float(np.abs(f - t).max() / np.abs(t).max())
    l2 = float(np.linalg.norm(f - t) / np.linalg.norm(t))
    with warnings.catch_warnings():  # n < 2048 images: singular covariances (same for both)
      warnings.simplefilter("ignore")
      fd_ours = metrics.frechet_distance(fa, fb)
      fd_t = metrics.frechet_distance(ta, tb)
      mu_a, sa = metrics.gaussian_stats(ta)
      mu_b, sb = metrics.gaussian_stats(tb)
      fd_ref = float(fid_score.calculate_frechet_distance(mu_a, sa, mu_b, sb))
    print(f"| {kind} | 2 x {args.n} | {max_rel:.2e} | {l2:.2e} | {fd_ours:.6g} | {fd_t:.6g} | "
          f"{fd_ref:.6g} | {abs(fd_ours - fd_ref) / abs(fd_ref):.2e} | "
          f"{t1 - t0:.1f} / {t2 - t1:.1f} |", flush=True)
  c, t = control(a), theirs(a)  # the last kind's first set
  print(f"\ncontrol ({CONTROL} x 2 in our copy only, {kind}, {args.n} images): max abs diff / "
        f"max abs feature {np.abs(c - t).max() / np.abs(t).max():.2e}, relative L2 diff "
        f"{np.linalg.norm(c - t) / np.linalg.norm(t):.2e}")


if __name__ == "__main__":
  import _common  # benchmarks/_common.py
  _common.entry(main)
