"""fmdistill: few-step generative models as flow maps f(x_t, t, s) = x_s, in JAX/Flax.

See ``DESIGN.md`` conventions: t = 0 is data, t = T is noise; a network has the one call
signature ``F(params, x, t, s, cond)``; objectives are pure functions registered by name in
``fmdistill.objectives``.
"""

__version__ = "0.1.0"
