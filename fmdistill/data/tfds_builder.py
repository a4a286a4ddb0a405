"""TFDS builders for the bundled digits and the generated 32x32 scenes, so the TFDS path is
exercised offline and serves the same data as ``data.name='digits'`` / ``'scenes'``.

``FmdistillDigits`` writes array_record files with ``tfds.features.Tensor`` features, which
build and read back through ``tfds.data_source`` without TensorFlow installed. Build it with
``build_digits(data_dir)``; then ``data.name='tfds'``, ``data.tfds_name='fmdistill_digits'``,
``data.data_dir=...`` loads it like any other TFDS dataset.

``FmdistillScenes`` stores ``fmdistill.data.scenes`` as ``uint8`` images (which the TFDS path
maps to ``[-1, 1]`` exactly as the in-memory set does) with ``label`` and ``index`` (the position
in ``scenes(n, seed)``) features. Configs: ``default`` (train = ``scenes(8192, seed=0)``, the
set ``data.name='scenes', data.num_examples=8192`` serves; test = ``scenes(2048, seed=1)``) and
``small`` (512 / 128, for tests). ``build_scenes(data_dir, config)`` builds one; then
``data.tfds_name='fmdistill_scenes/default'`` (``num_classes=10``).
"""
from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds

from fmdistill.data import images, scenes


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


class FmdistillScenes(tfds.core.GeneratorBasedBuilder):
  """``fmdistill.data.scenes``: 32x32 RGB uint8 scenes, 10 classes (shape x colour family)."""
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = [
      tfds.core.BuilderConfig(name="default",
                              description="train 8192 (seed 0), test 2048 (seed 1)"),
      tfds.core.BuilderConfig(name="small", description="train 512 (seed 0), test 128 (seed 1)")]
  SIZES = {"default": (8192, 2048), "small": (512, 128)}

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description="procedurally rendered 32x32 RGB scenes (fmdistill.data.scenes)",
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Tensor(shape=(32, 32, 3), dtype=np.uint8),
            "label": tfds.features.Tensor(shape=(), dtype=np.int64),
            "index": tfds.features.Tensor(shape=(), dtype=np.int64),
        }),
        supervised_keys=("image", "label"))

  def _split_generators(self, dl_manager):
    train, test = self.SIZES[self.builder_config.name]
    return {"train": self._generate_examples(train, 0), "test": self._generate_examples(test, 1)}

  def _generate_examples(self, n: int, seed: int):
    x, y = scenes.scenes_uint8(n, seed)
    for i in range(n):
      yield i, {"image": x[i], "label": int(y[i]), "index": i}


def build_scenes(data_dir: str, config: str = "default") -> str:
  """Build ``fmdistill_scenes/<config>`` into ``data_dir`` (array_record); returns its name."""
  name = f"fmdistill_scenes/{config}"
  tfds.builder(name, data_dir=data_dir, file_format="array_record").download_and_prepare()
  return name
