"""The training loop: fine-tune a VLM's image tower on a fine-grained target domain.

One readable `train()` driven by a frozen `TrainConfig`:

  for each (step, domain, batch) of the schedule:      target (fine-grained) or generic batch, from (seed, step)
      terms = train_step(...)                          named, weighted loss terms (the TERMS table)
      loss  = sum(terms); backward; weight-space penalties' gradients; AdamW step (backbone and head rates)
      every eval_every target steps: validate -> keep the best checkpoint by cfg.select

`TERMS` is the one table of regularizers: per term, where it applies (generic batches, or the weights at every
step), which inputs it needs (teacher embeddings, a Fisher, class prompts) and its pure function. A new
regularizer is a pure function in regularizers.py, a `TrainConfig` field with its row in TERMS (here), a preset
and a test; `experiment.prepare_inputs` builds what `needs` names.

Everything random in a step comes from (seed, step), so a run resumed from `last.pt` ends with the same weights
as one that was never interrupted. Files in out_dir (`checkpoints.RunFolder`): `log.jsonl` (one JSON object per
logged step or validation), `last.pt` (for resuming; it records which model, data and config it belongs to),
`best.pt` (the kept checkpoint). A non-finite loss raises FloatingPointError before anything is written.
"""
from __future__ import annotations

import contextlib
import copy
import time
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable, Literal

import numpy as np
import torch

from . import distributed
from .checkpoints import RunFolder, tower_fingerprint
from .data import SAMPLERS, Sampler, batches, domain_at, step_generator
from .lora import add_lora, merge_lora
from .losses import CosineClassifier, MarginLoss, classification_loss
from .models import VLM, Augment, image_embedding, param_groups, preprocess, progress_bar, train_mode
from .regularizers import (embedding_distillation, lwf_distillation, Quadratic, quadratic_penalty_,
                           quadratic_weights, relational_distillation)
from .teacher import TeacherEmbeddings
from .towers import layout


@dataclass(frozen=True)
class TrainConfig:
    # --- schedule: the same number of target (classifier) steps for every method
    steps: int = 300                  # optimiser steps on target batches; generic batches come in addition
    batch_size: int = 128
    sampler: Sampler = "target_only"  # how steps alternate between target and generic data
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
    lwf: float = 0.0                  # LwF logit distillation on zero-shot logits of the generic classes
    lwf_temperature: float = 2.0
    # --- optimisation-side regularizers
    lp_ft_steps: int = 0              # LP-FT: the first N target steps train the head only (backbone frozen)
    freeze_blocks: int = -1           # freeze the patch embedding and the first N transformer blocks (-1: none)
    lora_rank: int = 0                # > 0: train only rank-r LoRA factors of attention/MLP weights (lora.py)
    # --- validation and checkpoints
    eval_every: int = 50              # target steps between validations (0: never)
    select: str = "fine_map@20"       # key of validate()'s dict that the kept checkpoint maximises
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
        if self.lora_rank > 0 and (self.l2sp or self.ewc or self.l2_zero or self.freeze_blocks >= 0):
            raise ValueError("lora_rank > 0 trains only low-rank factors: weight-space penalties and freeze_blocks "
                             "would act on those factors, not on the pretrained weights; use one or the other")
        if self.sampler != "target_only" and not self.generic_terms():
            raise ValueError(f"sampler={self.sampler!r} draws generic batches, but no loss term applies to them: "
                             "they would only move the optimiser's momentum. Set a generic-data loss weight "
                             "or use sampler='target_only'.")

    def generic_terms(self) -> list[str]:
        """Loss terms computed on generic batches (those switched on)."""
        return [t.name for t in TERMS if t.on == "generic" and getattr(self, t.name) > 0]

    def weight_terms(self) -> list[str]:
        """Weight-space penalties (applied at every step), those switched on."""
        return [t.name for t in TERMS if t.on == "weights" and getattr(self, t.name) > 0]


# Allowed ranges, checked when a TrainConfig is made (a wrong setting is an error naming the field, never a silent
# no-op or a run that trains wrongly). Literal fields are checked against their allowed values.
_AT_LEAST_ONE = ("steps", "batch_size", "log_every")
_POSITIVE = ("lr_backbone", "lr_head", "scale", "ce_weight", "lwf_temperature")
_NON_NEGATIVE = ("weight_decay", "margin", "l2sp", "ewc", "l2_zero", "distill", "relational", "lwf", "lp_ft_steps",
                 "lora_rank", "eval_every", "ckpt_every", "seed")


def _check_fields(cfg) -> None:
    import math
    import typing
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


# ---------------------------------------------------------------------------- the regularizers, one table
@dataclass(frozen=True)
class Term:
    """One regularizer: `name` is its TrainConfig weight field. on="generic": `loss(student, teacher, cfg, anchors)`
    on generic batches (weighted by cfg.<name>); on="weights": a quadratic 1/2 sum w (theta - c)^2 over the tower,
    `weights(named_params, cfg, inputs)` per tensor, centred on the pretrained weights (or on 0), applied at every
    step as an analytic gradient. `needs`: inputs train() must be given (see experiment.prepare_inputs)."""
    name: str
    on: Literal["generic", "weights"]
    needs: tuple[str, ...] = ()
    loss: Callable | None = None
    weights: Callable | None = None
    centre: Literal["pretrained", "zero"] = "pretrained"


TERMS = (
    Term("l2sp", "weights", weights=lambda named, cfg, inp: quadratic_weights(named, f"l2sp_{cfg.l2sp_form}",
                                                                             cfg.l2sp_split_qkv)),
    Term("ewc", "weights", needs=("fisher",), weights=lambda named, cfg, inp: [inp["fisher"][n] for n in named]),
    Term("l2_zero", "weights", weights=lambda named, cfg, inp: quadratic_weights(named, "l2_zero"), centre="zero"),
    Term("distill", "generic", needs=("teacher",),
         loss=lambda s, t, cfg, a: embedding_distillation(s, t, cfg.distill_kind)),
    Term("relational", "generic", needs=("teacher",), loss=lambda s, t, cfg, a: relational_distillation(s, t)),
    Term("lwf", "generic", needs=("teacher", "class_emb"),
         loss=lambda s, t, cfg, a: lwf_distillation(a.logit_scale * s @ a.class_emb.T,
                                                    a.logit_scale * t @ a.class_emb.T, cfg.lwf_temperature)),
)
TERMS_BY_NAME = {t.name: t for t in TERMS}


def needed_inputs(cfg: TrainConfig) -> set[str]:
    """What train() needs besides the data for this config: "teacher", "fisher", "class_emb"."""
    return {n for t in TERMS if getattr(cfg, t.name) > 0 for n in t.needs}


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
    quad: list[tuple[str, Quadratic]] = field(default_factory=list)   # weight-space penalties, prepared once
    teacher_emb: torch.Tensor | None = None           # (N_generic, D) pre-extracted teacher embeddings
    live_teacher: torch.nn.Module | None = None       # or a frozen copy of the pretrained tower
    class_emb: torch.Tensor | None = None             # (C, D) generic class-prompt embeddings (LwF)
    logit_scale: float = 100.0


def train_step(vlm: VLM, head: CosineClassifier, images: torch.Tensor, labels: torch.Tensor | None, idx: torch.Tensor,
               domain: int, cfg: TrainConfig, generator: torch.Generator,
               anchors: Anchors | None = None) -> dict[str, torch.Tensor]:
    """Named, weighted loss terms for one batch of uint8 images (autograd terms only). domain 0 = target (labels
    given), 1 = generic (idx: the images' indices in the generic split, for pre-extracted teacher embeddings).

    target batch: ce;  generic batch: the generic TERMS switched on, against the frozen pretrained model.
    Weight-space penalties are added after backward by `quadratic_penalty_` (see train())."""
    pixels = preprocess(vlm, images, train=True, augment=cfg.augment, generator=generator)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=vlm.device.type == "cuda"):
        emb = image_embedding(vlm, pixels)  # (B, D), L2-normalised float32
    if domain == 0:
        return {"ce": cfg.ce_weight * classification_loss(head(emb), labels.to(emb.device), cfg.classifier,
                                                          cfg.margin, cfg.scale)}
    teacher = _teacher_embedding(vlm, images, idx, anchors)  # of the un-augmented image, eval preprocessing
    return {name: getattr(cfg, name) * TERMS_BY_NAME[name].loss(emb, teacher, cfg, anchors)
            for name in cfg.generic_terms()}


def _teacher_embedding(vlm: VLM, images: torch.Tensor, idx: torch.Tensor, anchors: Anchors | None) -> torch.Tensor:
    if anchors is not None and anchors.teacher_emb is not None:
        return anchors.teacher_emb[idx.to(anchors.teacher_emb.device)]
    if anchors is not None and anchors.live_teacher is not None:
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=vlm.device.type == "cuda"):
            return torch.nn.functional.normalize(anchors.live_teacher(preprocess(vlm, images)).float(), dim=-1)
    raise ValueError("distillation needs a teacher: train(..., teacher=extract_teacher(model, generic)) "
                     "or teacher='live'")


# ---------------------------------------------------------------------------- the loop
def train(vlm: VLM, target, cfg: TrainConfig, out_dir: str | Path | None = None, generic=None,
          validate: Callable[[VLM], dict] | None = None, hooks: tuple[Callable[[TrainState], bool | None], ...] = (),
          resume: bool = False, progress: bool = True, teacher: TeacherEmbeddings | Literal["live"] | None = None,
          fisher: dict[str, torch.Tensor] | None = None, class_emb: torch.Tensor | None = None,
          resume_hint: str = "resume=True") -> tuple[CosineClassifier, TrainResult]:
    """Fine-tune vlm.visual (in place) on `target` (a data.Split or data.FileSplit); returns the head and a TrainResult.

    generic: generic data for the samplers' generic batches (the generic TERMS apply to them).
    teacher: pre-extracted embeddings of the generic images by the pretrained model (checked by fingerprint),
    or "live" for a frozen copy of the tower. fisher: diagonal Fisher for EWC (`fisher_diagonal`).
    class_emb: (C, D) generic class-prompt embeddings for LwF.
    validate(vlm) -> dict of validation scores; the kept (and, at the end, loaded) checkpoint maximises
    validate()[cfg.select] over the validations after step 0 (and step 0 itself with cfg.keep_pretrained).
    out_dir=None keeps nothing on disk. resume=True continues from out_dir/last.pt (a folder without one starts
    afresh); without it an out_dir holding a run is refused."""
    _check_data(cfg, target, generic)
    distributed.check_config(cfg)
    folder = RunFolder(out_dir, resume, resume_hint, writer=distributed.is_main())
    distributed.barrier()  # every rank has checked the folder before rank 0 writes to it
    labels, n_classes = _remap(target.labels)
    head = CosineClassifier(vlm.embed_dim, n_classes, generator=torch.Generator().manual_seed(cfg.seed)).to(vlm.device)
    identity = {"model": vlm.name, "weights": tower_fingerprint(vlm.visual), "target": target.fingerprint(),
                "generic": generic.fingerprint() if generic is not None and cfg.sampler != "target_only" else None,
                "classes": n_classes, "config": asdict(cfg)}
    sizes = (len(target), len(generic) if generic is not None else 0)
    with _handed_back(vlm, cfg):  # the model goes back as it came (trainable set, LoRA merged) whatever happens
        opt = torch.optim.AdamW(param_groups(vlm, head, cfg.lr_backbone, cfg.lr_head, cfg.weight_decay),
                                betas=(0.9, 0.999), eps=1e-8)
        anchors = _anchors(vlm, cfg, generic, teacher, fisher, class_emb)
        run = _Progress(folder, cfg, vlm, head, opt, folder.restore(identity), identity)
        t0 = time.time()
        if validate is not None and cfg.eval_every and run.step == 0:
            run.validate(validate)  # the pretrained model: logged; kept only with cfg.keep_pretrained
        train_mode(vlm, True)
        bar = progress_bar(None, progress and distributed.is_main(), total=cfg.steps, initial=run.target_step,
                           desc="train")
        for step, domain, idx, images in batches((target, generic), cfg.sampler, cfg.seed, cfg.batch_size, cfg.steps,
                                                 start=run.step):
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
            opt.step()
            run.after_step(step, domain, terms, is_log)
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
        result = run.result(time.time() - t0, count_updates(cfg, sizes, run.step))
    return head, result


class _Progress:
    """The state of one training run: counters, history, the best checkpoint, and their files."""

    def __init__(self, folder: RunFolder, cfg: TrainConfig, vlm: VLM, head, opt, ckpt: dict | None, identity: dict):
        self.folder, self.cfg, self.vlm, self.head, self.opt, self.identity = folder, cfg, vlm, head, opt, identity
        self.step = self.target_step = 0
        self.history: list[dict] = []
        self.best = {"score": None, "step": None, "state": None}
        self.start_score = None  # the pretrained model's validation score on cfg.select
        self.pending: list[tuple[int, torch.Tensor]] = []  # losses not yet checked (avoids a sync per step)
        self.last_losses: dict[str, float] = {}
        if ckpt is not None:
            vlm.visual.load_state_dict(ckpt["visual"])
            head.load_state_dict(ckpt["head"])
            opt.load_state_dict(ckpt["optimizer"])
            self.step, self.target_step, self.history = ckpt["step"], ckpt["target_step"], ckpt["history"]
            self.best = {"score": ckpt["best_score"], "step": ckpt["best_step"], "state": folder.best_state()}
            self.start_score = ckpt.get("start_score")
        folder.start_log(self.history)

    def log(self, record: dict) -> None:
        self.history.append(record)
        self.folder.log(record)

    def after_step(self, step: int, domain: int, terms: dict[str, torch.Tensor], is_log: bool) -> None:
        self.step, self.target_step = step + 1, self.target_step + (domain == 0)
        self.pending.append((step, sum(terms.values()).detach()))
        self.terms = terms
        self.last_losses = {}
        if is_log:
            self.check_finite()
            values = distributed.mean_over_ranks(torch.stack([v.detach().float() for v in terms.values()]))
            terms_now = dict(zip(terms, values.tolist()))  # the global batch's losses, under torchrun too
            record = {"step": self.step, "target_step": self.target_step, "domain": ("target", "generic")[domain],
                      "loss": float(sum(terms_now.values())), **terms_now}
            self.log(record)
            self.last_losses = {k: v for k, v in record.items() if k not in ("step", "target_step", "domain")}

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

    def validate(self, validate: Callable) -> dict[str, float]:
        cfg = self.cfg
        train_mode(self.vlm, False)
        val = {k: float(v) for k, v in validate(self.vlm).items()}
        train_mode(self.vlm, True)
        if cfg.select not in val:
            raise KeyError(f"TrainConfig.select={cfg.select!r} is not among the validation scores {sorted(val)}")
        self.log({"step": self.step, "target_step": self.target_step, **{f"val/{k}": v for k, v in val.items()}})
        if self.step == 0:
            self.start_score = val[cfg.select]
        if (self.target_step > 0 or cfg.keep_pretrained) and (self.best["score"] is None or val[cfg.select] > self.best["score"]):
            self.best.update(score=val[cfg.select], step=self.target_step,
                             state={"visual": copy.deepcopy(self.vlm.visual.state_dict()),
                                    "head": copy.deepcopy(self.head.state_dict())})
            self.folder.save("best.pt", {**self.best["state"], "config": asdict(cfg), "step": self.target_step,
                                         "score": self.best["score"]})
        return val

    def save_last(self) -> None:
        self.folder.save("last.pt", {"visual": self.vlm.visual.state_dict(), "head": self.head.state_dict(),
                                     "optimizer": self.opt.state_dict(), "step": self.step,
                                     "target_step": self.target_step, "history": self.history,
                                     "config": asdict(self.cfg), "identity": self.identity,
                                     "best_score": self.best["score"], "best_step": self.best["step"],
                                     "start_score": self.start_score})

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
    (all but the LP-FT warm-up's). A pure function of the config, like the schedule itself."""
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
                         "use sampler='round_robin' (the paper), 'balanced' or 'proportional'")


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


def _anchors(vlm: VLM, cfg: TrainConfig, generic, teacher, fisher, class_emb) -> Anchors:
    named = [(n, p) for n, p in vlm.visual.named_parameters() if p.requires_grad]
    a = Anchors(params=[p for _, p in named], names=[n for n, _ in named])
    inputs = {"fisher": fisher}
    missing = {"fisher": fisher is None, "teacher": teacher is None, "class_emb": class_emb is None}
    for need in sorted(needed_inputs(cfg)):
        if missing[need]:
            users = [t.name for t in TERMS if need in t.needs and getattr(cfg, t.name) > 0]
            hint = {"teacher": "a teacher: train(..., teacher=extract_teacher(pretrained_model, generic)) or teacher='live'",
                    "fisher": "a Fisher: train(..., fisher=fisher_diagonal(model, generic images, labels, prompts))",
                    "class_emb": "class prompts: train(..., class_emb=(C, D) generic class-prompt embeddings)"}[need]
            raise ValueError(f"{users} need {hint} (experiment.prepare_inputs builds it)")
    if cfg.weight_terms():
        theta0 = [p.detach().clone() for p in a.params]
        params = dict(named)
        if fisher is not None:
            inputs["fisher"] = {n: fisher[n].to(vlm.device) for n in a.names}
        for name in cfg.weight_terms():
            t = TERMS_BY_NAME[name]
            a.quad.append((name, Quadratic.build(t.weights(params, cfg, inputs), getattr(cfg, name),
                                                 theta0 if t.centre == "pretrained" else None)))
    if cfg.generic_terms():
        if teacher == "live":
            a.live_teacher = copy.deepcopy(vlm.visual).eval().requires_grad_(False)
        else:
            teacher.check(vlm, generic)
            a.teacher_emb = teacher.embeddings.to(vlm.device)
    if class_emb is not None and cfg.lwf > 0:
        a.class_emb = torch.nn.functional.normalize(torch.as_tensor(class_emb).float(), dim=-1).to(vlm.device)
        a.logit_scale = float(vlm.model.logit_scale.exp())
    return a
