"""The training loop: fine-tune a VLM's image tower on a fine-grained target domain.

One readable `train()` driven by a frozen `TrainConfig`:

  for each (step, domain, batch) of the schedule:      target (fine-grained) or generic batch, from (seed, step)
      terms = train_step(...)                          named, weighted loss terms (terms.TERMS)
      loss  = sum(terms); backward; weight-space penalties' gradients; step rules; AdamW step; step rules
      every eval_every target steps: validate -> keep the best checkpoint by cfg.select

`terms.TERMS` is the one table of regularizers (where each acts, what it needs, its pure function) and
`inputs.INPUTS` the one table of what they compare against. Everything random in a step comes from (seed, step),
so a run resumed from `last.pt` ends with the same weights as one that was never interrupted. Files in out_dir
(`checkpoints.RunFolder`): `log.jsonl` (one JSON object per logged step or validation), `last.pt` (for resuming; it
records which model, data, config and thread count it belongs to), `best.pt` (the kept checkpoint). A non-finite
loss raises FloatingPointError before anything is written.
"""
from __future__ import annotations

import contextlib
import copy
import math
import time
import typing
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable, Literal

import numpy as np
import torch

from . import distributed
from .checkpoints import RunFolder, tower_fingerprint
from .data import AdaptiveState, Sampler, batches, domain_at, step_generator
from .inputs import INPUTS
from .lora import add_lora, merge_lora
from .losses import CosineClassifier, MarginLoss, classification_loss
from .metrics import FINE
from .models import VLM, Augment, image_embedding, param_groups, preprocess, progress_bar, train_mode
from .regularizers import Quadratic, WeightAverage, adaptive_generic_share, quadratic_penalty_
from .terms import TERMS, TERMS_BY_NAME, StepRule, TermBatch, active, needed_inputs
from .towers import layout

__all__ = ["TrainConfig", "TrainResult", "TrainState", "train", "train_step", "count_updates", "needed_inputs",
           "TERMS", "TERMS_BY_NAME"]


@dataclass(frozen=True)
class TrainConfig:
    # --- schedule: the same number of target (classifier) steps for every method
    steps: int = 300                  # optimiser steps on target batches; generic batches come in addition
    batch_size: int = 128
    sampler: Sampler = "target_only"  # how steps alternate between target and generic data
    adaptive_every: int = 25          # adaptive sampler: target steps between re-weightings of the two domains
    adaptive_ema: float = 0.0         # adaptive sampler: smoothing of the generic share (0: none)
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
    # --- on target batches
    lipsum: float = 0.0               # Lipsum-FT: inner products with random-token texts kept (text tower)
    lipsum_texts: int = 80            # random texts per step (from a bank of 1000)
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
        if self.lora_rank > 0 and (self.weight_terms() or self.step_terms() or self.freeze_blocks >= 0):
            raise ValueError("lora_rank > 0 trains only low-rank factors: weight-space penalties, step rules and "
                             "freeze_blocks would act on those factors, not on the pretrained weights; use one or the other")
        if self.sampler != "target_only" and not self.generic_terms():
            raise ValueError(f"sampler={self.sampler!r} draws generic batches, but no loss term applies to them: "
                             "they would only move the optimiser's momentum. Set a generic-data loss weight "
                             "or use sampler='target_only'.")
        if self.sparse > 1:
            raise ValueError(f"TrainConfig.sparse={self.sparse} is a fraction of the tower's entries: use (0, 1]")
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


# Allowed ranges, checked when a TrainConfig is made (a wrong setting is an error naming the field, never a silent
# no-op or a run that trains wrongly). Every weight of terms.TERMS is >= 0; Literal fields take their allowed values.
_AT_LEAST_ONE = ("steps", "batch_size", "log_every", "adaptive_every", "average_every", "lipsum_texts")
_POSITIVE = ("lr_backbone", "lr_head", "scale", "ce_weight", "lwf_temperature")
_NON_NEGATIVE = ("weight_decay", "margin", "lp_ft_steps", "lora_rank", "eval_every", "ckpt_every", "seed",
                 "adaptive_ema", *(t.name for t in TERMS))


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
    for name in _AT_LEAST_ONE:
        if getattr(cfg, name) < 1:
            raise ValueError(f"TrainConfig.{name} must be >= 1, got {getattr(cfg, name)!r}")
    for name in _POSITIVE:
        if getattr(cfg, name) <= 0:
            raise ValueError(f"TrainConfig.{name} must be > 0, got {getattr(cfg, name)!r}")
    for name in _NON_NEGATIVE:
        if getattr(cfg, name) < 0:
            raise ValueError(f"TrainConfig.{name} must be >= 0, got {getattr(cfg, name)!r} (0 switches it off)")
    if cfg.freeze_blocks < -1:
        raise ValueError(f"TrainConfig.freeze_blocks must be >= -1 (-1: freeze nothing), got {cfg.freeze_blocks}")
    if cfg.adaptive_ema >= 1:
        raise ValueError(f"TrainConfig.adaptive_ema must be in [0, 1), got {cfg.adaptive_ema}")


@dataclass
class TrainState:
    """What hooks see after each step. Returning False from a hook stops training."""
    step: int
    target_step: int
    domain: str
    losses: dict[str, float]
    val: dict[str, float] | None = None


@dataclass
class TrainResult:
    best_step: int | None
    best_score: float | None
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    out_dir: Path | None = None
    updates: dict[str, int] = field(default_factory=dict)   # target / generic batches, backbone updates
    warnings: list[str] = field(default_factory=list)


@dataclass
class Anchors:
    """What the regularizers compare against, fixed before training starts."""
    params: list[torch.Tensor]                        # trainable image-tower parameters (theta)
    names: list[str]
    theta0: list[torch.Tensor] = field(default_factory=list)         # their starting values
    quad: list[tuple[str, Quadratic]] = field(default_factory=list)   # weight-space penalties, prepared once
    steps: list[StepRule] = field(default_factory=list)               # step rules, prepared once
    teacher_emb: torch.Tensor | None = None           # (N_generic, D) pre-extracted teacher embeddings
    live_teacher: torch.nn.Module | None = None       # or a frozen copy of the pretrained tower
    target_teacher: torch.Tensor | None = None        # (N_target, D) the pretrained model's target embeddings
    class_emb: torch.Tensor | None = None             # (C, D) generic class-prompt embeddings (LwF)
    logit_scale: float = 100.0
    inputs: dict = field(default_factory=dict)        # every input (inputs.INPUTS rows), on the model's device


def train_step(vlm: VLM, head: CosineClassifier, images: torch.Tensor, labels: torch.Tensor | None, idx: torch.Tensor,
               domain: int, cfg: TrainConfig, generator: torch.Generator,
               anchors: Anchors | None = None) -> dict[str, torch.Tensor]:
    """Named, weighted loss terms for one batch of uint8 images (autograd terms only). domain 0 = target (labels
    given), 1 = generic (idx: the images' indices in the split, for pre-extracted teacher embeddings).

    target batch: ce + the target TERMS switched on;  generic batch: the generic TERMS switched on, against the
    frozen pretrained model. Weight-space penalties and step rules act in train(), after backward."""
    on = active(cfg, "target" if domain == 0 else "generic")
    blocks = any(t.features == "blocks" for t in on)
    pixels = preprocess(vlm, images, train=True, augment=cfg.augment, generator=generator)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=vlm.device.type == "cuda"):
        emb, student_blocks = _embed(vlm.visual, pixels, blocks)  # (B, D), L2-normalised float32
    out = {}
    if domain == 0:
        out["ce"] = cfg.ce_weight * classification_loss(head(emb), labels.to(emb.device), cfg.classifier, cfg.margin,
                                                        cfg.scale)
    if not on:
        return out
    teacher, teacher_blocks = _teacher(vlm, images, idx, domain, anchors, blocks)  # un-augmented, eval preprocessing
    batch = TermBatch(emb, teacher, cfg, anchors, generator, student_blocks, teacher_blocks)
    for t in on:
        out[t.name] = getattr(cfg, t.name) * t.loss(batch)
    return out


def _embed(tower: torch.nn.Module, pixels: torch.Tensor, blocks: bool) -> tuple[torch.Tensor, list | None]:
    """The L2-normalised embedding and, when asked, every block's output (forward hooks)."""
    if not blocks:
        return torch.nn.functional.normalize(tower(pixels).float(), dim=-1), None
    found: list = []
    lay = layout(tower)
    handles = [m.register_forward_hook(lambda mod, i, o: found.append(lay.tokens(o, len(pixels))))
               for m in lay.blocks(tower)]
    try:
        emb = torch.nn.functional.normalize(tower(pixels).float(), dim=-1)
    finally:
        for h in handles:
            h.remove()
    return emb, found  # each (B, tokens, width)


def _teacher(vlm: VLM, images: torch.Tensor, idx: torch.Tensor, domain: int, anchors: Anchors, blocks: bool):
    if domain == 0:  # target terms: the pretrained model's embeddings of the target images
        return anchors.target_teacher[idx.to(anchors.target_teacher.device)], None
    if anchors.live_teacher is not None and (blocks or anchors.teacher_emb is None):
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=vlm.device.type == "cuda"):
            return _embed(anchors.live_teacher, preprocess(vlm, images), blocks)
    return anchors.teacher_emb[idx.to(anchors.teacher_emb.device)], None


def train(vlm: VLM, target, cfg: TrainConfig, out_dir: str | Path | None = None, generic=None,
          validate: Callable[[VLM], dict] | None = None, hooks: tuple[Callable[[TrainState], bool | None], ...] = (),
          resume: bool = False, progress: bool = True, resume_hint: str = "resume=True", **inputs) -> tuple[CosineClassifier, TrainResult]:
    """Fine-tune vlm's image tower in place on `target` (a data.Split / data.FileSplit); returns (head, result).

    generic: generic data for the samplers' generic batches (the generic TERMS apply to them).
    inputs: what the config's terms need (`terms.needed_inputs`, rows of `inputs.INPUTS`), e.g. teacher= (pre-extracted
    embeddings of the generic images by the pretrained model, checked by fingerprint, or "live"), fisher=, class_emb=,
    target_teacher=, random_texts=; `inputs.prepare_inputs` builds them. Rows marked in_train are built here.
    validate(vlm) -> dict of validation scores; the kept (and, at the end, loaded) checkpoint maximises
    validate()[cfg.select] over the validations after step 0 (and step 0 itself with cfg.keep_pretrained).
    out_dir=None keeps nothing on disk. resume=True continues from out_dir/last.pt (a folder without one starts
    afresh); without it an out_dir holding a run is refused."""
    _check_data(cfg, target, generic)
    unknown = sorted(set(inputs) - set(INPUTS))
    if unknown:
        raise TypeError(f"train() got unknown inputs {unknown}; known: {sorted(INPUTS)}")
    distributed.check_config(cfg)
    folder = RunFolder(out_dir, resume, resume_hint, writer=distributed.is_main())
    try:
        return _train(vlm, target, cfg, folder, generic, validate, hooks, progress, inputs)
    finally:
        folder.close()


def _train(vlm, target, cfg, folder, generic, validate, hooks, progress, inputs):
    distributed.barrier()  # every rank has checked the folder before rank 0 writes to it
    labels, n_classes = _remap(target.labels)
    head = CosineClassifier(vlm.embed_dim, n_classes, generator=torch.Generator().manual_seed(cfg.seed)).to(vlm.device)
    identity = {"model": vlm.name, "weights": tower_fingerprint(vlm.visual), "target": target.fingerprint(),
                "generic": generic.fingerprint() if generic is not None and cfg.sampler != "target_only" else None,
                "classes": n_classes, "config": asdict(cfg), "threads": torch.get_num_threads()}
    sizes = (len(target), len(generic) if generic is not None else 0)
    with _handed_back(vlm, cfg):  # the model goes back as it came (trainable set, LoRA merged) whatever happens
        opt = torch.optim.AdamW(param_groups(vlm, head, cfg.lr_backbone, cfg.lr_head, cfg.weight_decay),
                                betas=(0.9, 0.999), eps=1e-8)
        anchors = _anchors(vlm, cfg, target, generic, head, labels, inputs)
        run = _Progress(folder, cfg, vlm, head, opt, folder.restore(identity), identity, anchors)
        t0 = time.time()
        if validate is not None and cfg.eval_every and run.step == 0:
            run.validate(validate)  # the pretrained model: logged; kept only with cfg.keep_pretrained
        train_mode(vlm, True)
        bar = progress_bar(None, progress and distributed.is_main(), total=cfg.steps, initial=run.target_step,
                           desc="train")
        for step, domain, idx, images in batches((target, generic), cfg.sampler, cfg.seed, cfg.batch_size, cfg.steps,
                                                 start=run.step, adaptive=run.adaptive):
            frozen = run.target_step < cfg.lp_ft_steps  # LP-FT: head only, the backbone gets no gradient at all
            if frozen and domain == 1:  # nothing trains on a generic batch then (the head sees target data only)
                run.step = step + 1
                continue
            next_target = run.target_step + (domain == 0)
            is_eval = domain == 0 and validate is not None and cfg.eval_every and (
                next_target % cfg.eval_every == 0 or next_target == cfg.steps)
            is_ckpt = domain == 0 and (next_target == cfg.steps or (cfg.ckpt_every and next_target % cfg.ckpt_every == 0))
            is_log = (step + 1) % cfg.log_every == 0 or is_eval or is_ckpt or next_target == cfg.steps
            for p in anchors.params:
                p.requires_grad_(not frozen)
            terms = train_step(vlm, head, images, labels[idx] if domain == 0 else None, idx, domain, cfg,
                               step_generator(cfg.seed, step), anchors)
            opt.zero_grad(set_to_none=True)
            sum(terms.values()).backward()
            distributed.average_gradients(anchors.params + list(head.parameters()))  # no-op in one process
            if not frozen:
                for name, q in anchors.quad:  # weight-space penalties: analytic gradient, no graph
                    value = quadratic_penalty_(anchors.params, q, value=is_log)  # the value only when logged
                    if value is not None:
                        terms[name] = value
                _optimiser_step(opt, anchors)
            else:
                opt.step()
            run.after_step(step, domain, terms, is_log, frozen)
            bar.update(int(domain == 0))
            val = run.validate(validate) if is_eval else None
            if is_ckpt:
                run.save_last()
            state = TrainState(run.step, run.target_step, ("target", "generic")[domain], run.last_losses, val)
            if any(h(state) is False for h in hooks):
                run.check_finite()
                run.save_last()
                break
        bar.close()
        run.load_best()
        updates = run.counts() if cfg.sampler == "adaptive" else count_updates(cfg, sizes, run.step)
        result = run.result(time.time() - t0, updates)
    return head, result


def _optimiser_step(opt: torch.optim.Optimizer, anchors: Anchors) -> None:
    """The AdamW step with the step rules around it (a plain step when there are none)."""
    if not anchors.steps:
        opt.step()
        return
    for rule in anchors.steps:
        rule.before(anchors.params)
    prev = [p.detach().clone() for p in anchors.params] if any(r.wants_prev for r in anchors.steps) else None
    opt.step()
    for rule in anchors.steps:
        rule.after(anchors.params, prev)


class _Progress:
    """The state of one training run: counters, history, the best checkpoint, averages, and their files."""

    def __init__(self, folder: RunFolder, cfg: TrainConfig, vlm: VLM, head, opt, ckpt: dict | None, identity: dict,
                 anchors: Anchors):
        self.folder, self.cfg, self.vlm, self.head, self.opt, self.identity = folder, cfg, vlm, head, opt, identity
        self.anchors = anchors
        self.step = self.target_step = 0
        self.history: list[dict] = []
        self.best = {"score": None, "step": None, "state": None}
        self.start_score = None  # the pretrained model's validation score on cfg.select
        self.pending: list[tuple[int, torch.Tensor]] = []  # losses not yet checked (avoids a sync per step)
        self.last_losses: dict[str, float] = {}
        self.average = WeightAverage(cfg.average, anchors.theta0, cfg.average_tau, cfg.average_every) \
            if cfg.average != "none" else None
        self.adaptive = AdaptiveState() if cfg.sampler == "adaptive" else None
        self.window: dict = {"target": [], "generic": [], "first": None, "n": {"target": 0, "generic": 0,
                                                                              "backbone": 0}}
        if ckpt is not None:
            vlm.visual.load_state_dict(ckpt["visual"])
            head.load_state_dict(ckpt["head"])
            opt.load_state_dict(ckpt["optimizer"])
            self.step, self.target_step, self.history = ckpt["step"], ckpt["target_step"], ckpt["history"]
            self.best = {"score": ckpt["best_score"], "step": ckpt["best_step"], "state": folder.best_state()}
            self.start_score = ckpt.get("start_score")
            if self.average is not None:
                self.average.load_state_dict(ckpt["average"])
            if self.adaptive is not None:
                self.adaptive.p_generic, self.adaptive.target_done = ckpt["adaptive"]["p"], self.target_step
                self.window = ckpt["adaptive"]["window"]
        folder.start_log(self.history)

    def log(self, record: dict) -> None:
        self.history.append(record)
        self.folder.log(record)

    def after_step(self, step: int, domain: int, terms: dict[str, torch.Tensor], is_log: bool, frozen: bool) -> None:
        self.step, self.target_step = step + 1, self.target_step + (domain == 0)
        self.pending.append((step, sum(terms.values()).detach()))
        self.terms = terms
        self.last_losses = {}
        if self.average is not None and not frozen:
            self.average.update(self.anchors.params, self.step)
        if self.adaptive is not None:
            self._adapt(domain, terms, frozen)
        if is_log:
            self.check_finite()
            values = distributed.mean_over_ranks(torch.stack([v.detach().float() for v in terms.values()]))
            terms_now = dict(zip(terms, values.tolist()))  # the global batch's losses, under torchrun too
            record = {"step": self.step, "target_step": self.target_step, "domain": ("target", "generic")[domain],
                      "loss": float(sum(terms_now.values())), **terms_now}
            if self.adaptive is not None:
                record["p_generic"] = self.adaptive.p_generic
            self.log(record)
            self.last_losses = {k: v for k, v in record.items() if k not in ("step", "target_step", "domain")}

    def _adapt(self, domain: int, terms: dict, frozen: bool) -> None:
        """Adaptive sampler: collect each domain's loss; every adaptive_every target steps re-weigh the domains."""
        w, name = self.window, ("target", "generic")[domain]
        w[name].append(float(sum(terms.values()).detach()))
        w["n"][name] += 1
        w["n"]["backbone"] += not frozen
        if domain == 0 and self.target_step % self.cfg.adaptive_every == 0 and w["target"] and w["generic"]:
            if w["first"] is None:
                w["first"] = (float(np.mean(w["target"])), float(np.mean(w["generic"])))
            self.adaptive.p_generic = adaptive_generic_share(w["target"], w["generic"], w["first"],
                                                             self.adaptive.p_generic, self.cfg.adaptive_ema)
            w["target"], w["generic"] = [], []

    def counts(self) -> dict[str, int]:
        return dict(self.window["n"])

    def check_finite(self) -> None:
        if not self.pending:
            return
        ok = torch.isfinite(torch.stack([l for _, l in self.pending]))
        if not bool(ok.all()):
            bad = self.pending[int((~ok).nonzero()[0])][0]
            raise FloatingPointError(
                f"non-finite loss at step {bad} (last terms: { {k: float(v.detach()) for k, v in self.terms.items()} }). "
                "Training stopped; checkpoints already written were kept. Lower the learning rates or loss weights.")
        self.pending.clear()

    @contextlib.contextmanager
    def _evaluated_weights(self):
        """With weight averaging the average is what is validated and kept; the training weights come back after."""
        if self.average is None:
            yield
            return
        live = [p.detach().clone() for p in self.anchors.params]
        with torch.no_grad():
            for p, a in zip(self.anchors.params, self.average.avg):
                p.copy_(a)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, v in zip(self.anchors.params, live):
                    p.copy_(v)

    def validate(self, validate: Callable) -> dict[str, float]:
        cfg = self.cfg
        train_mode(self.vlm, False)
        with self._evaluated_weights():
            val = {k: float(v) for k, v in validate(self.vlm).items()}
            if cfg.select not in val:
                raise KeyError(f"TrainConfig.select={cfg.select!r} is not among the validation scores {sorted(val)}")
            better = self.best["score"] is None or val[cfg.select] > self.best["score"]
            if (self.target_step > 0 or cfg.keep_pretrained) and better:
                self.best.update(score=val[cfg.select], step=self.target_step,
                                 state={"visual": copy.deepcopy(self.vlm.visual.state_dict()),
                                        "head": copy.deepcopy(self.head.state_dict())})
                self.folder.save("best.pt", {**self.best["state"], "config": asdict(cfg), "step": self.target_step,
                                             "score": self.best["score"]})
        train_mode(self.vlm, True)
        self.log({"step": self.step, "target_step": self.target_step, **{f"val/{k}": v for k, v in val.items()}})
        if self.step == 0:
            self.start_score = val[cfg.select]
        return val

    def save_last(self) -> None:
        extra = {}
        if self.average is not None:
            extra["average"] = self.average.state_dict()
        if self.adaptive is not None:
            extra["adaptive"] = {"p": self.adaptive.p_generic, "window": self.window}
        self.folder.save("last.pt", {"visual": self.vlm.visual.state_dict(), "head": self.head.state_dict(),
                                     "optimizer": self.opt.state_dict(), "step": self.step,
                                     "target_step": self.target_step, "history": self.history,
                                     "config": asdict(self.cfg), "identity": self.identity,
                                     "best_score": self.best["score"], "best_step": self.best["step"],
                                     "start_score": self.start_score, **extra})

    def load_best(self) -> None:
        if self.best["state"] is not None:
            self.vlm.visual.load_state_dict(self.best["state"]["visual"])
            self.head.load_state_dict(self.best["state"]["head"])

    def result(self, seconds: float, updates: dict) -> TrainResult:
        warns = []
        if self.start_score is not None and self.best["score"] is not None and self.best["score"] < self.start_score:
            warns.append(f"the kept checkpoint (target step {self.best['step']}) scores {self.cfg.select} = "
                         f"{self.best['score']:.4f} on validation, below the pretrained model's {self.start_score:.4f}: "
                         "fine-tuning made the model worse on the selection key (too high a learning rate, or a run "
                         "that diverged?)")
            warnings.warn(warns[-1], stacklevel=3)
            self.log({"step": self.step, "target_step": self.target_step, "warning": warns[-1]})
        return TrainResult(self.best["step"], self.best["score"], self.history, seconds, self.folder.path, updates, warns)


def count_updates(cfg: TrainConfig, sizes: tuple[int, int], steps: int) -> dict[str, int]:
    """Batches of each domain in the first `steps` optimiser steps, and how many of them updated the backbone
    (all but the LP-FT warm-up's). A pure function of the config, like the schedule itself (not for the adaptive
    sampler, whose schedule depends on the losses: train() counts those)."""
    if cfg.sampler == "adaptive":
        raise ValueError("the adaptive sampler's batch counts depend on the run: read TrainResult.updates")
    target = generic = backbone = 0
    for s in range(steps):
        domain = domain_at(s, cfg.sampler, cfg.seed, sizes)
        backbone += target >= cfg.lp_ft_steps
        target += domain == 0
        generic += domain == 1
    return {"target": target, "generic": generic, "backbone": backbone}


def _remap(labels) -> tuple[torch.Tensor, int]:
    classes, inv = torch.unique(torch.as_tensor(np.asarray(labels)), return_inverse=True)
    return inv, len(classes)


def _check_data(cfg: TrainConfig, target, generic) -> None:
    """Refuse data a run cannot learn from, before any work."""
    classes, counts = np.unique(np.asarray(target.labels), return_counts=True)
    if len(classes) < 2:
        raise ValueError(f"the target data has {len(classes)} class: a classifier cannot learn from one class "
                         "(its loss is 0 from the start); give it at least two")
    if cfg.sampler != "target_only" and generic is None:
        raise ValueError(f"sampler={cfg.sampler!r} needs generic data: pass generic=...")
    if cfg.generic_terms() and cfg.sampler == "target_only":
        raise ValueError(f"{cfg.generic_terms()} apply to generic batches, but sampler='target_only' draws none; "
                         "use sampler='round_robin' (the paper), 'balanced', 'proportional' or 'adaptive'")


@contextlib.contextmanager
def _handed_back(vlm: VLM, cfg: TrainConfig):
    """Freeze blocks / add LoRA for the run; on exit (also on errors and interrupts) merge LoRA and hand the
    trainable set back as it came."""
    before = {n: p.requires_grad for n, p in vlm.visual.named_parameters()}
    try:
        _freeze_first_blocks(vlm, cfg.freeze_blocks)
        if cfg.lora_rank > 0:
            add_lora(vlm.visual, cfg.lora_rank, seed=cfg.seed)  # merged back into the weights at the end
        yield
    finally:
        train_mode(vlm, False)
        if cfg.lora_rank > 0:
            merge_lora(vlm.visual)
        for n, p in vlm.visual.named_parameters():
            p.requires_grad_(before[n])


def _freeze_first_blocks(vlm: VLM, n_blocks: int) -> None:
    """requires_grad=False on the stem (patch embedding, class/position embeddings, pre-norm) and blocks 0..n-1."""
    if n_blocks < 0:
        return
    parts = layout(vlm.visual)
    if n_blocks > parts.n_blocks:
        raise ValueError(f"freeze_blocks={n_blocks} but {vlm.name} has {parts.n_blocks} blocks")
    for name, p in vlm.visual.named_parameters():
        if parts.frozen_by(name, n_blocks):
            p.requires_grad_(False)


def _anchors(vlm: VLM, cfg: TrainConfig, target, generic, head, labels, inputs: dict) -> Anchors:
    """Everything the switched-on terms compare against, checked and prepared once (inputs.INPUTS builds what
    train() makes itself)."""
    named = [(n, p) for n, p in vlm.visual.named_parameters() if p.requires_grad]
    a = Anchors(params=[p for _, p in named], names=[n for n, _ in named])
    need = needed_inputs(cfg)
    for name in sorted(need):
        if inputs.get(name) is None and not INPUTS[name].in_train:
            users = [t.name for t in TERMS if name in t.needs and getattr(cfg, t.name) > 0]
            raise ValueError(f"{users} need {INPUTS[name].hint} (inputs.prepare_inputs builds it)")
    if cfg.weight_terms() or cfg.step_terms() or cfg.average != "none":
        a.theta0 = [p.detach().clone() for p in a.params]
    ctx = {"head": head, "labels": labels, "params": a.params}
    inputs = dict(inputs)
    for name in sorted(need):
        if INPUTS[name].in_train:
            inputs[name] = INPUTS[name].build(vlm, target, cfg, ctx)
    if inputs.get("teacher") == "live":
        inputs["live_teacher"] = INPUTS["live_teacher"].build(vlm, target, cfg, ctx)
    params = dict(named)
    if "fisher" in inputs and inputs["fisher"] is not None:
        inputs["fisher"] = {n: inputs["fisher"][n].to(vlm.device) for n in a.names}
    for name in cfg.weight_terms():
        t = TERMS_BY_NAME[name]
        a.quad.append((name, Quadratic.build(t.weights(params, cfg, inputs), getattr(cfg, name),
                                             a.theta0 if t.centre == "pretrained" else None)))
    a.steps = [TERMS_BY_NAME[name].step(cfg, a, inputs) for name in cfg.step_terms()]
    a.live_teacher = inputs.get("live_teacher")
    if cfg.generic_terms() and "teacher" in need:
        if inputs["teacher"] == "live":
            a.live_teacher = inputs["live_teacher"]
        else:
            inputs["teacher"].check(vlm, generic)
            a.teacher_emb = inputs["teacher"].embeddings.to(vlm.device)
    if "target_teacher" in need:
        inputs["target_teacher"].check(vlm, target, "target")
        a.target_teacher = inputs["target_teacher"].embeddings.to(vlm.device)
    if "random_texts" in need:
        inputs["random_texts"] = torch.nn.functional.normalize(torch.as_tensor(inputs["random_texts"]).float(),
                                                               dim=-1).to(vlm.device)
    if inputs.get("class_emb") is not None and cfg.lwf > 0:
        a.class_emb = torch.nn.functional.normalize(torch.as_tensor(inputs["class_emb"]).float(), dim=-1).to(vlm.device)
        a.logit_scale = float(vlm.model.logit_scale.exp())
    a.inputs = inputs
    return a
