"""The paper-scale configs (``experiments/cifar10.py``, ``experiments/imagenet.py``): every
variant resolves and validates, and one train step of each runs on CPU with tiny overrides on a
tiny TFDS dataset generated in tmp with the configs' feature names. The default suite (a hard
15-minute budget) runs one compiled step, ImageNet MeanFlow (the tangent family, conditional
latents, the official loss options); every other variant's step is ``slow``."""
import os
import sys

import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds

from fmdistill import config as config_lib, objectives, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "experiments"))
import cifar10  # noqa: E402
import imagenet  # noqa: E402

N = 16  # examples in each tiny dataset


class FakeCifar10(tfds.core.GeneratorBasedBuilder):
  """CIFAR-10's features (``image`` uint8 32x32x3, ``label`` < 10), ``N`` random examples."""
  VERSION = tfds.core.Version("3.0.2")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Tensor(shape=(32, 32, 3), dtype=np.uint8),
        "label": tfds.features.Tensor(shape=(), dtype=np.int64)}))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    rng = np.random.default_rng(0)
    for i in range(N):
      yield i, {"image": rng.integers(0, 256, (32, 32, 3), dtype=np.uint8), "label": i % 10}


class FakeImagenetLatents(tfds.core.GeneratorBasedBuilder):
  """The ImageNet configs' features (``latent`` float32 32x32x4, ``label`` < 1000)."""
  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "latent": tfds.features.Tensor(shape=(32, 32, 4), dtype=np.float32),
        "label": tfds.features.Tensor(shape=(), dtype=np.int64)}))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    rng = np.random.default_rng(1)
    for i in range(N):
      yield i, {"latent": rng.standard_normal((32, 32, 4), dtype=np.float32),
                "label": (37 * i) % 1000}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> str:
  root = str(tmp_path_factory.mktemp("tfds"))
  for builder in (FakeCifar10, FakeImagenetLatents):
    builder(data_dir=root, file_format="array_record").download_and_prepare()
  return root


CIFAR = list(cifar10.VARIANTS)
IMAGENET = [(m, s) for m in imagenet.METHODS for s in imagenet.SIZES]


@pytest.mark.parametrize("variant", CIFAR)
def test_cifar10_variants_validate(variant):
  c = cifar10.get_config(variant)
  config_lib.validate(c)
  assert (c.data.tfds_name, c.data.conditional, c.model.name) == ("cifar10", False, "dit")
  assert c.method == variant and c.eval.which in ["params"] + [
      f"ema_{d:g}" for d in c.train.ema_decays]


@pytest.mark.parametrize("method,size", IMAGENET)
def test_imagenet_variants_validate(method, size):
  c = imagenet.get_config(f"{method},size={size}")
  config_lib.validate(c)
  assert c.model.width == imagenet.SIZES[size][0] and c.model.patch == 2
  assert (c.data.image_key, c.data.num_classes, c.data.conditional) == ("latent", 1000, True)


def test_meanflow_configs_carry_the_official_values():
  """The values issue 17 names (Gsunshine/meanflow ``configs/default.py``): c = 0.01 on the
  per-example sum, omega = 1 and kappa = 0.5 for B/2, the XL/2 window [0, 0.75]."""
  b = imagenet.get_config("meanflow,size=B").objective
  assert (b.adaptive_c, b.adaptive_reduce, b.adaptive_p) == (0.01, "sum", 1.0)
  assert (b.guidance, b.guidance_kappa, b.guidance_t_min, b.guidance_t_max) == (1, 0.5, 0, 1)
  assert (b.equal_ratio, b.time_mean, b.time_std, b.label_dropout) == (0.75, -0.4, 1.0, 0.1)
  xl = imagenet.get_config("meanflow,size=XL").objective
  assert (xl.guidance, xl.guidance_kappa, xl.guidance_t_max) == (0.2, 0.92, 0.75)
  t = imagenet.get_config("meanflow,size=B").train
  assert (t.batch_size, t.lr, t.b2, t.ema_decays, t.grad_clip) == (256, 1e-4, 0.95, (0.9999,), 0)
  cf = cifar10.get_config("meanflow").objective
  assert (cf.adaptive_p, cf.adaptive_c, cf.adaptive_reduce, cf.equal_ratio) == (
      0.75, 1e-3, "sum", 0.25)


def test_unknown_variants_and_sizes_are_refused():
  from fmdistill.errors import ConfigError
  with pytest.raises(ConfigError, match="no variant"):
    cifar10.get_config("dmd")
  with pytest.raises(ConfigError, match="size"):
    imagenet.get_config("meanflow,size=H")


def tiny(c, data_dir: str, teacher: str = ""):
  """The config at toy size on the tiny dataset: one step, no checkpoints kept beyond it."""
  c.data.data_dir = data_dir
  c.data.tfds_name = "fake_cifar10" if c.data.tfds_name == "cifar10" else "fake_imagenet_latents"
  c.model.update(width=16, depth=1, heads=2, patch=8, dtype="float32")
  c.train.update(steps=1, batch_size=8, log_every=1, ckpt_every=1, warmup_steps=0,
                 eval_every=0, tensorboard=False)
  if "curriculum_steps" in c.objective:
    c.objective.curriculum_steps = 1
  if objectives.entry(c.method).needs_teacher:
    c.teacher.workdir = teacher
  return c


def one_step(c, workdir: str):
  net, state = train.train_and_evaluate(c, workdir, progress=False)
  assert int(state.step) == 1 and int(state.skipped) == 0, c.method
  shape = tuple(c.data_shape)
  out = net(state.params, jnp.zeros((2, *shape)), jnp.ones((2,)), jnp.zeros((2,)),
            jnp.zeros((2,), jnp.int32) if c.objective.num_classes else None)
  assert out.shape == (2, *shape) and bool(jnp.all(jnp.isfinite(out)))
  return state


@pytest.fixture(scope="module")
def cifar_teacher(data_dir, tmp_path_factory) -> str:
  wd = str(tmp_path_factory.mktemp("paper") / "cifar_fm")
  one_step(tiny(cifar10.get_config("flow_matching"), data_dir), wd)
  return wd


@pytest.fixture(scope="module")
def imagenet_teacher(data_dir, tmp_path_factory) -> str:
  wd = str(tmp_path_factory.mktemp("paper") / "imagenet_fm")
  one_step(tiny(imagenet.get_config("flow_matching,size=B"), data_dir), wd)
  return wd


@pytest.mark.slow
def test_cifar10_teacher_trains_one_step(cifar_teacher):
  """Flow-matching family: the CIFAR-10 teacher, unconditional uint8 images (slow: the default
  suite's budget holds one compiled step of these configs, the MeanFlow one below)."""
  assert os.path.isfile(os.path.join(cifar_teacher, "config.json"))


def test_imagenet_meanflow_trains_one_step(data_dir, tmp_path):
  """Tangent family (default suite): MeanFlow with the official sum-reduced weight and the
  kappa-guidance window on class-conditional latents."""
  c = tiny(imagenet.get_config("meanflow,size=XL"), data_dir)
  state = one_step(c, str(tmp_path / "mf"))
  assert c.objective.num_classes == 1000 and set(state.ema) == {"ema_0.9999"}


CIFAR_SLOW = ["scm_ct", "scm_cd", "ect", "ict", "meanflow"]
IMAGENET_SLOW = ["flow_matching", "imf", "scm_cd", "rcm", "imm", "shortcut"]


@pytest.mark.slow
@pytest.mark.parametrize("variant", CIFAR_SLOW)
def test_cifar10_variant_trains_one_step(variant, data_dir, cifar_teacher, tmp_path):
  one_step(tiny(cifar10.get_config(variant), data_dir, cifar_teacher), str(tmp_path / variant))


@pytest.mark.slow
@pytest.mark.parametrize("method", IMAGENET_SLOW)
def test_imagenet_variant_trains_one_step(method, data_dir, imagenet_teacher, tmp_path):
  c = tiny(imagenet.get_config(f"{method},size=B"), data_dir, imagenet_teacher)
  one_step(c, str(tmp_path / method))
