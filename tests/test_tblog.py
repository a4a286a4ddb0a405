"""TensorBoard event files (``fmdistill.tblog``), read back as TFRecord streams of ``Event``
protos with their checksums: scalars and images, the purge marker of a resume, and write
failures as one warning line. The event files of a real training run (every metrics.jsonl tag
and an image per evaluation) are checked on the command-line batch in ``test_reliability``;
``train.tensorboard=False`` in ``test_train``."""
import os
import resource

import numpy as np

from fmdistill import tblog
from fmdistill.eval import plots


def _png() -> bytes:
  return plots.samples_png({"x": np.random.default_rng(0).normal(size=(500, 2))})


def test_scalars_and_an_image_read_back(tmp_path):
  tb = tblog.TBLog(str(tmp_path / "tb"), 0)
  tb.scalars({"step": 1, "loss": 0.5, "health/alarm": 0, "bad": None, "inf": float("inf")}, 1)
  png = _png()
  tb.image("eval/samples", png, 1)
  tb.close()
  events = tblog.read_events(str(tmp_path / "tb"))
  assert tblog.tags(events) == {"loss": [1], "health/alarm": [1], "eval/samples": [1]}
  (img,) = [v.image for _, e in events for v in e.summary.value if v.HasField("image")]
  assert img.encoded_image_string == png
  assert (img.height, img.width) == tblog.png_size(png) and img.width > 100


def test_a_resume_starts_a_new_file_with_a_purge_marker(tmp_path):
  tblog.TBLog(str(tmp_path), 0).close()
  tb = tblog.TBLog(str(tmp_path), 4)  # resumed from the checkpoint at step 4
  tb.scalars({"loss": 1.0}, 5)
  tb.close()
  events = tblog.read_events(str(tmp_path))
  files = sorted({f for f, _ in events})
  assert len(files) == 2 and all(f.startswith("events.out.tfevents.") for f in files)
  purge = [(f, e.step) for f, e in events if e.session_log.status == e.session_log.START]
  assert purge == [(files[1], 5)]  # TensorBoard hides the older file's steps >= 5


def test_a_full_disk_stops_tensorboard_with_one_warning(tmp_path, capsys):
  tb = tblog.TBLog(str(tmp_path / "tb"), 0)
  tb.scalars({"loss": 0.5}, 1)
  png = _png()
  limit = resource.getrlimit(resource.RLIMIT_FSIZE)
  resource.setrlimit(resource.RLIMIT_FSIZE, (4096, limit[1]))  # the PNG does not fit
  try:
    tb.image("eval/samples", png, 2)
  finally:
    resource.setrlimit(resource.RLIMIT_FSIZE, limit)
  assert not tb.active
  tb.scalars({"loss": 0.25}, 3)  # a no-op from now on
  tb.close()
  err = [l for l in capsys.readouterr().err.splitlines() if l.strip()]
  assert len(err) == 1 and "TensorBoard logging stopped" in err[0], err
  assert "File too large" in err[0]
  assert tblog.tags(tblog.read_events(str(tmp_path / "tb"))) == {"loss": [1]}


def test_a_directory_that_cannot_be_made_is_one_warning(tmp_path, capsys):
  (tmp_path / "tensorboard").write_text("a file where the directory goes")
  tb = tblog.TBLog(str(tmp_path / "tensorboard"), 0)
  tb.scalars({"loss": 0.5}, 1)
  tb.close()
  err = [l for l in capsys.readouterr().err.splitlines() if l.strip()]
  assert not tb.active and len(err) == 1 and "TensorBoard logging stopped" in err[0], err
  assert os.path.isfile(tmp_path / "tensorboard")
