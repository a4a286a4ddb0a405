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
# # Bring your own network
#
# The library's losses never see a module: they call a **function**
# `net(params, x, t, s, cond) -> array like x` on a plain parameter pytree. Any flax module
# becomes one in three lines. This notebook writes its own module (not the library's MLP or
# DiT), wraps it, and distils a teacher into it with two methods, `direct_distill` and
# `meanflow_distill`, through the pure losses and a ten-line optax loop.
#
# What you provide:
#
# 1. `net(params, x, t, s, cond)` with `t`, `s` of shape `(batch,)`, and its `params`
#    (any pytree). With the default `param='displacement'` the flow map is
#    `f(x, t, s) = x + (s - t) net(...)`, so `net(x, t, t)` is a velocity. Methods with a
#    tangent (`objectives.entry(name).tangent`: MeanFlow, sCM, ...) differentiate it in `t`
#    and `s` with `jax.jvp`: keep it smooth in the times.
# 2. `teacher(x, t, s, cond)`: the frozen teacher, a velocity (it ignores `s`); here the exact
#    velocity of a Gaussian mixture (`fmdistill.oracle`) stands in for a trained model.
# 3. A batch of the kind the method reads (`objectives.entry(name).batch`): `{'x': data}`, or
#    `{'traj': teacher ODE states}` for `'teacher_pairs'`.
# 4. `cfg = objectives.default_config(name)`, edited as you like.

# %%
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import jax.numpy as jnp
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import optax
from flax import nnx

from fmdistill import flowmap, objectives, oracle, paths, sampling
from fmdistill.eval import metrics

# %% [markdown]
# ## Your module
#
# Anything that maps `(x, t, s)` to an array like `x`. This one embeds the times with a few
# fixed frequencies (smooth in `t`, `s`) and runs a residual MLP.

# %%
class MyFlowNet(nnx.Module):

  def __init__(self, dim: int, width: int, *, rngs: nnx.Rngs):
    self.freqs = (1.0, 2.0, 4.0)  # a tuple: a constant, not a parameter
    self.inp = nnx.Linear(dim + 12, width, rngs=rngs)
    self.hidden = nnx.Linear(width, width, rngs=rngs)
    self.out = nnx.Linear(width, dim, rngs=rngs)

  def __call__(self, x, t, s):
    times = jnp.stack([t, s], -1)[..., None] * jnp.array(self.freqs)  # (B, 2, 3)
    emb = jnp.concatenate([jnp.sin(times), jnp.cos(times)], -1).reshape(x.shape[0], -1)
    h = jax.nn.silu(self.inp(jnp.concatenate([x, emb], -1)))
    h = h + jax.nn.silu(self.hidden(h))
    return self.out(h)


# %% [markdown]
# ## Wrapped in the one call signature
#
# `nnx.split` separates the module's structure from its parameters; `net` merges them back
# on every call, so `net` is a pure function of a plain pytree (what `jax.grad`, optax and the
# losses need). A flax **linen** module wraps the same way:
# `net = lambda params, x, t, s, cond=None: module.apply({"params": params}, x, t, s)`.

# %%
graphdef, state = nnx.split(MyFlowNet(2, 64, rngs=nnx.Rngs(0)))
init_params = nnx.to_pure_dict(state)


def net(params, x, t, s, cond=None):
  return nnx.merge(graphdef, params)(x, t, s)


print(jax.tree_util.tree_map(jnp.shape, init_params))

# %% [markdown]
# ## The data and the teacher
#
# Four Gaussian blobs; the teacher is their exact probability-flow velocity on the linear path
# (`t = 0` data, `t = 1` noise).

# %%
PATH = paths.linear()
DATA = oracle.GaussianMixture(weights=jnp.full(4, 0.25),
                              means=jnp.array([[2.0, 0.0], [0.0, 2.0], [-2.0, 0.0], [0.0, -2.0]]),
                              scales=jnp.full(4, 0.3))


def teacher(x, t, s=None, cond=None):
  return DATA.velocity(PATH, x, t)


def sample_data(key, n):
  kc, kn = jax.random.split(key)
  k = jax.random.choice(kc, 4, (n,), p=DATA.weights)
  return DATA.means[k] + DATA.scales[k][:, None] * jax.random.normal(kn, (n, 2))


def teacher_solve(x, t_from, t_to, steps=8):
  """The teacher's ODE from ``t_from`` to ``t_to`` (Heun)."""
  return sampling.solve_ode(teacher, x, jnp.linspace(t_from, t_to, steps + 1), "heun")


# %% [markdown]
# ## Batches
#
# `meanflow_distill` reads data (`{'x'}`); `direct_distill` reads cached teacher ODE states on
# a uniform grid (`{'traj'}` of shape `(B, K + 1, 2)`, from noise at `t = 1` to `t = 0`), which
# the train loop would cache once (`teacher.pair_cache`) and we solve on the fly.

# %%
def batch_for(name, cfg, key):
  if objectives.entry(name).batch == "data":
    return {"x": sample_data(key, 256)}
  grid = sampling.time_grid(cfg.pair_steps)
  states = [jax.random.normal(key, (256, 2))]
  for t, s in zip(grid[:-1], grid[1:]):
    states.append(teacher_solve(states[-1], t, s))
  return {"traj": jnp.stack(states, 1)}


# %% [markdown]
# ## Distil: the same loop for both methods
#
# The loss is the registry's pure function; the loop is plain optax.

# %%
def distil(name, steps=300, lr=3e-3, seed=0):
  cfg = objectives.default_config(name)
  loss_fn = objectives.get(name)
  opt = optax.adam(optax.cosine_decay_schedule(lr, steps, 0.05))

  @jax.jit
  def step(params, opt_state, i):
    kb, kl = jax.random.split(jax.random.fold_in(jax.random.key(seed), i))
    batch = batch_for(name, cfg, kb)
    (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params, batch, kl, net=net, teacher=teacher, ema_params=params, step=i, cfg=cfg)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  params, opt_state = init_params, opt.init(init_params)
  for i in range(steps):
    params, opt_state, loss = step(params, opt_state, i)
  print(f"{name}: {steps} steps, final loss {float(loss):.4f}")
  return params, cfg


students = {name: distil(name) for name in ("direct_distill", "meanflow_distill")}

# %% [markdown]
# ## Sample: one and two jumps of the flow map
#
# `flowmap.Parameterization(cfg.param)` turns the raw network into the flow map
# `f(x, t, s)`; `sampling.sample_flow_map` jumps along a grid. For comparison the teacher's
# ODE with one and with 32 Heun steps.

# %%
z = jax.random.normal(jax.random.key(123), (2000, 2))
reference = sample_data(jax.random.key(321), 2000)
samples = {"teacher, 1 Euler step": sampling.solve_ode(teacher, z, sampling.time_grid(1)),
           "teacher, 32 Heun steps": teacher_solve(z, 1.0, 0.0, 32)}
for name, (params, cfg) in students.items():
  param = flowmap.Parameterization(cfg.param, cfg.sigma_d)
  f = lambda x, t, s, params=params, param=param: param.apply(net, params, x, t, s)
  for nfe in (1, 2):
    samples[f"{name}, {nfe} jump{'s' * (nfe > 1)}"] = sampling.sample_flow_map(
        f, z, sampling.time_grid(nfe))

w2 = {k: metrics.sliced_w2(x, reference) for k, x in samples.items()}
fig, axes = plt.subplots(1, len(samples), figsize=(3 * len(samples), 3), sharex=True,
                         sharey=True)
for ax, (k, x) in zip(axes, samples.items()):
  ax.scatter(x[:, 0], x[:, 1], s=1)
  ax.set_title(f"{k}\nsliced W2 {w2[k]:.3f}", fontsize=8)
  print(f"{k:28s} sliced W2 {w2[k]:.3f}")
plt.show()

# %%
for name in students:  # each 1-jump student beats the teacher's 1-step Euler by far
  assert w2[f"{name}, 1 jump"] < 0.5 * w2["teacher, 1 Euler step"], (name, w2)
print("both students beat one Euler step of the teacher")
