"""The training loop: fine-tune a VLM's image tower on a fine-grained target domain.

One readable `train()` driven by a frozen `TrainConfig`:

  for each step:
      domain  = sampler(step)                    target (fine-grained) or generic batch
      terms   = train_step(...)                  dict of named, weighted loss terms
      loss    = sum(terms);  backward;  AdamW step (backbone and head learning rates)
      every eval_every target steps: validate -> keep the best checkpoint by cfg.select

Everything random in a step comes from (seed, step), so a run resumed from `last.pt` ends with the
same weights as one that was never interrupted. Files in out_dir: `log.jsonl` (one JSON object per
logged step or validation), `last.pt` (for resuming), `best.pt` (the kept checkpoint). Checkpoints
are state dicts plus the config, written atomically. A non-finite loss raises FloatingPointError
before anything is written.
"""
from __future__ import annotations

import copy
import json
import os
import time
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable, Literal

import torch

from .data import SAMPLERS, Sampler, Split, batch_indices, domain_at, step_generator
from .lora import add_lora, merge_lora
from .losses import CosineClassifier, MarginLoss, classification_loss
from .models import VLM, Augment, image_embedding, param_groups, preprocess, progress_bar, train_mode
from .regularizers import (embedding_distillation, lwf_distillation, Quadratic, quadratic_penalty_,
                           quadratic_weights, relational_distillation)
from .teacher import TeacherEmbeddings


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
        """Loss terms computed on generic batches."""
        return [t for t in ("distill", "relational", "lwf") if getattr(self, t) > 0]


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
    theta0: list[torch.Tensor] | None = None          # their pretrained values
    quad: list[tuple[str, Quadratic]] = field(default_factory=list)   # weight-space penalties, prepared once
    teacher_emb: torch.Tensor | None = None           # (N_generic, D) pre-extracted teacher embeddings
    live_teacher: torch.nn.Module | None = None       # or a frozen copy of the pretrained tower
    class_emb: torch.Tensor | None = None             # (C, D) generic class-prompt embeddings (LwF)
    logit_scale: float = 100.0


def train_step(vlm: VLM, head: CosineClassifier, batch: Split, idx: torch.Tensor, domain: int, cfg: TrainConfig,
               generator: torch.Generator, anchors: Anchors | None = None) -> dict[str, torch.Tensor]:
    """Named, weighted loss terms for one batch (autograd terms only). domain 0 = target, 1 = generic.

    target batch: ce;  generic batch: distill / relational / lwf against the frozen pretrained model.
    Weight-space penalties are added after backward by `quadratic_penalty_` (see train())."""
    images = batch.images[idx]
    pixels = preprocess(vlm, images, train=True, augment=cfg.augment, generator=generator)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=vlm.device.type == "cuda"):
        emb = image_embedding(vlm, pixels)  # (B, D), L2-normalised float32
    terms = {}
    if domain == 0:
        labels = torch.as_tensor(batch.labels[idx.numpy()], device=emb.device)
        terms["ce"] = cfg.ce_weight * classification_loss(head(emb), labels, cfg.classifier, cfg.margin, cfg.scale)
        return terms
    teacher = _teacher_embedding(vlm, images, idx, anchors)  # of the un-augmented image, eval preprocessing
    if cfg.distill > 0:
        terms["distill"] = cfg.distill * embedding_distillation(emb, teacher, cfg.distill_kind)
    if cfg.relational > 0:
        terms["relational"] = cfg.relational * relational_distillation(emb, teacher)
    if cfg.lwf > 0:
        cls = anchors.class_emb
        terms["lwf"] = cfg.lwf * lwf_distillation(anchors.logit_scale * emb @ cls.T, anchors.logit_scale * teacher @ cls.T,
                                                  cfg.lwf_temperature)
    return terms


def _teacher_embedding(vlm: VLM, images: torch.Tensor, idx: torch.Tensor, anchors: Anchors | None) -> torch.Tensor:
    if anchors is not None and anchors.teacher_emb is not None:
        return anchors.teacher_emb[idx.to(anchors.teacher_emb.device)]
    if anchors is not None and anchors.live_teacher is not None:
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=vlm.device.type == "cuda"):
            return torch.nn.functional.normalize(anchors.live_teacher(preprocess(vlm, images)).float(), dim=-1)
    raise ValueError("distillation needs a teacher: train(..., teacher=extract_teacher(model, generic.images)) "
                     "or teacher='live'")


def _remap(labels) -> tuple[torch.Tensor, int]:
    classes, inv = torch.unique(torch.as_tensor(labels), return_inverse=True)
    return inv, len(classes)


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def train(vlm: VLM, target: Split, cfg: TrainConfig, out_dir: str | Path | None = None,
          generic: Split | None = None, validate: Callable[[VLM], dict] | None = None,
          hooks: tuple[Callable[[TrainState], bool | None], ...] = (), resume: bool = False,
          progress: bool = True, teacher: TeacherEmbeddings | Literal["live"] | None = None,
          fisher: dict[str, torch.Tensor] | None = None,
          class_emb: torch.Tensor | None = None) -> tuple[CosineClassifier, TrainResult]:
    """Fine-tune vlm.visual (in place) on `target`; returns the head and a TrainResult.

    generic: generic data for the samplers' generic batches (distillation terms apply to them).
    teacher: pre-extracted embeddings of generic.images by the pretrained model (checked by fingerprint),
    or "live" for a frozen copy of the tower. fisher: diagonal Fisher for EWC (`fisher_diagonal`).
    class_emb: (C, D) generic class-prompt embeddings for LwF.
    validate(vlm) -> dict of validation scores; the kept (and, at the end, loaded) checkpoint maximises
    validate()[cfg.select] over the validations after step 0. out_dir=None keeps nothing on disk.
    resume=True continues from out_dir/last.pt; without it an out_dir holding a run is refused."""
    # ==== setup: data, head, frozen parts, optimiser =======================================
    if cfg.sampler != "target_only" and generic is None:
        raise ValueError(f"sampler={cfg.sampler!r} needs generic data: pass generic=Split(...)")
    if cfg.generic_terms() and cfg.sampler == "target_only":
        raise ValueError(f"{cfg.generic_terms()} apply to generic batches, but sampler='target_only' draws none; "
                         "use sampler='round_robin' (the paper), 'balanced' or 'proportional'")
    if out_dir is not None and not (resume and (Path(out_dir) / "last.pt").exists()) and any(
            (Path(out_dir) / f).exists() for f in ("last.pt", "best.pt", "log.jsonl")):
        raise FileExistsError(f"{out_dir} already holds a training run (last.pt / best.pt / log.jsonl). "
                              "Pass resume=True to continue it, or choose a new out_dir; nothing was overwritten.")
    device = vlm.device
    labels, n_classes = _remap(target.labels)
    target = Split(target.images, labels.numpy())
    head = CosineClassifier(vlm.visual.output_dim, n_classes, generator=torch.Generator().manual_seed(cfg.seed)).to(device)
    requires_grad_before = {n: p.requires_grad for n, p in vlm.visual.named_parameters()}
    try:  # from here on, the model goes back as it came (trainable set, LoRA merged) whatever happens
        _freeze_first_blocks(vlm, cfg.freeze_blocks)
        if cfg.lora_rank > 0:
            add_lora(vlm.visual, cfg.lora_rank, seed=cfg.seed)  # merged back into the weights at the end
        opt = torch.optim.AdamW(param_groups(vlm, head, cfg.lr_backbone, cfg.lr_head, cfg.weight_decay),
                                betas=(0.9, 0.999), eps=1e-8)
        anchors = _anchors(vlm, cfg, generic, teacher, fisher, class_emb)
        domains = (target, generic)
        sizes = (len(target), len(generic) if generic is not None else 0)

        # ==== output folder: never overwrite a user's run; resume from last.pt ==================
        step, target_step, best, history = 0, 0, {"score": None, "step": None, "state": None}, []
        start = {"score": None}  # the pretrained model's validation score on cfg.select
        out = Path(out_dir) if out_dir is not None else None
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
            if resume and (out / "last.pt").exists():
                ckpt = torch.load(out / "last.pt", map_location=device, weights_only=False)
                if ckpt["config"] != asdict(cfg):
                    diff = {k: (v, asdict(cfg)[k]) for k, v in ckpt["config"].items() if asdict(cfg).get(k) != v}
                    raise ValueError(f"{out / 'last.pt'} was written with another config {diff}; resume with the same "
                                     "TrainConfig or start a new out_dir")
                if ckpt.get("theta0") is not None:  # the pretrained weights, not the resumed ones, anchor L2-SP / EWC
                    for t, n in zip(anchors.theta0, anchors.names):  # in place: the penalties hold these tensors
                        t.copy_(ckpt["theta0"][n])
                vlm.visual.load_state_dict(ckpt["visual"])
                head.load_state_dict(ckpt["head"])
                opt.load_state_dict(ckpt["optimizer"])
                step, target_step, history = ckpt["step"], ckpt["target_step"], ckpt["history"]
                start["score"] = next((h[f"val/{cfg.select}"] for h in history
                                       if h["step"] == 0 and f"val/{cfg.select}" in h), None)
                best = {"score": ckpt["best_score"], "step": ckpt["best_step"], "state": None}
                if (out / "best.pt").exists():
                    b = torch.load(out / "best.pt", map_location="cpu", weights_only=False)
                    best["state"] = {"visual": b["visual"], "head": b["head"]}
            with open(out / "log.jsonl", "w") as f:  # rewritten from the checkpoint's history: no duplicate lines
                f.writelines(json.dumps(h) + "\n" for h in history)

        def log(record: dict) -> None:
            history.append(record)
            if out is not None:
                with open(out / "log.jsonl", "a") as f:
                    f.write(json.dumps(record) + "\n")

        def run_validation() -> dict[str, float]:
            train_mode(vlm, False)
            val = {k: float(v) for k, v in validate(vlm).items()}
            train_mode(vlm, True)
            if cfg.select not in val:
                raise KeyError(f"TrainConfig.select={cfg.select!r} is not among the validation scores {sorted(val)}")
            log({"step": step, "target_step": target_step, **{f"val/{k}": v for k, v in val.items()}})
            if step == 0:
                start["score"] = val[cfg.select]
            if (target_step > 0 or cfg.keep_pretrained) and (best["score"] is None or val[cfg.select] > best["score"]):
                best.update(score=val[cfg.select], step=target_step,
                            state={"visual": copy.deepcopy(vlm.visual.state_dict()), "head": copy.deepcopy(head.state_dict())})
                if out is not None:
                    _atomic_save({**best["state"], "config": asdict(cfg), "step": target_step, "score": best["score"]},
                                 out / "best.pt")
            return val

        def save_last() -> None:
            if out is not None:
                theta0 = None if anchors.theta0 is None else {n: t for n, t in zip(anchors.names, anchors.theta0)}
                _atomic_save({"visual": vlm.visual.state_dict(), "head": head.state_dict(), "optimizer": opt.state_dict(),
                              "theta0": theta0,
                              "step": step, "target_step": target_step, "history": history, "config": asdict(cfg),
                              "best_score": best["score"], "best_step": best["step"]}, out / "last.pt")

        # ==== the loop ==========================================================================
        t0 = time.time()
        if validate is not None and cfg.eval_every and step == 0:
            run_validation()  # the pretrained model: logged; kept only with cfg.keep_pretrained
        train_mode(vlm, True)
        pending: list[tuple[int, torch.Tensor]] = []  # losses not yet checked for finiteness (avoids a sync per step)
        bar = progress_bar(None, progress, total=cfg.steps, initial=target_step, desc="train")
        while target_step < cfg.steps:
            domain = domain_at(step, cfg.sampler, cfg.seed, sizes)
            data = domains[domain]
            gen = step_generator(cfg.seed, step)
            idx = batch_indices(len(data), cfg.batch_size, cfg.seed, step)
            frozen_warmup = target_step < cfg.lp_ft_steps  # LP-FT: head only, backbone gets no gradient at all
            if frozen_warmup and domain == 1:  # nothing trains on a generic batch then (the head sees target data only)
                step += 1
                continue
            next_target = target_step + (domain == 0)
            is_eval = domain == 0 and validate is not None and cfg.eval_every and (
                next_target % cfg.eval_every == 0 or next_target == cfg.steps)
            is_ckpt = domain == 0 and (next_target == cfg.steps or (cfg.ckpt_every and next_target % cfg.ckpt_every == 0))
            is_log = (step + 1) % cfg.log_every == 0 or is_eval or is_ckpt or next_target == cfg.steps
            _set_backbone_trainable(anchors, not frozen_warmup)
            terms = train_step(vlm, head, data, idx, domain, cfg, gen, anchors)
            loss = sum(terms.values())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if not frozen_warmup:
                for name, q in anchors.quad:  # weight-space penalties: analytic gradient, no graph
                    value = quadratic_penalty_(anchors.params, q, value=is_log)  # the value only when logged
                    if value is not None:
                        terms[name] = value
                loss = sum(terms.values())
            pending.append((step, loss.detach()))
            opt.step()
            step += 1
            target_step = next_target
            bar.update(int(domain == 0))
            record = None
            if is_log:
                _check_finite(pending, terms)
                pending.clear()
                record = {"step": step, "target_step": target_step, "domain": ("target", "generic")[domain],
                          "loss": loss.item(), **{k: v.item() for k, v in terms.items()}}
                log(record)
                bar.set_postfix(loss=f"{record['loss']:.3f}")
            val = run_validation() if is_eval else None
            if is_ckpt:
                save_last()
            state = TrainState(step, target_step, ("target", "generic")[domain],
                               {k: v for k, v in (record or {}).items() if k not in ("step", "target_step", "domain")}, val)
            if any(h(state) is False for h in hooks):
                _check_finite(pending, terms)
                save_last()
                break
        bar.close()
        # ==== the kept checkpoint ===========================================================
        if best["state"] is not None:
            vlm.visual.load_state_dict(best["state"]["visual"])
            head.load_state_dict(best["state"]["head"])
        warnings_ = []
        if start["score"] is not None and best["score"] is not None and best["score"] < start["score"]:
            warnings_.append(f"the kept checkpoint (target step {best['step']}) scores {cfg.select} = {best['score']:.4f} "
                             f"on validation, below the pretrained model's {start['score']:.4f}: fine-tuning made "
                             "the model worse on the selection key (too high a learning rate, or a run that diverged?)")
            warnings.warn(warnings_[-1], stacklevel=2)
            log({"step": step, "target_step": target_step, "warning": warnings_[-1]})

    finally:  # also on errors and interrupts: LoRA merged, the trainable set handed back as it came
        train_mode(vlm, False)
        if cfg.lora_rank > 0:
            merge_lora(vlm.visual)
        for n, p in vlm.visual.named_parameters():
            p.requires_grad_(requires_grad_before[n])
    return head, TrainResult(best["step"], best["score"], history, time.time() - t0, out,
                             count_updates(cfg, sizes, step), warnings_)


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


def _check_finite(pending: list[tuple[int, torch.Tensor]], terms: dict[str, torch.Tensor]) -> None:
    if not pending:
        return
    ok = torch.isfinite(torch.stack([l for _, l in pending]))
    if not bool(ok.all()):
        bad = pending[int((~ok).nonzero()[0])][0]
        raise FloatingPointError(
            f"non-finite loss at step {bad} (last terms: { {k: float(v.detach()) for k, v in terms.items()} }). "
            "Training stopped; checkpoints already written were kept. Lower the learning rates or loss weights.")


def _freeze_first_blocks(vlm: VLM, n_blocks: int) -> None:
    """requires_grad=False on the patch embedding, class/position embeddings, pre-LN and blocks 0..n_blocks-1."""
    if n_blocks < 0:
        return
    blocks = getattr(getattr(vlm.visual, "transformer", None), "resblocks", None)
    if blocks is None:
        raise ValueError(f"freeze_blocks needs an open_clip VisionTransformer tower, {vlm.name} has none")
    if n_blocks > len(blocks):
        raise ValueError(f"freeze_blocks={n_blocks} but {vlm.name} has {len(blocks)} blocks")
    stem = ("conv1.", "class_embedding", "positional_embedding", "ln_pre.")
    for name, p in vlm.visual.named_parameters():
        if name.startswith(stem) or any(name.startswith(f"transformer.resblocks.{i}.") for i in range(n_blocks)):
            p.requires_grad_(False)


def _set_backbone_trainable(anchors: Anchors, on: bool) -> None:
    """LP-FT: switch the tower's trainable parameters off during the head-only warm-up, back on after."""
    for p in anchors.params:
        p.requires_grad_(on)


def _anchors(vlm: VLM, cfg: TrainConfig, generic: Split | None, teacher, fisher, class_emb) -> Anchors:
    named = [(n, p) for n, p in vlm.visual.named_parameters() if p.requires_grad]
    a = Anchors(params=[p for _, p in named], names=[n for n, _ in named])
    a.theta0 = [p.detach().clone() for p in a.params]
    params = dict(named)
    if cfg.l2sp > 0:
        kind = "l2sp_mean" if cfg.l2sp_form == "mean" else "l2sp_sum"
        a.quad.append(("l2sp", Quadratic.build(quadratic_weights(params, kind, cfg.l2sp_split_qkv), cfg.l2sp, a.theta0)))
    if cfg.ewc > 0:
        if fisher is None:
            raise ValueError("TrainConfig.ewc > 0 needs train(..., fisher=fisher_diagonal(model, generic images, ...))")
        a.quad.append(("ewc", Quadratic.build([fisher[n].to(vlm.device) for n in a.names], cfg.ewc, a.theta0)))
    if cfg.l2_zero > 0:
        a.quad.append(("l2_zero", Quadratic.build(quadratic_weights(params, "l2_zero"), cfg.l2_zero)))
    if cfg.generic_terms():
        if teacher is None:
            raise ValueError(f"{cfg.generic_terms()} need a teacher: train(..., teacher=extract_teacher(model, "
                             "generic.images)) or teacher='live'")
        if teacher == "live":
            a.live_teacher = copy.deepcopy(vlm.visual).eval().requires_grad_(False)
        else:
            teacher.check(vlm, generic.images)
            a.teacher_emb = teacher.embeddings.to(vlm.device)
    if cfg.lwf > 0:
        if class_emb is None:
            raise ValueError("TrainConfig.lwf > 0 needs train(..., class_emb=(C, D) generic class-prompt embeddings)")
        a.class_emb = torch.nn.functional.normalize(torch.as_tensor(class_emb).float(), dim=-1).to(vlm.device)
        a.logit_scale = float(vlm.model.logit_scale.exp())
    return a
