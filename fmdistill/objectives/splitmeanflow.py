"""SplitMeanFlow (Guo et al. 2025, "SplitMeanFlow: Interval Splitting Consistency in Few-Step
Generative Modeling"; seed ``001_*`` "MeanFlow": "SplitMeanFlow circumvents this issue by
enforcing another consistency identity").

The average velocity ``u(x_t, t, s) = 1/(t - s) int_s^t v(x_tau, tau) dtau`` -- the displacement
network ``F`` of ``f = x + (s - t) F`` -- is additive over intervals (the paper's "interval
splitting consistency"): for ``s < r < t``

    (t - s) u(x_t, t, s) = (t - r) u(x_t, t, r) + (r - s) u(x_r, r, s),   x_r = x_t - (t - r) u(x_t, t, r).

With ``lambda ~ U(0, 1)`` and ``r = (1 - lambda) t + lambda s`` (so ``t - r = lambda (t - s)``),
the JVP-free loss regresses ``u_theta(x_t, t, s)`` onto the stop-gradient target

    u_tgt = lambda u^-(x_t, t, r) + (1 - lambda) u^-(x_r, r, s),

(the paper's algorithm, with its ``(r, s, t)`` renamed to our ``(s, r, t)``: ``u2 = u(z_t, s, t)``
is our ``u(x_t, t, r)``, ``u1 = u(z_s, r, s)`` our ``u(x_r, r, s)``), and a fraction
``1 - sc_ratio`` of the batch enforces the boundary ``u(x_t, t, t) = v(x_t, t)`` by flow matching
(conditional velocity, or the teacher's when distilling: ``velocity='teacher'``). In the limit
``lambda -> 0`` the identity becomes MeanFlow's differential one; unlike MeanFlow no ``jax.jvp``
is taken, so any attention kernel works. This is ``tri_consistency`` with ``split='uniform'``
written in ``u``-space for the displacement form: it calls that core, and a test checks it
against the paper's algorithm written out.
"""
from __future__ import annotations

from fmdistill import objectives
from fmdistill.objectives import _common, _semigroup, tri_consistency


def defaults():
  cfg = _common.base_config()
  cfg.sc_ratio = 0.5            # fraction of the batch on the interval-splitting term
  cfg.velocity = "conditional"  # boundary target: 'conditional' or 'teacher'
  return cfg


def splitmeanflow_loss(params, batch, key, *, net, teacher=None, ema_params=None, step=0,
                       cfg=None):
  """Interval-splitting consistency plus boundary flow matching. ``batch['x']``: ``(B, ...)``.

  In the displacement form ``F = u`` the semigroup loss with ``r = t - lambda (t - s)`` regresses
  ``F_theta(x_t, t, s)`` onto ``[(t - r) F^-(x_t, t, r) + (r - s) F^-(x_r, r, s)] / (t - s)``,
  which is ``u_tgt`` above: the computation is ``tri_consistency``'s with ``split='uniform'``."""
  del step
  cfg = cfg or defaults()
  _common.require(cfg, param="displacement", method="splitmeanflow")
  return tri_consistency.semigroup_loss(params, batch, key, net=net, teacher=teacher,
                                        ema_params=ema_params, cfg=cfg, split="uniform",
                                        near=0.5)


def check(config) -> None:
  """Config checks (run by ``config.validate``)."""
  _semigroup.check(config, "splitmeanflow", displacement=True)


objectives.register(objectives.Objective(
    name="splitmeanflow", loss=splitmeanflow_loss, defaults=defaults, check=check,
    doc="SplitMeanFlow: JVP-free interval-splitting consistency + boundary flow matching"))
