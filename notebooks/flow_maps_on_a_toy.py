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
# # Flow maps on a 2-D toy
#
# The quickstart in miniature: a flow-matching **teacher** on the checkerboard, then a
# few-step **student** distilled from it (direct distillation on cached teacher ODE
# trajectories), both trained through the library's entry point `fmdistill.main.run` -- the
# same code path as
#
# ```
# python -m fmdistill.main --config experiments/toy2d.py:quickstart --workdir runs/quickstart
# ```
#
# with a budget of a few hundred steps (seconds on a CPU; the real quickstart trains 2000 steps
# per stage). Then: the teacher's ODE trajectories and how straight they are, the student's 1-,
# 2- and 4-step samples, and sample quality against the number of network evaluations (NFE).

# %%
import importlib.util
import os
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import jax.numpy as jnp
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from fmdistill import data, flowmap, main, paths, runs, sampling
from fmdistill.eval import evaluate, straightness

# %% [markdown]
# ## The config, as `--config experiments/toy2d.py:quickstart` loads it
#
# A config string is `file:argument`; the file's `get_config(argument)` builds an
# `ml_collections.ConfigDict`. The quickstart is a two-stage chain (`teacher`, then `student`);
# every field can be overridden, here as `--config.stages.teacher.train.steps=300` would.

# %%
def load_config(spec):
  path, arg = spec.split(":", 1)
  module_spec = importlib.util.spec_from_file_location("experiment", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg)


ROOT = os.path.dirname(os.path.abspath(main.__file__ + "/.."))
config = load_config(os.path.join(ROOT, "experiments/toy2d.py") + ":quickstart")
for stage in config.stages.values():  # tiny budget: small network, few steps, small caches
  stage.model.update(width=64, depth=2)
  stage.train.update(batch_size=128, lr=3e-3, warmup_steps=20, log_every=100, ckpt_every=1000)
  # the EMA (decay 0.999) ramps up as in EDM, so even a few hundred steps are averaged over
  # the recent weights only: the default weights (`eval.which = 'ema_0.999'`) are evaluated
  stage.eval.update(num_samples=1000, teacher_nfe=(1, 4, 16))
config.stages.teacher.train.steps = 300
config.stages.student.train.steps = 200
config.stages.student.teacher.update(pair_num=2048, pair_chunk=2048, pair_nfe=16)
print(config.stage_order, {k: s.method for k, s in config.stages.items()})

# %% [markdown]
# ## Train both stages and evaluate them
#
# `main.run` trains each stage in `<workdir>/<stage>` (the student reads the teacher stage's
# finished run), then evaluates both: `report.md`, `metrics.json` and the figures land in the
# workdir.

# %%
workdir = tempfile.mkdtemp(prefix="fmdistill_toy_")
result = main.run(config, workdir, progress=False)
print(sorted(os.listdir(workdir)))

# %% [markdown]
# ## The teacher's ODE trajectories and their straightness
#
# The teacher is a velocity `v(x, t)`; sampling integrates `dx/dt = v` from noise at `t = 1`
# to data at `t = 0`. `straightness` measures how far the trajectories are from straight lines
# at constant speed (0 exactly when one Euler step is exact) -- why a 1-step Euler sample of
# the teacher is poor and a distilled student is needed.

# %%
teacher = runs.load_run(os.path.join(workdir, "teacher"), "ema_0.999")
o = teacher.config.objective
path = paths.get_path(o.path, o.sigma_d)
param = flowmap.Parameterization(o.param, o.sigma_d)
velocity = lambda x, t: param.velocity(teacher.net, teacher.params, x, t, None)

x_T = jax.random.normal(jax.random.key(0), (64, 2))
states, _ = straightness.trajectory(velocity, x_T, sampling.time_grid(16, path.T))
S = result["runs"]["teacher"]["straightness"]  # straightness.straightness over 64 Euler steps
print(f"teacher straightness S = {S:.3f}")

fig, ax = plt.subplots(figsize=(4, 4))
ax.plot(states[:, :, 0], states[:, :, 1], lw=0.6, alpha=0.6)
ax.scatter(states[-1, :, 0], states[-1, :, 1], s=3, c="k")
ax.set_title(f"teacher ODE trajectories (S = {S:.2f})")
plt.show()

# %% [markdown]
# ## The student's 1-, 2- and 4-step samples
#
# A flow-map student jumps `f(x_t, t, s)` along a uniform grid: one network evaluation per jump.

# %%
student = runs.load_run(os.path.join(workdir, "student"), "ema_0.999")
reference = data.make_source(student.config.data, student.config.seed).reference(1000, 0)
fig, axes = plt.subplots(1, 4, figsize=(12, 3), sharex=True, sharey=True)
axes[0].scatter(reference[:, 0], reference[:, 1], s=1)
axes[0].set_title("data")
for ax, nfe in zip(axes[1:], (1, 2, 4)):
  x = evaluate.generate(student.config, student.net, student.params, jax.random.key(1), 1000,
                        nfe)
  ax.scatter(x[:, 0], x[:, 1], s=1)
  ax.set_title(f"student, {nfe} step{'s' * (nfe > 1)}")
plt.show()

# %% [markdown]
# ## Quality vs NFE
#
# Sliced Wasserstein-2 distance to held-out data (lower is better) from the evaluation that
# `main.run` wrote to `metrics.json`; the dashed line is the data-vs-data noise floor. With
# this budget the numbers are rough; the README's table is the 2000-step quickstart.

# %%
fig, ax = plt.subplots(figsize=(5, 3.5))
for name, r in result["runs"].items():
  nfes = sorted(r["nfe"])
  ax.plot(nfes, [r["nfe"][n]["sliced_w2"] for n in nfes], "o-", label=f"{name} ({r['method']})")
  print(name, {n: round(r["nfe"][n]["sliced_w2"], 3) for n in nfes})
ax.axhline(result["noise_floor"]["sliced_w2"], ls="--", c="gray", label="noise floor")
ax.set(xscale="log", yscale="log", xlabel="NFE", ylabel="sliced W2")
ax.legend()
plt.show()

# %% [markdown]
# The distilled student's single jump is far better than one Euler step of its teacher, and
# close to the teacher's 16-step ODE solution:

# %%
w2 = {name: {n: r["nfe"][n]["sliced_w2"] for n in r["nfe"]} for name, r in result["runs"].items()}
print(f"1 NFE: student {w2['student'][1]:.3f} vs teacher {w2['teacher'][1]:.3f}; "
      f"teacher at 16 NFE {w2['teacher'][16]:.3f}")
assert w2["student"][1] < 0.5 * w2["teacher"][1]
