"""A resumable on-disk cache of teacher ODE trajectories (noise -> data), for direct
distillation and ReFlow (seed ``000_*`` section 1: "the teacher generates the paired endpoint,
usually the expensive step").

Chunks are written as ``chunk_XXXXX.npz`` through a temporary file and an atomic rename, so a
process killed mid-way leaves only complete chunks; a restart generates just the missing ones.
``meta.json`` records what the cache was built with; a cache built with other settings is
refused rather than mixed. In a multi-process run (a shared directory) chunk ``c`` has one
writer, process ``c % process_count``; the others wait for its file to appear.
"""
from __future__ import annotations

import json
import os
import threading
import time
from typing import Callable

import numpy as np
from tqdm import tqdm


def build_cache(directory: str, generate: Callable[[int, int], dict], num: int, chunk: int,
                meta: dict, progress: bool = True, process_index: int = 0,
                process_count: int = 1, wait_s: float = 3600.0) -> dict:
  """Fill ``directory`` with ``ceil(num / chunk)`` chunks and return their concatenation.

  ``generate(chunk_index, chunk_size) -> {name: array (chunk_size, ...)}`` must be a pure
  function of its arguments (seed it from the chunk index). Process ``process_index`` of
  ``process_count`` writes the chunks ``c`` with ``c % process_count == process_index`` (its
  own first, so no process waits while it could work) and reads the others' once they appear,
  waiting at most ``wait_s`` seconds for each (``TimeoutError`` naming the file).
  """
  os.makedirs(directory, exist_ok=True)
  meta = dict(meta, num=num, chunk=chunk)
  meta_path = os.path.join(directory, "meta.json")
  if os.path.exists(meta_path):
    with open(meta_path) as f:
      old = json.load(f)
    if old != json.loads(json.dumps(meta)):
      raise ValueError(f"pair cache {directory} was built with different settings: {old} "
                       f"!= {meta}; remove it or choose another directory")
  else:
    tmp = f"{meta_path}.{_writer_id()}.tmp"  # writers of one run write the same content
    with open(tmp, "w") as f:
      json.dump(meta, f, indent=1, sort_keys=True)
    os.replace(tmp, meta_path)
  n_chunks = -(-num // chunk)
  chunk_path = lambda c: os.path.join(directory, f"chunk_{c:05d}.npz")
  mine = [c for c in range(n_chunks) if c % process_count == process_index]
  for c in tqdm(mine, desc="teacher pairs", disable=not progress, leave=False):
    path = chunk_path(c)
    if not os.path.exists(path):
      arrays = {k: np.asarray(v) for k, v in generate(c, chunk).items()}
      tmp = f"{path}.{_writer_id()}.tmp.npz"  # atomic: a reader never sees a partial chunk
      np.savez(tmp, **arrays)
      os.replace(tmp, path)
  parts = []
  for c in range(n_chunks):
    _wait_for(chunk_path(c), wait_s)
    with np.load(chunk_path(c)) as z:
      parts.append({k: z[k] for k in z.files})
  return {k: np.concatenate([p[k] for p in parts])[:num] for k in parts[0]}


def _writer_id() -> str:
  """Unique per process and thread (a temporary file name no other writer uses)."""
  return f"{os.getpid()}-{threading.get_ident()}"


def _wait_for(path: str, timeout: float) -> None:
  """Block until another process's chunk ``path`` exists."""
  t0 = time.time()
  while not os.path.exists(path):
    if time.time() - t0 > timeout:
      raise TimeoutError(f"pair cache chunk {path} did not appear within {timeout:.0f} s (its "
                         "writer is another process of this run)")
    time.sleep(0.5)
