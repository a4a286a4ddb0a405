"""Small-image experiments on scikit-learn's 8x8 digits (no download). Variants
(``--config experiments/digits.py:<variant>``):

* ``flow_matching``: the class-conditional DiT teacher (label dropout 0.1, so it supports
  classifier-free guidance through ``--config.teacher.guidance``).
* any tangent-family method (``scm_ct``, ``scm_cd``, ``meanflow``, ``meanflow_distill``,
  ``ayf_emd``, ``ayf_lmd``, ``facm``, ``fmm_forward``, ``fmm_backward``, ``fmm_forward_self``,
  ``fmm_backward_self``, ``rcm``), ``dmd`` or ``direct_distill``; distillation methods need
  ``--config.teacher.workdir=<a finished digits flow_matching run>``.

Images are in [-1, 1] (``sigma_d = 0.5`` for TrigFlow, as sCM uses for such data); quality is
reported as sliced W2 and a Frechet distance on the features of a small classifier trained on
the same data (``fmdistill.eval.report``).
"""
from fmdistill import config as config_lib

TANGENT = ("scm_ct", "scm_cd", "meanflow", "meanflow_distill", "ayf_emd", "ayf_lmd", "facm",
           "fmm_forward", "fmm_backward", "fmm_forward_self", "fmm_backward_self", "rcm")
CONSISTENCY = ("scm_ct", "scm_cd", "facm", "rcm")


def method_config(method: str):
  c = config_lib.base(method)
  c.data.name, c.data.conditional = "digits", True
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
  if method == "direct_distill":
    c.train.steps = 3000
    c.teacher.pair_num = 8192
    c.teacher.pair_chunk = 1024
  if method in ("dmd", "rcm"):
    c.critic.update(lr=2e-4, schedule="constant", warmup_steps=0)
  if method == "dmd":
    c.train.update(steps=3000, lr=1e-4, warmup_steps=0)
  if method in TANGENT:
    c.model.time_scale = 1.0          # smooth time embedding (see docs/tangent.md)
    c.teacher.init_student = False    # the teacher's time embedding uses the default scale
    if "tangent_warmup" in c.objective:
      c.objective.tangent_warmup = 1000
    if c.objective.path == "trigflow":
      c.objective.sigma_d = 0.5
    if method in CONSISTENCY:
      c.eval.gamma = 1.0
  return c


def get_config(arg: str = "flow_matching"):
  return method_config(arg or "flow_matching")
