"""``metrics.jsonl``: one JSON object per logged step, consistent across resumes.

* Strict JSON: a non-finite figure is written as ``null`` and its name listed under
  ``"nonfinite"`` (Python's ``json`` would write a bare ``NaN``, which JSON readers reject).
* ``time``: seconds of training since the run's first start, continued across resumes.
* On resume (``MetricsLog(path, step)``), lines past the restored checkpoint's step are dropped
  (those steps run again and log again), and a line that is not JSON — the half-written last
  line of a process killed mid-write or of a full disk — is dropped with a one-line note; every
  other line is kept.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time


def clean(record: dict) -> dict:
  """``record`` with non-finite floats as ``None``, named under ``'nonfinite'``."""
  out, bad = {}, []
  for k, v in record.items():
    if isinstance(v, float) and not math.isfinite(v):
      out[k] = None
      bad.append(k)
    else:
      out[k] = v
  if bad:
    out["nonfinite"] = bad
  return out


def resume(path: str, step: int) -> float:
  """Repair and trim ``path`` for a run resuming at ``step``; returns the logged ``time`` of
  the last kept line (0 if none)."""
  if not os.path.exists(path):
    return 0.0
  keep, dropped = [], []
  with open(path) as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
        if not isinstance(record, dict):
          raise ValueError("not an object")
      except ValueError:
        dropped.append(n)
        continue
      if record.get("step", 0) <= step:
        keep.append(record)
  if dropped:
    print(f"note: {path}: dropped {len(dropped)} unreadable line(s) (line "
          f"{', '.join(map(str, dropped[:5]))}; a write cut short), kept {len(keep)}",
          file=sys.stderr)
  with open(path + ".tmp", "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in keep)
  os.replace(path + ".tmp", path)
  times = [r["time"] for r in keep if isinstance(r.get("time"), (int, float))]
  return float(times[-1]) if times else 0.0


class MetricsLog:
  """Appends to ``path`` (``None``: a no-op, for processes other than 0)."""

  def __init__(self, path: str | None, step: int):
    self.path = path
    offset = resume(path, step) if path else 0.0
    self.t0 = time.time() - offset
    self.f = open(path, "a") if path else None

  def write(self, record: dict) -> dict:
    """Add ``time`` and write one line; returns what was written."""
    record = clean(dict(record, time=time.time() - self.t0))
    if self.f is not None:
      self.f.write(json.dumps(record, allow_nan=False) + "\n")
      self.f.flush()
    return record

  def close(self) -> None:
    if self.f is not None:
      self.f.close()
