"""`TrainConfig`: every setting of one fine-tuning run, checked when it is made.

A wrong setting is an error naming the field (never a silent no-op or a run that trains wrongly); the switched-on
loss terms, weight-space penalties and step rules are read from terms.TERMS (`generic_terms`, `weight_terms`, ...).
"""
from __future__ import annotations

import math
import typing
from dataclasses import asdict, dataclass, fields
from typing import Literal

from .losses import MarginLoss
from .metrics import FINE
from .models import Augment
from .datasets.sampling import Sampler
from .methods import terms
from .methods.terms import active


@dataclass(frozen=True)
class TrainConfig:
    # --- schedule: the same number of target (classifier) steps for every method
    steps: int = 300                  # optimiser steps on target batches; generic batches come in addition
    batch_size: int = 128
    sampler: Sampler = "target_only"  # how steps alternate between target and generic data
    adaptive_every: int = 25          # adaptive sampler: target steps between re-weightings of the two domains;
                                      # adaptive_official: global steps per block (the official code: 1000)
    adaptive_ema: float = 0.0         # adaptive sampler: smoothing of the generic share (0: none); adaptive_official:
                                      # new = ema x old + (1 - ema) x raw (the official do_ema_on_sampler: 0.3)
    # --- optimiser: AdamW, constant learning rates, no warm-up, no clipping (the paper's setting)
    lr_backbone: float = 1e-5
    lr_head: float = 1e-3
    weight_decay: float = 1e-6
    # --- target head: cosine classifier + margin logits + cross-entropy
    classifier: MarginLoss = "normface"
    margin: float = 0.0               # radians (arcface) or cosine units (cosface)
    scale: float = 16.0
    ce_weight: float = 1.0
    augment: Augment = "none"         # train-time augmentation of target and generic batches
    # --- weight-space regularizers (every step, image tower only; analytic gradients, see regularizers.py)
    l2sp: float = 0.0                 # lambda_w of L2-SP to the pretrained weights
    l2sp_form: Literal["mean", "sum"] = "mean"   # mean: sum_T mean_T (the paper); sum: 1/2 ||theta - theta0||^2
    l2sp_split_qkv: bool = True       # mean form: fused q/k/v tensors count as three tensors, as in the JAX model
    ewc: float = 0.0                  # EWC weight (needs fisher=... in train())
    l2_zero: float = 0.0              # plain L2 to zero (a control)
    # --- function-space regularizers on generic batches (need generic data and a teacher)
    distill: float = 0.0              # lambda_e of embedding distillation to the pretrained model
    distill_kind: Literal["mse", "cosine"] = "mse"
    relational: float = 0.0           # Gram-matrix (relational) distillation
    lwf: float = 0.0                  # LwF logit distillation on zero-shot logits of the generic classes (text tower)
    lwf_temperature: float = 2.0
    ldifs: float = 0.0                # LDIFS: distance of every block's features to the frozen model's
    tracer: float = 0.0               # distillation (distill_kind) to a Beta moving average of the trajectory's
                                      # weights instead of the pretrained model (TRACER's teacher; CLIPood's BMA)
    bma_alpha: float = 0.5            # tracer: the Beta(alpha, beta) density that weighs the trajectory (CLIPood: 0.5)
    bma_beta: float = 0.5
    avl: float = 0.0                  # DiVE's average vector loss: the difference vectors (fine-tuned - pretrained
                                      # embedding) kept equal to their batch mean
    # --- on target batches
    lipsum: float = 0.0               # Lipsum-FT: inner products with random-token texts kept (text tower)
    lipsum_texts: int = 80            # random texts per step (from a bank of 1000)
    flow: float = 0.0                 # FLOW: 1/tau of the cross-entropy's sample weights exp(-L0_i / tau), L0 the
                                      # pretrained tower's loss under a class-mean head (0: every weight 1)
    # --- step rules (around each optimiser step, image tower only)
    spd: float = 0.0                  # selective projection decay strength (AdamSPD's lambda)
    tpgm: float = 0.0                 # projection radius, relative to each tensor's pretrained norm (0: off)
    sparse: float = 0.0               # update only this fraction of the tower's entries (top |gradient|; 0: all)
    average: Literal["none", "ema", "uniform"] = "none"   # validate and keep an average of the weights along training
    average_tau: float = 50.0         # ema: time constant in steps
    average_every: int = 10           # uniform: the weights after every k-th step join the average (ZSCL)
    # --- optimisation-side regularizers
    lp_ft_steps: int = 0              # LP-FT: the first N target steps train the head only (backbone frozen)
    freeze_blocks: int = -1           # freeze the patch embedding and the first N transformer blocks (-1: none)
    lora_rank: int = 0                # > 0: train only rank-r LoRA factors of attention/MLP weights (lora.py)
    # --- validation and checkpoints
    eval_every: int = 50              # target steps between validations (0: never)
    select: str = FINE       # key of validate()'s dict that the kept checkpoint maximises
    keep_pretrained: bool = False     # may the pretrained model (step 0) be kept when no checkpoint beats it? Off:
                                      # the protocol returns a fine-tuned model (the paper); either way a kept
                                      # checkpoint scoring below the pretrained model is reported (TrainResult.warnings)
    ckpt_every: int = 100             # target steps between resumable checkpoints (0: only at the end)
    log_every: int = 10               # steps between log lines (and non-finite checks)
    seed: int = 0

    def __post_init__(self):
        _check_fields(self)
        if self.classifier == "normface" and self.margin != 0:
            raise ValueError(f"TrainConfig.margin={self.margin} has no effect with classifier='normface' (no margin); "
                             "use classifier='cosface' or 'arcface', or margin=0")
        if self.lp_ft_steps >= self.steps:
            raise ValueError(f"TrainConfig.lp_ft_steps={self.lp_ft_steps} >= steps={self.steps}: the backbone would "
                             "never train; use fewer LP-FT steps")
        if self.lora_rank > 0 and self.tracer > 0:
            raise ValueError("lora_rank > 0 trains only low-rank factors: tracer's teacher would average the factors "
                             "A and B apart, which is not an average of the weights W0 + B A; use one or the other")
        if self.lora_rank > 0 and (self.weight_terms() or self.step_terms() or self.freeze_blocks >= 0):
            raise ValueError("lora_rank > 0 trains only low-rank factors: weight-space penalties, step rules and "
                             "freeze_blocks would act on those factors, not on the pretrained weights; use one or the other")
        if self.sampler != "target_only" and not self.generic_terms():
            raise ValueError(f"sampler={self.sampler!r} draws generic batches, but no loss term applies to them: "
                             "they would only move the optimiser's momentum. Set a generic-data loss weight "
                             "or use sampler='target_only'.")
        if self.average == "ema" and self.average_tau < 1:
            raise ValueError(f"TrainConfig.average_tau={self.average_tau} must be >= 1 step")

    def generic_terms(self) -> list[str]:
        """Loss terms computed on generic batches (those switched on)."""
        return [t.name for t in active(self, "generic")]

    def target_terms(self) -> list[str]:
        return [t.name for t in active(self, "target")]

    def weight_terms(self) -> list[str]:
        """Weight-space penalties (applied at every step), those switched on."""
        return [t.name for t in active(self, "weights")]

    def step_terms(self) -> list[str]:
        return [t.name for t in active(self, "step")]

    def sample_terms(self) -> list[str]:
        """Per-sample weights of the target cross-entropy, those switched on."""
        return [t.name for t in active(self, "samples")]


def with_defaults(recorded: dict) -> dict:
    """A TrainConfig as an older run recorded it (metrics.json, a checkpoint's identity), completed with the defaults
    of the fields the kit added since: that run trained with them at their default, which switches them off."""
    return {**asdict(TrainConfig()), **recorded}


@dataclass(frozen=True)
class Limits:
    """The values a TrainConfig field takes, and how far a search may grow its range: one place for both.

    lo <= value (lo < value when `above`), value <= hi (value < hi when `below`); None: no bound. `search`: the
    range a search never grows past (`spaces.hard_limits`); a bound may be a function of the run, f(steps, n_blocks).
    `why`: what the boundary value means, shown in the error."""
    lo: float | None = None
    hi: float | None = None
    above: bool = False
    below: bool = False
    search: tuple | None = None  # None: [1e-8, 1e8] (a loss weight's), within [lo, hi]
    why: str = ""

    def search_range(self, steps: int, n_blocks: int | None) -> tuple:
        """How far a search may grow this field's range, for a run of `steps` target steps on a tower of
        `n_blocks` blocks."""
        if self.search is not None:
            return tuple(b(steps, n_blocks) if callable(b) else b for b in self.search)
        return max(1e-8, self.lo or 0), min(1e8, self.hi if self.hi is not None else 1e8)

    def check(self, name: str, v) -> None:
        lo_bad = self.lo is not None and (v <= self.lo if self.above else v < self.lo)
        hi_bad = self.hi is not None and (v >= self.hi if self.below else v > self.hi)
        if lo_bad or hi_bad:
            if self.hi is None:
                want = f"{'>' if self.above else '>='} {self.lo:g}"
            else:
                want = f"in {'(' if self.above else '['}{self.lo:g}, {self.hi:g}{')' if self.below else ']'}"
            raise ValueError(f"TrainConfig.{name} must be {want}, got {v!r}" + (f" ({self.why})" if self.why else ""))


_ONE, _POS, _NONNEG = Limits(1), Limits(0, above=True), Limits(0)
WEIGHT = Limits(0, why="0 switches it off")  # every weight of terms.TERMS (a search keeps it in [1e-8, 1e8])
LIMITS = {
    "steps": _ONE, "batch_size": _ONE, "log_every": _ONE, "adaptive_every": _ONE, "lipsum_texts": _ONE,
    "average_every": Limits(1, search=(1, lambda steps, n_blocks: steps)),   # at most the schedule
    "lr_backbone": Limits(0, above=True, search=(1e-7, 1.0)), "lr_head": Limits(0, above=True, search=(1e-6, 10.0)),
    "scale": _POS, "ce_weight": _POS, "lwf_temperature": _POS, "bma_alpha": _POS, "bma_beta": _POS,
    "weight_decay": _NONNEG, "margin": _NONNEG, "lora_rank": _NONNEG, "eval_every": _NONNEG,
    "ckpt_every": _NONNEG, "seed": _NONNEG, "adaptive_ema": Limits(0, 1, below=True, search=(1e-8, 0.95)),
    "lp_ft_steps": Limits(0, search=(0, lambda steps, n_blocks: steps - 1)),   # below the schedule (__post_init__)
    "freeze_blocks": Limits(-1, why="-1: freeze nothing",
                            search=(0, lambda steps, n_blocks: n_blocks if n_blocks is not None else 1_000)),
    "sparse": Limits(0, 1, why="a fraction of the tower's entries; 0: all", search=(1e-6, 1.0)),
    "average_tau": Limits(search=(1.0, 1e6)),  # an EMA's time constant in steps (>= 1 with average='ema')
}


def limits(name: str) -> Limits:
    """The limits of a TrainConfig field: its LIMITS row, WEIGHT for a weight of terms.TERMS (read when asked, so a
    row added to TERMS is checked too), no bounds otherwise."""
    if name in LIMITS:
        return LIMITS[name]
    return WEIGHT if any(t.name == name for t in terms.TERMS) else Limits()


def _check_fields(cfg) -> None:
    hints = typing.get_type_hints(type(cfg))
    for f in fields(cfg):
        v, hint = getattr(cfg, f.name), hints[f.name]
        if typing.get_origin(hint) is Literal:
            if v not in typing.get_args(hint):
                raise ValueError(f"TrainConfig.{f.name} must be one of {typing.get_args(hint)}, got {v!r}")
        elif hint is bool:
            if not isinstance(v, bool):
                raise ValueError(f"TrainConfig.{f.name} must be true or false, got {v!r}")
        elif hint in (int, float):
            ok = isinstance(v, int) if hint is int else isinstance(v, (int, float))
            if not ok or isinstance(v, bool) or not math.isfinite(v):
                raise ValueError(f"TrainConfig.{f.name} must be a finite {hint.__name__}, got {v!r}")
        elif hint is str and not (isinstance(v, str) and v):
            raise ValueError(f"TrainConfig.{f.name} must be a non-empty string, got {v!r}")
        if hint in (int, float):
            limits(f.name).check(f.name, v)
