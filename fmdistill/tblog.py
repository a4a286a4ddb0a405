"""TensorBoard event files (``<workdir>/tensorboard/``) beside ``metrics.jsonl``, written with
tensorboardX (no TensorFlow): ``tensorboard --logdir <workdir>``.

* Scalars: every number of a ``metrics.jsonl`` line (loss, grad_norm, ``health/*``, ``eval/*``,
  ``time``) under its own name, at its step; a non-finite figure is skipped (``metrics.jsonl``
  names it).
* Images: sample figures (``fmdistill.eval.plots.samples_png``) at each evaluation.
* Written synchronously (no writer thread), so a failure is caught here: a full disk or an
  unwritable directory is one warning line on stderr and TensorBoard logging stops for the rest
  of the process; training, checkpoints and ``metrics.jsonl`` carry on.
* On resume at step ``S`` a new event file starts with a purge marker at ``S + 1``: TensorBoard
  hides the older files' events past the restored checkpoint (those steps run again).
"""
from __future__ import annotations

import contextlib
import math
import os
import struct
import sys
import time

DIR = "tensorboard"


def png_size(png: bytes) -> tuple[int, int]:
  """``(height, width)`` of a PNG from its IHDR chunk."""
  if png[:8] != b"\x89PNG\r\n\x1a\n":
    raise ValueError("not a PNG")
  width, height = struct.unpack(">II", png[16:24])
  return height, width


def scalars_of(record: dict) -> dict[str, float]:
  """The finite numbers of a ``metrics.jsonl`` record, without its ``step``."""
  return {k: float(v) for k, v in record.items()
          if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)
          and math.isfinite(v)}


class TBLog:
  """Event files in ``logdir`` (``None``: a no-op, for processes other than 0 or
  ``train.tensorboard=False``) for a run that starts (or resumes) at ``step``."""

  def __init__(self, logdir: str | None, step: int):
    self.logdir, self.writer = logdir, None
    if logdir is None:
      return
    try:
      from tensorboardX.event_file_writer import EventsWriter
      os.makedirs(logdir, exist_ok=True)
      # the name's time has whole seconds: a restart within one second would truncate the
      # older file without a finer (and ordered) suffix
      suffix = f".{time.time_ns() % 10**9:09d}.{os.getpid()}"
      self.writer = EventsWriter(os.path.join(logdir, "events"), suffix)
      if step > 0:
        self._purge(step + 1)
      self.writer.flush()
    except OSError as e:
      self._fail(e)

  @property
  def active(self) -> bool:
    return self.writer is not None

  def _event(self, step: int, **fields):
    from tensorboardX.proto.event_pb2 import Event
    return Event(wall_time=time.time(), step=int(step), **fields)

  def _purge(self, step: int) -> None:
    from tensorboardX.proto.event_pb2 import SessionLog
    self.writer.write_event(self._event(step, file_version="brain.Event:2"))
    self.writer.write_event(self._event(step, session_log=SessionLog(status=SessionLog.START)))

  def _write(self, step: int, values: list) -> None:
    if self.writer is None or not values:
      return
    from tensorboardX.proto.summary_pb2 import Summary
    try:
      self.writer.write_event(self._event(step, summary=Summary(value=values)))
      self.writer.flush()
    except OSError as e:
      self._fail(e)

  def scalars(self, record: dict, step: int) -> None:
    """Every finite number of ``record`` (a ``metrics.jsonl`` line) at ``step``."""
    if self.writer is None:
      return
    from tensorboardX.proto.summary_pb2 import Summary
    self._write(step, [Summary.Value(tag=k, simple_value=v)
                       for k, v in scalars_of(record).items()])

  def image(self, tag: str, png: bytes, step: int) -> None:
    """A PNG (e.g. ``plots.samples_png``) as the image ``tag`` at ``step``."""
    if self.writer is None:
      return
    from tensorboardX.proto.summary_pb2 import Summary
    h, w = png_size(png)
    img = Summary.Image(height=h, width=w, colorspace=4, encoded_image_string=png)
    self._write(step, [Summary.Value(tag=tag, image=img)])

  def _fail(self, e: OSError) -> None:
    print(f"warning: TensorBoard logging stopped, could not write to {self.logdir} "
          f"({' '.join(str(e).split())}); training and metrics.jsonl continue", file=sys.stderr)
    self.close()

  def close(self) -> None:
    if self.writer is not None:
      writer, self.writer = self.writer, None
      try:
        writer.close()
      except OSError:  # the flush failed: close the file without it
        with contextlib.suppress(OSError):
          writer._py_recordio_writer.close()  # noqa: SLF001


def read_events(logdir: str) -> list[tuple[str, object]]:
  """``(file name, Event proto)`` for every complete record of every event file in ``logdir``,
  in file-name order (TFRecord framing: uint64 length, masked crc32c of it, the data, masked
  crc32c of the data; a checksum that does not match is a ``ValueError``, a record cut short
  at the end of a file ends that file)."""
  from tensorboardX.proto.event_pb2 import Event
  from tensorboardX.record_writer import masked_crc32c
  out = []
  for name in sorted(os.listdir(logdir)):
    with open(os.path.join(logdir, name), "rb") as f:
      data = f.read()
    i = 0
    while i + 12 <= len(data):
      header = data[i:i + 8]
      (n,) = struct.unpack("<Q", header)
      if i + 16 + n > len(data):
        break
      body = data[i + 12:i + 12 + n]
      if (struct.unpack("<I", data[i + 8:i + 12])[0] != masked_crc32c(header)
          or struct.unpack("<I", data[i + 12 + n:i + 16 + n])[0] != masked_crc32c(body)):
        raise ValueError(f"{name}: bad checksum in the record at byte {i}")
      out.append((name, Event.FromString(body)))
      i += 16 + n
  return out


def tags(events: list) -> dict[str, list[int]]:
  """``{tag: [step, ...]}`` of ``read_events``'s summaries."""
  out = {}
  for _, e in events:
    for v in e.summary.value:
      out.setdefault(v.tag, []).append(int(e.step))
  return out
