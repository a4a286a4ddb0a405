"""TFDS datasets from a local ``data_dir`` (nothing is downloaded at run time).

* array_record datasets are read by random access through ``tfds`` data sources, with no
  TensorFlow installed (``tfds.features.Tensor`` features; ``Image`` features decode with TF);
* tfrecord datasets go through ``tf.data`` and need the ``tf`` extra
  (``pip install 'fmdistill[tf]'``); they are read once into host memory, so this path is for
  datasets that fit in RAM — convert larger ones to array_record
  (``tfds build --file_format=array_record``).

Images stored as ``uint8`` are mapped to ``[-1, 1]``; float images are taken as they are.
"""
from __future__ import annotations

import os

import ml_collections
import numpy as np

from fmdistill.errors import ConfigError


def _builder(cfg):
  import tensorflow_datasets as tfds
  from fmdistill.data import tfds_builder  # noqa: F401  registers fmdistill_digits
  root = os.path.join(cfg.data_dir, cfg.tfds_name)
  versions = sorted(d for d in os.listdir(root) if d[:1].isdigit())
  prepared = [v for v in versions if os.path.isfile(os.path.join(root, v, "dataset_info.json"))]
  if not prepared:
    where = (f"{os.path.join(root, versions[-1])} has no dataset_info.json" if versions
             else f"{root} has no version directory")
    raise FileNotFoundError(f"TFDS dataset {cfg.tfds_name!r} under data.data_dir="
                            f"{cfg.data_dir!r} is not prepared ({where}); build it there "
                            "(tfds build) or copy the whole prepared directory")
  try:
    return tfds.builder(cfg.tfds_name, data_dir=cfg.data_dir)
  except Exception:  # noqa: BLE001  not a registered builder: read the prepared directory
    return tfds.builder_from_directory(os.path.join(root, prepared[-1]))


def _tfrecord_rows(builder, split: str) -> list[dict]:
  try:
    import tensorflow  # noqa: F401
  except ImportError:
    raise ConfigError(f"config.data.tfds_name={builder.name!r} is stored as tfrecord, which is "
                      "read through tf.data: install the 'tf' extra (pip install "
                      "'fmdistill[tf]') or rebuild it as array_record") from None
  import tensorflow_datasets as tfds
  return list(tfds.as_numpy(builder.as_dataset(split=split, shuffle_files=False)))


def rows(cfg: ml_collections.ConfigDict):
  """An indexable sequence of example dicts for ``cfg.tfds_name`` / ``cfg.split``."""
  if not cfg.data_dir:
    raise ConfigError("config.data.data_dir is empty: TFDS datasets are read from a local "
                      "data_dir (nothing is downloaded at run time)")
  if not os.path.isdir(os.path.join(cfg.data_dir, cfg.tfds_name)):
    raise FileNotFoundError(f"TFDS dataset {cfg.tfds_name!r} not found under data.data_dir="
                            f"{cfg.data_dir!r}; build or copy it there first")
  builder = _builder(cfg)
  fmt = str(getattr(builder.info.file_format, "value", builder.info.file_format))
  if cfg.split not in builder.info.splits:
    raise ConfigError(f"config.data.split={cfg.split!r} is not a split of {cfg.tfds_name!r}; "
                      f"accepted: {sorted(builder.info.splits)}")
  if fmt == "array_record":
    return builder.as_data_source(split=cfg.split)
  return _tfrecord_rows(builder, cfg.split)


def to_arrays(rows_, idx, cfg, labelled: bool) -> dict:
  batch = [rows_[int(i)] for i in idx]
  x = np.stack([np.asarray(r[cfg.image_key]) for r in batch])
  x = x / 127.5 - 1.0 if x.dtype == np.uint8 else x
  out = {"x": x.astype(np.float32)}
  if labelled:
    out["cond"] = np.asarray([r[cfg.label_key] for r in batch], np.int32)
  return out
