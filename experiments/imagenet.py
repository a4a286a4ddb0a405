"""Paper-scale ImageNet 256x256 configs on pre-encoded latents: the user's own TFDS dataset of
SD-VAE latents (``32x32x4`` float32, already multiplied by the VAE's scale factor, feature
``latent``; class index ``label`` in ``[0, 1000)``) named by ``--config.data.tfds_name`` under
``--config.data.data_dir``. Nothing is shipped or downloaded, and none of these has been run
here: they are the papers' settings, for real hardware.

Config strings (``--config experiments/imagenet.py:<method>,size=XL,key=value``):

* ``flow_matching``: a class-conditional DiT teacher (SiT-style, linear path) for the
  distilling methods.
* ``meanflow``: MeanFlow (Geng et al. 2025, "Mean Flows for One-step Generative Modeling";
  official JAX code Gsunshine/meanflow ``configs/default.py``); targets (1-NFE FID, 240
  epochs): MF-B/2 6.17, MF-L/2 3.84, MF-XL/2 3.43 (the paper's Table 2; 3.43 also in its
  abstract).
* ``imf``: improved MeanFlow (Geng, Lu et al. 2025, "Improved Mean Flows"; official code
  Lyy-iiis/imeanflow ``configs/default.py``, ``train_config.yml``); targets (1-NFE FID):
  iMF-B/2 2.74, iMF-XL/2 1.72 (the paper's CVPR abstract).
* ``scm_cd``: sCD (Lu & Song 2024); ``rcm``: rCM (Zheng et al. 2025, "Large Scale Diffusion
  Distillation via Score-Regularized Continuous-Time Consistency"). Neither paper reports
  ImageNet-256 DiT latents (sCM: ImageNet-64 pixels and ImageNet-512 EDM2 latents, 2-step FID
  1.88 for sCD-XXL at 512; rCM: text-to-image/video): no figure to target at this setting.
* ``imm``: Inductive Moment Matching (Zhou et al. 2025); target: IMM DiT-XL/2 8-step FID 1.99
  (the paper's abstract; recalled, not verified here).
* ``shortcut``: Shortcut models (Frans et al. 2024, "One Step Diffusion via Shortcut Models");
  target: DiT-B/2 1-step FID 10.6 (the paper's ImageNet-256 table; recalled, not verified).

Keys: ``size`` (``B``, ``L``, ``XL``: DiT-B/2, L/2, XL/2 of Peebles & Xie 2023), ``steps``
(0 = the paper's length), ``seed``. ``scm_cd`` and ``rcm`` need
``--config.teacher.workdir=<a finished imagenet.py:flow_matching run of the same size>``.

Deviations: the library's DiT uses sCM's adaptive double normalisation and one smooth time
embedding of ``(t, t - s)`` (``fmdistill.models.dit``), not DiT's adaLN-zero with two
frequency embeddings; iMF's in-context conditioning ("MiT") is not offered (a DiT of the same
size is used); MeanFlow's label dropout is per example (see ``fmdistill.objectives.meanflow``).
"""
import ml_collections

from fmdistill import config as config_lib
from fmdistill.errors import ConfigError

METHODS = ("flow_matching", "meanflow", "imf", "scm_cd", "rcm", "imm", "shortcut")
# (width, depth, heads), patch 2 (Peebles & Xie 2023, Table 1); 131M / 459M / 676M here
SIZES = {"B": (768, 12, 12), "L": (1024, 24, 16), "XL": (1152, 28, 16)}
EXAMPLES = 1_281_167  # ImageNet-1k train split


def epochs(n: float, batch: int) -> int:
  """Optimiser steps for ``n`` epochs of ImageNet-1k at ``batch``."""
  return int(round(n * EXAMPLES / batch))


def common(method: str, size: str) -> ml_collections.ConfigDict:
  """Data, network and evaluation every variant shares."""
  c = config_lib.base(method)
  c.data.update(name="tfds", tfds_name="", split="train", image_key="latent",
                label_key="label", num_classes=1000, conditional=True)
  width, depth, heads = SIZES[size]
  c.model.update(name="dit", patch=2, width=width, depth=depth, heads=heads)
  c.model.dtype = "float32"  # MeanFlow/iMF: training.half_precision = False; others unverified
  c.train.update(log_every=1000, ckpt_every=10_000, weight_decay=0.0)
  c.eval.update(num_samples=10_000, student_nfe=(1, 2), teacher_nfe=(1, 2, 4, 8, 64),
                solver="euler", fid_reference_num=50_000)
  return c


def official_meanflow_optimizer(c: ml_collections.ConfigDict, batch: int, n: float) -> None:
  """MeanFlow / iMF's optimiser (their ``configs/default.py``): AdamW, lr 1e-4, b1 0.9 (optax
  default), b2 0.95, weight decay 0, a constant EMA 0.9999, no gradient clipping."""
  c.train.batch_size = batch
  c.train.lr = 1e-4                               # training.learning_rate
  c.train.update(b1=0.9, b2=0.95)                 # optax.adamw default b1, training.adam_b2
  c.train.steps = epochs(n, batch)
  c.train.schedule, c.train.warmup_steps = "constant", 0
  c.train.ema_decays = (0.9999,)                  # training.ema_val, ema_type 'const'
  c.train.ema_rampup = 0.0                        # 'const': no ramp-up
  c.train.grad_clip = 0.0                         # optax.adamw alone: no clipping


def flow_matching(size: str) -> ml_collections.ConfigDict:
  """The teacher: SiT-style flow matching (Ma et al. 2024; values unverified here: batch 256,
  AdamW lr 1e-4, EMA 0.9999, label dropout 0.1 as in DiT)."""
  c = common("flow_matching", size)
  c.objective.label_dropout = 0.1                 # DiT/SiT class dropout 0.1
  c.objective.update(time_sampler="logit_normal", time_mean=0.0, time_std=1.0)  # unverified
  official_meanflow_optimizer(c, 256, 0)          # batch 256, lr 1e-4, EMA 0.9999 (DiT/SiT)
  c.train.steps = 7_000_000                       # SiT-XL/2's 7M steps (unverified)
  c.train.b2 = 0.999                              # DiT/SiT AdamW betas (0.9, 0.999)
  return c


def meanflow(size: str) -> ml_collections.ConfigDict:
  """MeanFlow from scratch with the official code's defaults (module docstring)."""
  c = common("meanflow", size)
  o = c.objective
  o.update(time_sampler="logit_normal", time_mean=-0.4, time_std=1.0)  # P_mean, P_std
  o.equal_ratio = 0.75                            # data_proportion 0.75 (r = t)
  o.label_dropout = 0.1                           # class_dropout_prob 0.1
  o.update(adaptive_p=1.0, adaptive_c=0.01, adaptive_reduce="sum")  # norm_p, norm_eps, sum
  o.update(guidance=1.0, guidance_kappa=0.5)      # omega 1.0, kappa 0.5 (default, B/4, B/2)
  o.update(guidance_t_min=0.0, guidance_t_max=1.0)  # t_start, t_end
  if size in ("L", "XL"):
    # XL/2: omega 0.2, kappa 0.92, t in [0, 0.75] -- the paper's Table 4 as NVlabs/FastGen's
    # config_mf_xl.py reproduces it (the paper's table itself could not be read here); L/2
    # takes the XL/2 values: unverified
    o.update(guidance=0.2, guidance_kappa=0.92, guidance_t_max=0.75)
  official_meanflow_optimizer(c, 256, 240)        # batch 256; 240 epochs (run_b4.yml, Tab. 2)
  return c


def imf(size: str) -> ml_collections.ConfigDict:
  """Improved MeanFlow from scratch (Lyy-iiis/imeanflow ``configs/default.py``,
  ``train_config.yml`` and ``imf.py``), with the CFG scale and interval as network inputs as
  the official model has them (``sample_cfg_scale``: ``cfg_beta = 1``, ``s_max = 7``, i.e.
  log-uniform on [1, 8]; ``sample_cfg_interval``); the scale and interval are chosen at
  sampling time (``--guidance``, ``--config.eval.guidance_interval``)."""
  c = common("imf", size)
  o = c.objective
  o.update(time_sampler="logit_normal", time_mean=-0.4, time_std=1.0)  # P_mean, P_std
  o.equal_ratio = 0.5                             # data_proportion 0.5
  o.label_dropout = 0.1                           # class_dropout_prob 0.1
  o.update(adaptive_p=1.0, adaptive_c=0.01, adaptive_reduce="sum")  # norm_p, norm_eps
  o.update(guidance_input=True, guidance_range=(1.0, 8.0), guidance_power=1.0,  # cfg_beta 1
           guidance_interval_input=True)         # omega, [t_min, t_max] as inputs
  c.model.update(guidance_embed=True, guidance_interval=True)
  official_meanflow_optimizer(c, 1024, 640)       # train_config.yml: batch 1024, 640 epochs
  c.train.schedule = "constant"                   # lr_schedule 'warmup_const'
  c.train.warmup_steps = epochs(10, 1024)         # warmup_epochs 10
  return c


def distill(method: str, size: str) -> ml_collections.ConfigDict:
  """sCD / rCM from the ``flow_matching`` teacher. No paper trains these on ImageNet-256 DiT
  latents: the values are sCM's ImageNet-512 latent settings as recalled (P_mean -0.8,
  P_std 1.6, tangent warmup 10k, betas (0.9, 0.99)); batch, lr, EMA and length are
  placeholders. All unverified."""
  c = common(method, size)
  o = c.objective
  o.sigma_d = 0.5                                 # sCM's latent sigma_d 0.5 (unverified)
  o.update(time_mean=-0.8, time_std=1.6)          # sCM ImageNet-512 P_mean/P_std (unverified)
  o.tangent_warmup = 10_000                       # sCM: 10k (scm.py defaults docstring)
  c.train.batch_size = 1024                       # unverified
  c.train.lr = 1e-4                               # unverified
  c.train.update(b1=0.9, b2=0.99)                 # sCM betas (0.9, 0.99) (unverified)
  c.train.schedule, c.train.warmup_steps = "constant", 0
  c.train.ema_decays = (0.9999,)                  # unverified
  c.train.steps = 100_000                         # unverified
  c.teacher.which = "ema_0.9999"                  # the flow_matching run's EMA
  c.teacher.guidance = 1.0                        # unguided teacher (set CFG as needed)
  return c


def imm(size: str) -> ml_collections.ConfigDict:
  """IMM from scratch (Zhou et al. 2025). Values unverified here: the library's IMM defaults
  (group size 4, ...), batch 4096 and lr 1e-4 as recalled from the paper's ImageNet setup."""
  c = common("imm", size)
  c.objective.label_dropout = 0.1                 # CFG training (unverified)
  c.train.batch_size = 4096                       # unverified
  c.train.lr = 1e-4                               # unverified
  c.train.schedule, c.train.warmup_steps = "constant", 0
  c.train.ema_decays = (0.9999,)                  # unverified
  c.train.steps = 1_200_000                       # unverified
  c.eval.student_nfe = (1, 2, 4, 8)               # the paper reports 1-8 steps
  return c


def shortcut(size: str) -> ml_collections.ConfigDict:
  """Shortcut models from scratch (Frans et al. 2024). The library's defaults are the paper's
  128 shortcut steps and 1/4 self-consistency fraction; the optimiser values are recalled
  (batch 256, AdamW lr 1e-4, weight decay 0.1, EMA 0.999 as the target) -- unverified."""
  c = common("shortcut", size)
  c.objective.shortcut_steps = 128                # M = 128 (the paper)
  c.objective.sc_ratio = 0.25                     # k = 1/4 of the batch self-consistency
  c.objective.label_dropout = 0.1                 # unverified
  c.train.batch_size = 256                        # unverified
  c.train.lr = 1e-4                               # unverified
  c.train.weight_decay = 0.1                      # unverified
  c.train.schedule, c.train.warmup_steps = "constant", 0
  c.train.steps = 800_000                         # unverified
  c.eval.student_nfe = (1, 4, 128)
  return c


def get_config(arg: str = "meanflow") -> ml_collections.ConfigDict:
  a = config_lib.parse_arg(arg, method="meanflow", size="XL", steps=0, seed=0)
  if a.method not in METHODS:
    raise ConfigError(f"experiments/imagenet.py has no method {a.method!r}; accepted: "
                      f"{list(METHODS)}")
  if a.size not in SIZES:
    raise ConfigError(f"config string size={a.size!r} is unknown; accepted: {list(SIZES)}")
  if a.method in ("scm_cd", "rcm"):
    c = distill(a.method, a.size)
  else:
    c = {"flow_matching": flow_matching, "meanflow": meanflow, "imf": imf, "imm": imm,
         "shortcut": shortcut}[a.method](a.size)
  c.seed = a.seed
  if a.steps:
    c.train.steps = a.steps
  if c.objective.target_ema.startswith("ema_"):  # a target EMA (Shortcut's) stays kept
    c.train.ema_decays = tuple(sorted({*c.train.ema_decays, float(c.objective.target_ema[4:])},
                                      reverse=True))
  c.eval.which = f"ema_{c.train.ema_decays[0]:g}"
  return c
