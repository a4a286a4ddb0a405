"""Paper-scale CIFAR-10 configs (unconditional 32x32x3, as in every paper below), read from the
TFDS ``cifar10`` dataset in the user's ``--config.data.data_dir`` (nothing is downloaded).
None of these has been run here: they are the papers' settings, for real hardware.

Config strings (``--config experiments/cifar10.py:<variant>,key=value``):

* ``flow_matching``: the teacher (stands in for EDM's pretrained DDPM++ "uncond VP" network
  that ECT and sCD start from; Karras et al. 2022, "Elucidating the Design Space of
  Diffusion-Based Generative Models", NVlabs/edm ``train.py`` defaults).
* ``scm_ct``, ``scm_cd``: sCT / sCD (Lu & Song 2024, "Simplifying, Stabilizing and Scaling
  Continuous-Time Consistency Models"); target: 2-step FID 2.06 (sCT, the paper's abstract).
* ``ect``: ECT (Geng et al. 2024, "Consistency Models Made Easy"; locuslab/ect ``run_ecm.sh``);
  target: ECM 200k, 1-step FID 3.86, 2-step 2.15 (locuslab/ect README table).
* ``ict``: iCT (Song & Dhariwal 2023, "Improved Techniques for Training Consistency Models");
  target: 1-step FID 2.83, 2-step 2.46 (the paper's Table 2; recalled, not verified here).
* ``meanflow``: MeanFlow (Geng et al. 2025, "Mean Flows for One-step Generative Modeling";
  the authors' PyTorch CIFAR-10 code Gsunshine/py-meanflow ``scripts/cifar10_v0.sh``, "the
  original configuration used in the paper"); target: 1-step FID 2.92 (the paper's CIFAR-10
  table; recalled, not verified here).

Keys: ``steps`` (0 = the paper's length), ``seed``. Distilling variants (``scm_cd``, ``ect``)
need ``--config.teacher.workdir=<a finished cifar10.py:flow_matching run>``.

Deviations from the papers, for every variant:

* Network: the papers use U-Nets (DDPM++ 55.7M / NCSN++ 56.4M parameters, Song et al. 2021);
  the library has a DiT, so every variant uses the DiT size closest in parameter count: width
  512, depth 12, 8 heads, 2x2 patches (256 tokens), 57.9M parameters (``fmdistill.models``).
* Dropout (0.13 EDM, 0.2 ECT/sCT/MeanFlow, 0.3 iCT) and EDM's non-leaking augmentation (EDM,
  MeanFlow) are not available in the DiT / data pipeline: not applied.
* RAdam (ECT, iCT, sCM) is replaced by AdamW with weight decay 0 and the papers' betas.
* EMA half-lives are converted to per-step decays at the paper's batch size.
* TFDS ``cifar10`` stores ``Image`` features, which TFDS decodes with TensorFlow: install the
  ``tf`` extra or re-save the set as array_record with ``Tensor`` features (``image``
  ``uint8 (32, 32, 3)``, ``label``); uint8 images are mapped to ``[-1, 1]``.
"""
import ml_collections

from fmdistill import config as config_lib
from fmdistill.errors import ConfigError

VARIANTS = ("flow_matching", "scm_ct", "scm_cd", "ect", "ict", "meanflow")
EXAMPLES = 50_000  # CIFAR-10 train split


def ema_decay(halflife_images: float, batch: int) -> float:
  """The per-step EMA decay of an EDM-style half-life in images: ``0.5 ** (batch / h)``."""
  return round(0.5 ** (batch / halflife_images), 6)


def steps_for(images: float, batch: int) -> int:
  """Optimiser steps for a training length given in images (EDM's Mimg, epochs x 50k)."""
  return int(round(images / batch))


def common(method: str) -> ml_collections.ConfigDict:
  """The fields every CIFAR-10 variant shares: data, network, evaluation."""
  c = config_lib.base(method)
  c.data.update(name="tfds", tfds_name="cifar10", split="train", image_key="image",
                label_key="label", num_classes=10, conditional=False)  # unconditional
  # DDPM++/NCSN++ (55.7M/56.4M) -> the closest DiT: 57.9M parameters (module docstring)
  c.model.update(name="dit", patch=2, width=512, depth=12, heads=8)
  c.objective.label_dropout = 0.0  # unconditional: no labels to drop
  c.train.update(log_every=1000, ckpt_every=10_000, weight_decay=0.0)
  c.eval.update(num_samples=10_000, student_nfe=(1, 2), teacher_nfe=(1, 2, 4, 8, 64),
                solver="heun", fid_reference_num=50_000)
  return c


def flow_matching() -> ml_collections.ConfigDict:
  """The teacher, with EDM's CIFAR-10 training settings (NVlabs/edm ``train.py`` defaults)."""
  c = common("flow_matching")
  # EDM's sigma ~ lognormal(P_mean=-1.2, P_std=1.2) (EDM Table 1) is t = sigma / (1 + sigma) on
  # the linear path, i.e. logit(t) = log(sigma): logit-normal(-1.2, 1.2) in t, exactly
  c.objective.update(time_sampler="logit_normal", time_mean=-1.2, time_std=1.2)
  c.train.batch_size = 512                        # EDM train.py --batch default
  c.train.lr = 1e-3                               # EDM train.py --lr default
  c.train.update(b1=0.9, b2=0.999)                # EDM: Adam betas (0.9, 0.999)
  c.train.steps = steps_for(200e6, 512)           # EDM --duration 200 Mimg = 390625 steps
  c.train.ema_decays = (ema_decay(0.5e6, 512),)   # EDM --ema 0.5 Mimg half-life -> 0.99929
  c.train.ema_rampup = 0.05                       # EDM ema_rampup_ratio 0.05 (unverified here)
  c.train.schedule = "constant"                   # EDM: constant lr after the warmup
  c.train.warmup_steps = steps_for(10e6, 512)     # EDM lr_rampup 10 Mimg (unverified here)
  c.train.grad_clip = 0.0                         # EDM clips no gradient norm (unverified)
  return c


def teacher_ema() -> str:
  """The EMA of the ``flow_matching`` teacher run that distilling variants read."""
  return f"ema_{flow_matching().train.ema_decays[0]:g}"


def scm(method: str) -> ml_collections.ConfigDict:
  """sCT / sCD on TrigFlow (Lu & Song 2024). The values marked NVlabs/FastGen agree with that
  reproduction's ``config_scm.py`` / ``config_s{c,d}t_cifar10.py``; the paper's own appendix
  table could not be read here."""
  c = common(method)
  c.objective.update(sigma_d=0.5)                 # sCM: sigma_d = 0.5 (FastGen sigma_data)
  c.objective.update(time_mean=-1.0, time_std=1.4)  # sCM CIFAR-10 P_mean, P_std (FastGen)
  c.objective.tangent_warmup = 10_000             # sCM: tangent warmup 10k steps (FastGen)
  c.objective.tangent_c = 0.1                     # sCM: g / (||g|| + 0.1) (FastGen)
  c.objective.tangent_norm = "l2"                 # the paper's ||g|| (library default: rms)
  c.objective.adaptive_weight = True              # sCM's learned w_phi(t)
  c.train.batch_size = 512                        # sCM CIFAR-10 batch 512 (FastGen)
  c.train.lr = 1e-4                               # unverified (FastGen's RAdam default)
  c.train.update(b1=0.9, b2=0.99)                 # sCM: betas (0.9, 0.99) (FastGen)
  c.train.schedule, c.train.warmup_steps = "constant", 0  # FastGen: no warmup
  c.train.grad_clip = 0.0                         # FastGen grad_norm 1e6: effectively off
  c.train.ema_decays = (ema_decay(0.5e6, 512),)   # unverified: an EDM-style 0.5 Mimg half-life
  # length: FastGen runs sCT 350k and sCD 500k steps at batch 512; the paper's is unverified
  c.train.steps = 350_000 if method == "scm_ct" else 500_000
  c.parts.weighting.update(lr=c.train.lr, b1=0.9, b2=0.99)
  c.teacher.which = teacher_ema()
  return c


def ect() -> ml_collections.ConfigDict:
  """ECT from the flow-matching teacher (locuslab/ect ``run_ecm.sh`` and ``ct_train.py``)."""
  c = common("ect")
  c.objective.update(p_mean=-1.1, p_std=2.0)      # ct_train.py --mean/--std defaults
  c.objective.update(ect_q=2.0, ect_k=8.0, ect_b=1.0)  # ct_train.py -q, -k, -b defaults
  c.objective.update(metric="pseudo_huber", huber_c=0.0)  # ct_train.py -c 0.0 (an L2 norm)
  c.train.batch_size = 128                        # run_ecm.sh --batch=128
  c.train.lr = 1e-4                               # run_ecm.sh --lr=0.0001 (RAdam -> AdamW)
  c.train.update(b1=0.9, b2=0.999)                # ct_train.py betas [0.9, 0.999]
  c.train.steps = steps_for(25.6e6, 128)          # run_ecm.sh --duration=25.6 Mimg = 200k
  c.objective.ect_stages = 8                      # --double=250 ticks x 12.8 kimg = 25k steps
  c.objective.curriculum_steps = c.train.steps
  c.train.ema_decays = (0.9999,)                  # ct_train.py --ema_beta 0.9999
  c.train.ema_rampup = 0.0                        # ct_train.py: no rampup with --transfer
  c.train.schedule, c.train.warmup_steps = "constant", 0  # unverified (EDM-style loop)
  c.train.grad_clip = 0.0                         # unverified (EDM-style loop clips nothing)
  c.teacher.which = teacher_ema()
  return c


def ict() -> ml_collections.ConfigDict:
  """iCT from scratch (Song & Dhariwal 2023). No official code; every value is recalled from
  the paper (Sec. 3-4, Appendix) and was NOT verified here, except where a comment says so."""
  c = common("ict")
  c.objective.update(p_mean=-1.1, p_std=2.0)      # iCT lognormal (P_mean, P_std) (unverified)
  c.objective.update(s0=10, s1=1280)              # iCT curriculum s0, s1 (unverified)
  c.objective.huber_c = 0.00054                   # iCT c = 0.00054 sqrt(d) (unverified)
  c.train.batch_size = 1024                       # 1024 (locuslab/ect README, iCT-deep row)
  c.train.steps = 400_000                         # 400k (locuslab/ect README, iCT-deep row)
  c.objective.curriculum_steps = c.train.steps
  c.train.lr = 1e-4                               # unverified (RAdam -> AdamW)
  c.train.update(b1=0.9, b2=0.999)                # unverified
  c.train.ema_decays = (0.99993,)                 # iCT evaluation EMA 0.99993 (unverified)
  c.train.ema_rampup = 0.0
  c.train.schedule, c.train.warmup_steps = "constant", 0  # unverified
  c.train.grad_clip = 0.0                         # unverified
  return c


def meanflow() -> ml_collections.ConfigDict:
  """MeanFlow from scratch (Gsunshine/py-meanflow ``cifar10_v0.sh`` and ``train_arg_parser.py``,
  the authors' code; ``v0`` samples ``t`` and ``r`` from one logit-normal, as the library
  does)."""
  c = common("meanflow")
  c.objective.update(time_sampler="logit_normal", time_mean=-2.0, time_std=2.0)  # v0 P_*
  c.objective.equal_ratio = 0.25                  # --ratio 0.75 = P(r != t)
  c.objective.update(adaptive_p=0.75, adaptive_c=1e-3)  # --norm_p 0.75, --norm_eps 1e-3
  c.objective.adaptive_reduce = "sum"             # loss.sum(dim=(1, 2, 3)) in meanflow.py
  c.train.batch_size = 1024                       # --batch_size=128 x 8 GPUs
  c.train.lr = 6e-4                               # --lr=0.0006 (Adam, weight decay 0)
  c.train.update(b1=0.9, b2=0.999)                # --optimizer_betas default
  c.train.steps = steps_for(16_000 * EXAMPLES, 1024)  # --epochs=16000 = 781250 steps
  c.train.warmup_steps = steps_for(200 * EXAMPLES, 1024)  # --warmup_epochs 200 = 9766 steps
  c.train.schedule = "constant"                   # LinearLR warmup then ConstantLR
  c.train.ema_decays = (0.9999, 0.99995, 0.9996)  # --ema_decay, --ema_decays defaults
  c.train.ema_rampup = 0.0                        # ema.py: a constant decay from step 0
  c.train.grad_clip = 0.0                         # train.py clips no gradient
  return c


def get_config(arg: str = "flow_matching") -> ml_collections.ConfigDict:
  a = config_lib.parse_arg(arg, method="flow_matching", steps=0, seed=0)
  if a.method not in VARIANTS:
    raise ConfigError(f"experiments/cifar10.py has no variant {a.method!r}; accepted: "
                      f"{list(VARIANTS)}")
  if a.method in ("scm_ct", "scm_cd"):
    c = scm(a.method)
  else:
    c = {"flow_matching": flow_matching, "ect": ect, "ict": ict, "meanflow": meanflow}[a.method]()
  c.seed = a.seed
  if a.steps:
    c.train.steps = a.steps
    if "curriculum_steps" in c.objective:
      c.objective.curriculum_steps = a.steps
  if c.objective.target_ema.startswith("ema_"):  # a target EMA (none here) must stay kept
    c.train.ema_decays = tuple(sorted({*c.train.ema_decays, float(c.objective.target_ema[4:])}))
  c.eval.which = f"ema_{c.train.ema_decays[0]:g}"  # the paper's (first) EMA
  return c
