"""Inception FID for real data: user-supplied InceptionV3 weights, cached reference statistics.

Nothing is downloaded. Set ``config.eval.inception_weights=/path/to/inception.npz`` (or
``.pkl``); the report then adds an ``fid`` column: the Fréchet distance between the pool3
features (``fmdistill.eval.inception``) of the samples and reference statistics of the run's
dataset (for ``data.name='tfds'``: the ``data.split`` of ``data.tfds_name`` in ``data.data_dir``),
with the data-vs-data floor (held-out data against the same statistics) beside it.

**Weight file layout.** A flat mapping from PyTorch state-dict names to arrays, exactly as
pytorch-fid's ``FIDInceptionV3`` (the ``pt_inception-2015-12-05`` weights) names and shapes them:

* ``<unit>.conv.weight``: ``(out, in, kh, kw)`` float32 (OIHW; transposed to HWIO on load);
* ``<unit>.bn.weight``, ``<unit>.bn.bias``, ``<unit>.bn.running_mean``, ``<unit>.bn.running_var``:
  ``(out,)`` float32;

for the 94 units ``Conv2d_1a_3x3``, ``Conv2d_2a_3x3``, ``Conv2d_2b_3x3``, ``Conv2d_3b_1x1``,
``Conv2d_4a_3x3`` and ``Mixed_{5b,5c,5d,6a,6b,6c,6d,6e,7a,7b,7c}.<branch>`` (e.g.
``Mixed_5b.branch5x5_1``, ``Mixed_7c.branch3x3dbl_3b``; ``inception.layer_names`` lists them).
Other keys (``fc.*``, ``*.num_batches_tracked``) are ignored. Stored as ``.npz``
(``numpy.savez``, read without pickle) or ``.pkl`` (a pickled ``dict`` of numpy arrays; only
load a pickle you made). Converting the pytorch-fid weights (on a machine with PyTorch)::

    import numpy as np, torch
    sd = torch.load("pt_inception-2015-12-05-6726825d.pth", map_location="cpu")
    np.savez("inception.npz", **{k: v.numpy() for k, v in sd.items()})

``save_weights`` writes params in this layout (used by the tests' round trip).
``benchmarks/inception_parity.py`` checks network, preprocessing and this conversion against
pytorch-fid's ``InceptionV3`` with random weights (features equal to ~1e-6 relative).

**Reference statistics** ``(mu, sigma)`` are cached in the report directory as
``fid_stats_<dataset>_<split>_<n>_<weights sha256[:16]>.npz``: a changed weight file or split is
a different file; delete it to recompute.
"""
from __future__ import annotations

import hashlib
import os
import pickle
import re
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from fmdistill.errors import ConfigError, DataError
from fmdistill.eval import inception, metrics

_BN = {"weight": "scale", "bias": "bias", "running_mean": "mean", "running_var": "var"}


def _read(path: str) -> dict[str, np.ndarray]:
  """The raw ``{name: array}`` mapping of a weight file (one-line errors)."""
  if not path or not os.path.isfile(path):
    raise ConfigError(f"config.eval.inception_weights={path!r}: no such file (Inception weights "
                      "are never downloaded; convert them as fmdistill/eval/fid.py describes)")
  try:
    if path.endswith(".pkl"):
      with open(path, "rb") as f:
        raw = pickle.load(f)
    else:
      with np.load(path, allow_pickle=False) as z:
        raw = {k: z[k] for k in z.files}
    return {str(k): np.asarray(v) for k, v in dict(raw).items()}
  except Exception as e:  # noqa: BLE001  any unreadable file is one line naming it
    raise DataError(f"Inception weights {path!r} cannot be read as "
                    f"{'a pickled dict' if path.endswith('.pkl') else 'an .npz file'}: "
                    f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None


def _torch_name(path: str) -> tuple[str, str]:
  """``'Mixed_5b/branch1x1/bn/scale'`` -> ``('Mixed_5b.branch1x1.bn.weight', 'bn')``."""
  *unit, part, leaf = path.split("/")
  name = {"kernel": "weight"} if part == "conv" else {v: k for k, v in _BN.items()}
  return ".".join(unit + [part, name[leaf]]), part


def load_params(path: str) -> dict:
  """InceptionV3 params (the nested dict of ``inception.abstract``) from a weight file in the
  layout above; a missing file, a missing key or a wrong shape is one line naming the file."""
  raw = _read(path)
  _, shaped = inception.abstract()
  want = inception.shapes(shaped)
  missing = [_torch_name(p)[0] for p in want if _torch_name(p)[0] not in raw]
  if missing:
    raise DataError(f"Inception weights {path!r} lack {len(missing)} of {len(want)} arrays "
                    f"(e.g. {missing[0]!r}); expected PyTorch state-dict names as in "
                    "fmdistill/eval/fid.py")
  flat = {}
  for p, shape in want.items():
    key, part = _torch_name(p)
    v = raw[key].astype(np.float32)
    v = v.transpose(2, 3, 1, 0) if part == "conv" and v.ndim == 4 else v
    if v.shape != shape:
      expected = (shape[3], shape[2], shape[0], shape[1]) if part == "conv" else shape
      raise DataError(f"Inception weights {path!r}: {key!r} has shape {raw[key].shape}; "
                      f"expected {expected}")
    flat[p] = jnp.asarray(v)
  return jax.tree_util.tree_map_with_path(
      lambda kp, _: flat["/".join(str(k.key) for k in kp)], shaped)


def state_dict(params: dict) -> dict[str, np.ndarray]:
  """``params`` as the flat PyTorch-named mapping of the weight file layout."""
  out = {}
  for p in inception.shapes(params):
    key, part = _torch_name(p)
    v = np.asarray(_get(params, p))
    out[key] = v.transpose(3, 2, 0, 1) if part == "conv" else v
  return out


def save_weights(params: dict, path: str) -> None:
  """Write ``params`` to ``path`` (``.npz`` or ``.pkl``) in the PyTorch layout ``load_params``
  reads."""
  out = state_dict(params)
  if path.endswith(".pkl"):
    with open(path, "wb") as f:
      pickle.dump(out, f)
  else:
    np.savez(path, **out)


def _get(tree: dict, path: str) -> Any:
  for k in path.split("/"):
    tree = tree[k]
  return tree


def file_sha256(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


def feature_fn(params: dict, graphdef: Any = None, batch: int = 50
               ) -> Callable[[np.ndarray], np.ndarray]:
  """``images (n, H, W, C) in [-1, 1] -> (n, 2048)`` pool3 features, ``batch`` at a time (the
  last batch padded, so one compiled program serves every size)."""
  graphdef = graphdef if graphdef is not None else inception.abstract()[0]
  run = inception.features_fn(graphdef)

  def features(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    out = []
    for i in range(0, len(x), batch):
      chunk = x[i:i + batch]
      pad = np.concatenate([chunk, np.repeat(chunk[-1:], batch - len(chunk), 0)])
      out.append(np.asarray(run(params, jnp.asarray(pad)))[:len(chunk)])
    return np.concatenate(out).astype(np.float64)
  return features


def stats_key(dataset: str, split: str, n: int, weights_sha: str) -> str:
  safe = re.sub(r"[^A-Za-z0-9_.-]+", "-", dataset)
  return f"fid_stats_{safe}_{split}_{n}_{weights_sha[:16]}.npz"


def reference_stats(images: Callable[[np.ndarray], np.ndarray], size: int,
                    features: Callable[[np.ndarray], np.ndarray], cache: str,
                    max_examples: int = 50_000, batch: int = 500) -> tuple[np.ndarray, np.ndarray]:
  """``(mu, sigma)`` of the features of the first ``min(size, max_examples)`` examples
  (``images(indices) -> (b, H, W, C)``), read ``batch`` at a time; stored at ``cache`` and read
  back from it when it exists."""
  if os.path.isfile(cache):
    with np.load(cache) as z:
      return z["mu"], z["sigma"]
  n = min(size, max_examples)
  f = np.concatenate([features(images(np.arange(i, min(i + batch, n))))
                      for i in range(0, n, batch)])
  mu, sigma = metrics.gaussian_stats(f)
  os.makedirs(os.path.dirname(os.path.abspath(cache)), exist_ok=True)
  np.savez(cache + ".tmp.npz", mu=mu, sigma=sigma)
  os.replace(cache + ".tmp.npz", cache)
  return mu, sigma


def fid_fn(features: Callable[[np.ndarray], np.ndarray], mu: np.ndarray, sigma: np.ndarray
           ) -> Callable[[np.ndarray], float]:
  """``samples -> FID`` against the reference statistics ``(mu, sigma)``."""
  def fid(samples: np.ndarray) -> float:
    return metrics.frechet_from_stats(*metrics.gaussian_stats(features(samples)), mu, sigma)
  return fid
