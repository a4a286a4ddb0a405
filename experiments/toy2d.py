"""2-D toy experiments. Variants (``--config experiments/toy2d.py:<variant>``):

* ``quickstart``: a flow-matching teacher on the checkerboard, then a few-step student
  distilled from it, then a quality report (minutes on a laptop CPU).
* any registered method name (``flow_matching``, ``direct_distill``, ...): that method alone;
  distillation methods need ``--config.teacher.workdir=<a finished flow_matching run>``.

Append ``,toy=moons`` (or spirals, eight_gaussians, gmm) to change the distribution, e.g.
``experiments/toy2d.py:flow_matching,toy=moons``.
"""
from fmdistill import config as config_lib


def _parse(arg: str) -> tuple[str, dict]:
  method, *rest = (arg or "quickstart").split(",")
  kv = dict(item.split("=", 1) for item in rest)
  return method, kv


# the tangent family (issue 4): flow maps trained through jax.jvp time derivatives
TANGENT = ("scm_ct", "scm_cd", "meanflow", "meanflow_distill", "ayf_emd", "ayf_lmd", "facm",
           "fmm_forward", "fmm_backward", "fmm_forward_self", "fmm_backward_self", "rcm")
CONSISTENCY = ("scm_ct", "scm_cd", "facm", "rcm")  # maps to s = 0 only: multistep re-noises (gamma=1)


def tangent_config(c):
  """Shared settings of the tangent family on the toys (see docs/tangent.md)."""
  c.model.time_scale = 1.0        # smooth time embedding: d/dt of sin(1000 t) swamps tangents
  c.teacher.init_student = False  # the FM teacher's time embedding is scaled by 1000
  if "tangent_warmup" in c.objective:
    c.objective.tangent_warmup = 1000
  if c.method in CONSISTENCY:
    c.eval.gamma = 1.0
  return c


def method_config(method: str, toy: str = "checkerboard"):
  c = config_lib.base(method)
  c.data.toy = toy
  c.model.width, c.model.depth = 256, 3
  c.train.batch_size = 256
  c.train.steps = 4000
  c.train.lr = 2e-3
  c.train.log_every = 200
  c.train.ckpt_every = 1000
  if method == "direct_distill":
    c.train.steps = 2000
    c.train.lr = 5e-4
    c.train.warmup_steps = 0
    c.objective.pair_steps = 4
    c.teacher.pair_num = 16384
  if method in ("dmd", "rcm"):  # the fake-score critic's optimiser (5:1 updates for DMD)
    c.critic.update(lr=1e-3, schedule="constant", warmup_steps=0)
  if method == "dmd":
    c.train.update(steps=1500, lr=2e-4, warmup_steps=0)
  if method in TANGENT:
    tangent_config(c)
  return c


def get_config(arg: str = "quickstart"):
  method, kv = _parse(arg)
  toy = kv.get("toy", "checkerboard")
  if method != "quickstart":
    return method_config(method, toy)
  import ml_collections
  c = ml_collections.ConfigDict()
  c.description = (f"Quickstart: a flow-matching teacher on the 2-D {toy} distribution, "
                   "sampled with Euler at 1-64 NFE, and a student distilled from it on cached "
                   "teacher trajectories (direct distillation), sampled with 1/2/4 flow-map "
                   "jumps.")
  c.stage_order = ("teacher", "student")
  c.stages = ml_collections.ConfigDict()
  c.stages.teacher = method_config("flow_matching", toy)
  c.stages.student = method_config("direct_distill", toy)
  return c
