"""A TFDS builder for the bundled digits, so the TFDS path is exercised offline.

``FmdistillDigits`` writes array_record files with ``tfds.features.Tensor`` features, which
build and read back through ``tfds.data_source`` without TensorFlow installed. Build it with
``build_digits(data_dir)``; then ``data.name='tfds'``, ``data.tfds_name='fmdistill_digits'``,
``data.data_dir=...`` loads it like any other TFDS dataset.
"""
from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds

from fmdistill.data import images


class FmdistillDigits(tfds.core.GeneratorBasedBuilder):
  """scikit-learn's 8x8 digits in [-1, 1]; train = first 1500 images, test = the rest."""
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description="scikit-learn bundled digits, float32 in [-1, 1]",
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Tensor(shape=(8, 8, 1), dtype=np.float32),
            "label": tfds.features.Tensor(shape=(), dtype=np.int64),
        }),
        supervised_keys=("image", "label"))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples(0, 1500),
            "test": self._generate_examples(1500, None)}

  def _generate_examples(self, start, stop):
    x, y = images.digits()
    for i in range(start, len(x) if stop is None else stop):
      yield i, {"image": x[i], "label": int(y[i])}


def build_digits(data_dir: str) -> str:
  """Build ``fmdistill_digits`` into ``data_dir`` (array_record); returns the dataset name."""
  FmdistillDigits(data_dir=data_dir, file_format="array_record").download_and_prepare()
  return "fmdistill_digits"
