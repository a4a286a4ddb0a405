"""PNG figures: sample scatters (2-D), image grids, and quality-vs-NFE curves."""
from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def samples_figure(panels: dict[str, np.ndarray], path: str, reference: np.ndarray | None = None,
                   title: str = "") -> None:
  """One panel per entry: a scatter for ``(n, 2)`` arrays, an image grid for ``(n, H, W, C)``;
  written as a PNG to ``path``."""
  png = samples_png(panels, reference, title)
  with open(path, "wb") as f:
    f.write(png)


def samples_png(panels: dict[str, np.ndarray], reference: np.ndarray | None = None,
                title: str = "") -> bytes:
  """``samples_figure`` as PNG bytes (for TensorBoard images)."""
  items = ([("data", reference)] if reference is not None else []) + list(panels.items())
  fig, axes = plt.subplots(1, len(items), figsize=(3.0 * len(items), 3.2), squeeze=False)
  for ax, (name, x) in zip(axes[0], items):
    if x.ndim == 2:
      ax.scatter(x[:2000, 0], x[:2000, 1], s=1.5, alpha=0.5, color="C0" if name != "data" else "k")
      ax.set_xlim(-4, 4)
      ax.set_ylim(-4, 4)
      ax.set_aspect("equal")
    else:
      ax.imshow(image_grid(x[:64]), cmap="gray", vmin=0, vmax=1)
      ax.set_xticks([])
      ax.set_yticks([])
    ax.set_title(name, fontsize=9)
  if title:
    fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=110)
  plt.close(fig)
  return buf.getvalue()


def image_grid(x: np.ndarray, cols: int = 8) -> np.ndarray:
  """``(n, H, W, C)`` in [-1, 1] -> one ``(rows*H, cols*W)`` or RGB image in [0, 1]."""
  n, h, w, c = x.shape
  rows = -(-n // cols)
  pad = np.full((rows * cols - n, h, w, c), -1.0, x.dtype)
  x = np.concatenate([x, pad]).reshape(rows, cols, h, w, c).transpose(0, 2, 1, 3, 4)
  img = np.clip((x.reshape(rows * h, cols * w, c) + 1) / 2, 0, 1)
  return img[..., 0] if c == 1 else img


def quality_figure(curves: dict[str, dict[int, float]], floor: float, metric: str,
                   path: str) -> None:
  """``curves[name][evaluations] = value`` on log-log axes (network evaluations per sample),
  with the data-vs-data floor dashed."""
  fig, ax = plt.subplots(figsize=(5, 3.6))
  for i, (name, c) in enumerate(curves.items()):
    nfes = sorted(c)
    ax.plot(nfes, [c[k] for k in nfes], "o-", label=name, color=f"C{i}")
  ax.axhline(floor, ls="--", color="gray", label="data vs data (floor)")
  ax.set_xscale("log", base=2)
  ax.set_yscale("log")
  ax.set_xlabel("network evaluations")
  ax.set_ylabel(metric)
  ax.legend(fontsize=8)
  ax.grid(alpha=0.3, which="both")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
