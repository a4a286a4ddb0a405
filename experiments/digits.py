"""Small-image experiments on scikit-learn's 8x8 digits (no download), or, with
``data=scenes``, on the generated 32x32 RGB scenes (``fmdistill.data.scenes``: 10 classes of
shape x colour family; a DiT with 4x4 patches) or ``data=shapes`` (16x16 grey). Config strings
(``--config experiments/digits.py:<method>,key=value``, e.g. ``flow_matching,data=scenes``):

* ``flow_matching``: the class-conditional DiT teacher (label dropout 0.1, so it supports
  classifier-free guidance through ``--config.teacher.guidance``).
* any registered method: distillation methods need ``--config.teacher.workdir=<a finished
  digits flow_matching run>`` and start from the teacher's weights.
* ``reflow`` (keys ``rounds``, ``distill``) and ``progressive`` (keys ``start``, ``end``): stage
  chains (``fmdistill.chains``) from a teacher stage or ``teacher=<a finished run>``.

Keys: ``data`` (``digits``, ``shapes`` or ``scenes``), ``steps`` (0 = the method's default
budget), ``seed``, and the chain keys above. Images are in [-1, 1]
(``sigma_d = 0.5`` for TrigFlow, as sCM uses for such data); quality is reported as sliced W2
and a Frechet distance on the features of a small classifier trained on the same data
and per-class coverage (``fmdistill.eval.report``). Per-method settings come from the registry
traits.
"""
from fmdistill import chains, config as config_lib, objectives
from fmdistill.errors import ConfigError


def method_config(method: str, steps: int = 0, seed: int = 0, data: str = "digits"):
  c = config_lib.base(method)
  entry = objectives.entry(method)
  c.seed = seed
  c.data.name, c.data.conditional = data, True
  c.model.name, c.model.patch = "dit", 2
  c.model.width, c.model.depth, c.model.heads = 128, 4, 4
  c.train.batch_size = 128
  c.train.steps = 6000
  c.train.lr = 5e-4
  c.train.log_every = 200
  c.train.ckpt_every = 1000
  c.eval.num_samples = 800
  if method == "flow_matching":
    c.objective.label_dropout = 0.1
  if entry.needs_pairs:
    c.train.steps = 3000
    c.teacher.pair_num = 8192
    c.teacher.pair_chunk = 1024
  if "critic" in c.parts:
    c.parts.critic.lr = 2e-4
  if method in ("dmd", "dmd2", "dmd_v1", "vsd", "sid"):  # distribution matching (fake score)
    c.train.update(steps=3000, lr=1e-4, warmup_steps=0)
  if method == "progressive":  # per stage
    c.train.update(steps=1500, warmup_steps=0)
  if entry.tangent and "tangent_warmup" in c.objective:
    c.objective.tangent_warmup = 1000
  if c.objective.path == "trigflow":
    c.objective.sigma_d = 0.5
  if method == "tvm":  # the paper's EMA-0.99 target network and QK-norm
    c.train.ema_decays, c.objective.target_ema, c.model.qk_norm = (.999, .99), "ema_0.99", True
  if method == "freeflow":  # its maps start at t = T only: one jump
    c.eval.student_nfe = (1,)
  if data == "scenes":  # 32x32 RGB: 64 tokens of 4x4 patches; the TFDS 'default' train set
    c.data.num_examples = 8192
    c.model.update(patch=4, width=192, depth=6, heads=6)
    c.train.steps *= 2
    c.eval.update(num_samples=1000, classifier_steps=800)
  if steps:
    c.train.steps = steps
  return c


def get_config(arg: str = "flow_matching"):
  a = config_lib.parse_arg(arg, method="flow_matching", steps=0, seed=0, rounds=2,
                           distill=False, start=64, end=1, teacher="", data="digits")
  if a.data not in ("digits", "shapes", "scenes"):
    raise ConfigError(f"config string data={a.data!r} is unknown; accepted: digits, shapes, "
                      "scenes")
  if a.method not in ("reflow", "progressive"):
    return method_config(a.method, a.steps, a.seed, a.data)
  teacher = a.teacher or method_config("flow_matching", a.steps, a.seed, a.data)
  stage = lambda m: method_config(m, a.steps, a.seed, a.data)
  if a.method == "reflow":
    return chains.reflow(teacher, lambda k: stage("reflow"), a.rounds,
                         stage("direct_distill") if a.distill else None,
                         description=f"ReFlow, {a.rounds} round(s), on {a.data}.")
  return chains.progressive(teacher, lambda n: stage("progressive"), a.start, a.end,
                            description=f"Progressive distillation {a.start} -> {a.end} steps "
                            f"on {a.data}.")
