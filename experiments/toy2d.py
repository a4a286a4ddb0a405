"""2-D toy experiments. Config strings (``--config experiments/toy2d.py:<method>,key=value``):

* ``quickstart``: a flow-matching teacher on the checkerboard, then a few-step student
  distilled from it, then a quality report (minutes on a laptop CPU) -- a two-stage chain.
* any registered method name (``flow_matching``, ``meanflow_distill``, ``scm_cd``, ...): that
  method alone; distillation methods need ``--config.teacher.workdir=<a finished
  flow_matching run>`` and start from the teacher's weights.

* ``reflow`` (keys ``rounds=2``, ``distill=False``) and ``progressive`` (keys ``start=64``,
  ``end=1``): stage chains (``fmdistill.chains``) from a flow-matching teacher trained as their
  first stage, or from ``teacher=<a finished flow_matching run>``.

Keys: ``toy`` (checkerboard, moons, spirals, eight_gaussians, gmm), ``steps`` (0 = the
method's default budget), ``seed``. Example: ``experiments/toy2d.py:meanflow,toy=moons``,
``experiments/toy2d.py:reflow,rounds=2``, ``experiments/toy2d.py:progressive,start=64``.
Per-method settings come from the method's registry traits (``fmdistill.objectives``).
"""
from fmdistill import chains, config as config_lib, objectives


def method_config(method: str, toy: str = "checkerboard", steps: int = 0, seed: int = 0):
  c = config_lib.base(method)
  entry = objectives.entry(method)
  c.seed = seed
  c.data.toy = toy
  c.model.width, c.model.depth = 256, 3
  c.train.batch_size = 256
  c.train.steps = 4000
  c.train.lr = 2e-3
  c.train.log_every = 200
  c.train.ckpt_every = 1000
  if entry.needs_pairs:
    c.train.update(steps=2000, lr=5e-4, warmup_steps=0)
    c.objective.pair_steps = 4
    c.teacher.pair_num = 16384
  if "critic" in c.parts:
    c.parts.critic.lr = 1e-3
  if method in ("dmd", "dmd2", "dmd_v1", "vsd", "sid"):  # distribution matching (fake score)
    c.train.update(steps=1500, lr=2e-4, warmup_steps=0)
  if method == "progressive":  # per stage; a 64 -> 1 chain has 6 stages
    c.train.update(steps=1000, lr=5e-4, warmup_steps=0)
  if entry.tangent and "tangent_warmup" in c.objective:
    c.objective.tangent_warmup = 1000
  if method == "tvm":  # the paper's target network: an EMA of decay 0.99
    c.train.ema_decays, c.objective.target_ema = (0.999, 0.99), "ema_0.99"
  if method == "freeflow":  # its maps start at t = T only: one jump
    c.eval.student_nfe = (1,)
  if steps:
    c.train.steps = steps
  return c


def chain_config(a):
  """``reflow`` (``rounds``, ``distill``) and ``progressive`` (``start`` -> ``end`` steps) stage
  chains; ``teacher=<workdir>`` distils a finished flow-matching run instead of training one."""
  teacher = a.teacher or method_config("flow_matching", a.toy, a.steps, a.seed)
  stage = lambda m: method_config(m, a.toy, a.steps, a.seed)
  if a.method == "reflow":
    def make_round(k):
      c = stage("reflow")
      c.objective.pair_steps = 1
      return c
    return chains.reflow(teacher, make_round, a.rounds,
                         stage("direct_distill") if a.distill else None,
                         description=f"ReFlow, {a.rounds} round(s), on the 2-D {a.toy}.")
  return chains.progressive(teacher, lambda n: stage("progressive"), a.start, a.end,
                            description=f"Progressive distillation {a.start} -> {a.end} steps "
                            f"on the 2-D {a.toy}.")


def get_config(arg: str = "quickstart"):
  a = config_lib.parse_arg(arg, method="quickstart", toy="checkerboard", steps=0, seed=0,
                           rounds=2, distill=False, start=64, end=1, teacher="")
  if a.method in ("reflow", "progressive"):
    return chain_config(a)
  if a.method != "quickstart":
    return method_config(a.method, a.toy, a.steps, a.seed)
  return config_lib.chain(
      [("teacher", method_config("flow_matching", a.toy, a.steps, a.seed)),
       ("student", method_config("direct_distill", a.toy, a.steps, a.seed))],
      description=(f"Quickstart: a flow-matching teacher on the 2-D {a.toy} distribution, "
                   "sampled with Euler at 1-64 NFE, and a student distilled from it on cached "
                   "teacher trajectories (direct distillation), sampled with 1/2/4 flow-map "
                   "jumps."))
