# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # A tour of the losses
#
# Every method in fmdistill is one pure function with one signature:
#
# ```
# loss(params, batch, key, *, net, teacher, ema_params, step, cfg, **parts) -> (scalar, metrics)
# ```
#
# The train loop calls exactly these functions; here we call every registered loss directly on
# arrays. The data is a 2-D Gaussian, so the teacher a distillation method needs is the *exact*
# velocity of the probability-flow ODE (`fmdistill.oracle`), not a trained network, and at the
# end one loss is checked against the closed-form Gaussian flow map.

# %%
import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import jax.numpy as jnp
import optax

from fmdistill import config, models, objectives, oracle, paths, sampling
from fmdistill.objectives import _score  # the DMD2 discriminator head's initialiser

# %% [markdown]
# ## The data, the exact teacher and a tiny flow-map network
#
# `oracle.Gaussian` gives the marginal velocity `v(x, t)` and the flow map `f(x_t, t, s)` of
# Gaussian data on any path (`linear`, `trigflow`, ...). The network is the library's MLP with
# the one call signature `net(params, x, t, s, cond)`; `t`, `s` have shape `(batch,)`.

# %%
DATA = oracle.Gaussian(jnp.array([1.0, -0.5]), jnp.array([0.4, 0.7]))
B = 64


def exact_teacher(path):
  """The teacher's velocity ``teacher(x, t, s, cond)`` (a velocity ignores ``s``)."""
  return lambda x, t, s=None, cond=None: DATA.velocity(path, x, t)


def mlp_net(params, x, t, s, cond=None):
  """``F(params, x, t, s, cond)``: a two-layer MLP on ``[x, t, s]`` (smooth in the times)."""
  h = jnp.concatenate([x, t[:, None], s[:, None]], -1)
  h = jax.nn.silu(h @ params["w1"] + params["b1"])
  return h @ params["w2"] + params["b2"]


def init_mlp(key, d=2, width=64):
  k1, k2 = jax.random.split(key)
  return {"w1": jax.random.normal(k1, (d + 2, width)) / jnp.sqrt(d + 2.0),
          "b1": jnp.zeros(width), "w2": jax.random.normal(k2, (width, d)) / jnp.sqrt(width),
          "b2": jnp.zeros(d)}


net, params = mlp_net, init_mlp(jax.random.key(0))
print("parameters:", models.param_count(params))

# %% [markdown]
# ## Batches and parts
#
# A registry entry says which batch its loss reads (`entry.batch`):
# `'data'` (`{'x'}`), `'teacher_pairs'` (`{'traj'}`: cached teacher ODE states on a grid, here
# the exact ones) or `'prior'` (data-free: `{'z'}`, noise only). Trainable *parts* arrive as
# keyword arguments: a fake-score `critic(x, t, cond)` (here the exact velocity of a *shifted*
# Gaussian, standing for the generator's own samples, with `features` for DMD2's GAN head), a
# discriminator head `disc`, or a jointly trained learned weighting `weighting` (its live
# parameters, initialised by the part's own `init`).

# %%
class OracleCritic:
  """A frozen fake score: the exact velocity of a Gaussian off the data."""

  def __init__(self, path):
    self.path = path
    self.dist = oracle.Gaussian(DATA.mu + jnp.array([0.3, -0.2]), DATA.scale)

  def __call__(self, x, t, cond=None):
    return self.dist.velocity(self.path, x, t)

  def features(self, x, t, cond=None):  # what a discriminator head reads
    return jnp.concatenate([x, t[:, None]], -1)


def make_batch(entry, cfg, path, key):
  if entry.batch == "prior":
    return {"z": jax.random.normal(key, (B, 2))}
  x = DATA.sample(key, B)
  if entry.batch == "data":
    return {"x": x}
  # teacher_pairs: exact ODE states from noise at t = T down the uniform grid, (B, K + 1, 2)
  z = jax.random.normal(jax.random.fold_in(key, 1), (B, 2))
  grid = sampling.time_grid(cfg.pair_steps, path.T)
  traj = jnp.stack([DATA.flow_map(path, z, jnp.full(B, path.T), jnp.full(B, s)) for s in grid],
                   1)
  return {"x": x, "traj": traj}


def make_parts(name, cfg, path, key):
  entry = objectives.entry(name)
  ctx = objectives.PartContext(config=config.base(name), net=net, params=params)
  out = {}
  for part_name, part in entry.parts_for(cfg).items():
    if part_name == "critic":
      out[part_name] = OracleCritic(path)
    elif part_name == "disc":
      out[part_name] = _score.init_head(key, 3)  # reads the critic's 3 features
    else:  # a part the loss uses as raw parameters (learned weighting): its own init
      out[part_name] = part.init(key, ctx)
  return out


# %% [markdown]
# ## Every registered loss, called on arrays
#
# For each method: its defaults (`objectives.default_config(name)`), a batch of the kind it
# reads, the exact teacher on the method's path when it needs one, its parts, and
# `jax.value_and_grad` in the student's parameters. `ema_params` (the target `theta^-`) is the
# student itself here, as at step 0. The losses are pure, so all of them can be traced into one
# `jax.jit` program (one compilation instead of one per method).

# %%
def loss_and_grad_norm(name, key):
  entry = objectives.entry(name)
  cfg = objectives.default_config(name)
  if cfg.get("curriculum_steps", None) == 0:  # the train loop sets it to train.steps
    cfg.curriculum_steps = 1000
  path = paths.get_path(cfg.path, cfg.sigma_d)
  kb, kp, kl = jax.random.split(key, 3)
  batch = make_batch(entry, cfg, path, kb)
  parts = make_parts(name, cfg, path, kp)
  teacher = exact_teacher(path) if entry.needs_teacher else None
  loss_fn = objectives.get(name)

  def f(p):
    return loss_fn(p, batch, kl, net=net, teacher=teacher, ema_params=params, step=0, cfg=cfg,
                   **parts)
  (loss, metrics), grads = jax.value_and_grad(f, has_aux=True)(params)
  return loss, optax.global_norm(grads)


NAMES = objectives.names()
t0 = time.perf_counter()
results = jax.jit(lambda key: {name: loss_and_grad_norm(name, jax.random.fold_in(key, i))
                               for i, name in enumerate(NAMES)})(jax.random.key(0))
print(f"{len(NAMES)} losses and gradients in {time.perf_counter() - t0:.1f} s (compile included)")

print(f"{'method':18s} {'batch':13s} {'teacher':8s} {'parts':18s} {'loss':>10s} {'|grad|':>10s}")
for name in NAMES:
  entry = objectives.entry(name)
  loss, gnorm = (float(v) for v in results[name])
  parts = ",".join(entry.parts_for(objectives.default_config(name))) or "-"
  print(f"{name:18s} {entry.batch:13s} {'exact' if entry.needs_teacher else '-':8s} "
        f"{parts:18s} {loss:10.4f} {gnorm:10.4f}")

finite = all(bool(jnp.isfinite(jnp.stack(v)).all()) for v in results.values())
print(f"called {len(results)} of {len(objectives.names())} registered losses; all finite: "
      f"{finite}")

# %% [markdown]
# ## One loss against the closed-form flow map
#
# Direct distillation regresses `f_theta(x_{t_i}, t_i, t_j)` on teacher ODE states `x_{t_j}`.
# Plug in the *exact* Gaussian flow map, written as a displacement network
# `F(x, t, s) = (f(x, t, s) - x) / (s - t)` plus a trainable offset `b`: at `b = 0` the loss and
# its gradient vanish; at `b != 0` the gradient points along `b`, so a gradient step moves the
# map back to the exact one.

# %%
P = paths.linear()


def exact_map_net(p, x, t, s, cond=None):
  return (DATA.flow_map(P, x, t, s) - x) / (s - t)[:, None] + p["b"]


dd_cfg = objectives.default_config("direct_distill")
dd_batch = make_batch(objectives.entry("direct_distill"), dd_cfg, P, jax.random.key(42))


def dd_loss(p):
  return objectives.get("direct_distill")(p, dd_batch, jax.random.key(0), net=exact_map_net,
                                          teacher=None, ema_params=None, step=0, cfg=dd_cfg)[0]


for b in (jnp.zeros(2), jnp.array([0.2, -0.1])):
  loss, g = jax.value_and_grad(dd_loss)({"b": b})
  print(f"b = {b}: loss = {float(loss):.2e}, grad = {g['b']}, "
        f"grad . b > 0: {bool(jnp.dot(g['b'], b) > 0)}")

exact_loss = float(dd_loss({"b": jnp.zeros(2)}))
exact_grad = float(jnp.max(jnp.abs(jax.grad(dd_loss)({"b": jnp.zeros(2)})["b"])))
assert exact_loss < 1e-8 and exact_grad < 1e-5, (exact_loss, exact_grad)
print(f"oracle check: loss at the exact map {exact_loss:.1e}, max |grad| {exact_grad:.1e}")
