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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Literal

import torch
from tqdm.auto import tqdm

from .data import SAMPLERS, Sampler, Split, batch_indices, domain_at, step_generator
from .losses import CosineClassifier, MarginLoss, classification_loss
from .models import VLM, Augment, image_embedding, param_groups, preprocess, train_mode


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
    # --- validation and checkpoints
    eval_every: int = 50              # target steps between validations (0: never)
    select: str = "fine_map@20"       # key of validate()'s dict that the kept checkpoint maximises
    ckpt_every: int = 100             # target steps between resumable checkpoints (0: only at the end)
    log_every: int = 10               # steps between log lines (and non-finite checks)
    seed: int = 0

    def __post_init__(self):
        if self.sampler not in SAMPLERS:
            raise ValueError(f"TrainConfig.sampler must be one of {SAMPLERS}, got {self.sampler!r}")
        if self.classifier not in ("normface", "cosface", "arcface"):
            raise ValueError(f"TrainConfig.classifier must be normface, cosface or arcface, got {self.classifier!r}")
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError("TrainConfig.steps and batch_size must be >= 1")
        if self.sampler != "target_only" and not self.generic_terms():
            raise ValueError(f"sampler={self.sampler!r} draws generic batches, but no loss term applies to them: "
                             "they would only move the optimiser's momentum. Set a generic-data loss weight "
                             "or use sampler='target_only'.")

    def generic_terms(self) -> list[str]:
        """Loss terms computed on generic batches (the regularizers add theirs here)."""
        return []


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


def train_step(vlm: VLM, head: CosineClassifier, batch: Split, idx: torch.Tensor, domain: int, cfg: TrainConfig,
               generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Named, weighted loss terms for one batch. domain 0 = target (classifier), 1 = generic."""
    images = batch.images[idx]
    pixels = preprocess(vlm, images, train=True, augment=cfg.augment, generator=generator)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=vlm.device.type == "cuda"):
        emb = image_embedding(vlm, pixels)  # (B, D), L2-normalised float32
    terms = {}
    if domain == 0:
        labels = torch.as_tensor(batch.labels[idx.numpy()], device=emb.device)
        terms["ce"] = cfg.ce_weight * classification_loss(head(emb), labels, cfg.classifier, cfg.margin, cfg.scale)
    return terms


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
          progress: bool = True) -> tuple[CosineClassifier, TrainResult]:
    """Fine-tune vlm.visual (in place) on `target`; returns the head and a TrainResult.

    validate(vlm) -> dict of validation scores; the kept (and, at the end, loaded) checkpoint maximises
    validate()[cfg.select] over the validations after step 0. out_dir=None keeps nothing on disk.
    resume=True continues from out_dir/last.pt; without it an out_dir holding a run is refused."""
    # ==== setup: data, head, optimiser =====================================================
    if cfg.sampler != "target_only" and generic is None:
        raise ValueError(f"sampler={cfg.sampler!r} needs generic data: pass generic=Split(...)")
    device = vlm.device
    labels, n_classes = _remap(target.labels)
    target = Split(target.images, labels.numpy())
    head = CosineClassifier(vlm.visual.output_dim, n_classes, generator=torch.Generator().manual_seed(cfg.seed)).to(device)
    opt = torch.optim.AdamW(param_groups(vlm, head, cfg.lr_backbone, cfg.lr_head, cfg.weight_decay),
                            betas=(0.9, 0.999), eps=1e-8)
    domains = (target, generic)
    sizes = (len(target), len(generic) if generic is not None else 0)

    # ==== output folder: never overwrite a user's run; resume from last.pt ==================
    step, target_step, best, history = 0, 0, {"score": None, "step": None, "state": None}, []
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        if resume and (out / "last.pt").exists():
            ckpt = torch.load(out / "last.pt", map_location=device, weights_only=False)
            if ckpt["config"] != asdict(cfg):
                diff = {k: (v, asdict(cfg)[k]) for k, v in ckpt["config"].items() if asdict(cfg).get(k) != v}
                raise ValueError(f"{out / 'last.pt'} was written with another config {diff}; resume with the same "
                                 "TrainConfig or start a new out_dir")
            vlm.visual.load_state_dict(ckpt["visual"])
            head.load_state_dict(ckpt["head"])
            opt.load_state_dict(ckpt["optimizer"])
            step, target_step, history = ckpt["step"], ckpt["target_step"], ckpt["history"]
            best = {"score": ckpt["best_score"], "step": ckpt["best_step"], "state": None}
            if (out / "best.pt").exists():
                b = torch.load(out / "best.pt", map_location="cpu", weights_only=False)
                best["state"] = {"visual": b["visual"], "head": b["head"]}
        elif any((out / f).exists() for f in ("last.pt", "best.pt", "log.jsonl")):
            raise FileExistsError(f"{out} already holds a training run (last.pt / best.pt / log.jsonl). "
                                  "Pass resume=True to continue it, or choose a new out_dir; nothing was overwritten.")
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
        if target_step > 0 and (best["score"] is None or val[cfg.select] > best["score"]):
            best.update(score=val[cfg.select], step=target_step,
                        state={"visual": copy.deepcopy(vlm.visual.state_dict()), "head": copy.deepcopy(head.state_dict())})
            if out is not None:
                _atomic_save({**best["state"], "config": asdict(cfg), "step": target_step, "score": best["score"]},
                             out / "best.pt")
        return val

    def save_last() -> None:
        if out is not None:
            _atomic_save({"visual": vlm.visual.state_dict(), "head": head.state_dict(), "optimizer": opt.state_dict(),
                          "step": step, "target_step": target_step, "history": history, "config": asdict(cfg),
                          "best_score": best["score"], "best_step": best["step"]}, out / "last.pt")

    # ==== the loop ==========================================================================
    t0 = time.time()
    if validate is not None and cfg.eval_every and step == 0:
        run_validation()  # the pretrained model: logged, never selected
    train_mode(vlm, True)
    pending: list[tuple[int, torch.Tensor]] = []  # losses not yet checked for finiteness (avoids a sync per step)
    bar = tqdm(total=cfg.steps, initial=target_step, desc="train", disable=not progress)
    while target_step < cfg.steps:
        domain = domain_at(step, cfg.sampler, cfg.seed, sizes)
        data = domains[domain]
        gen = step_generator(cfg.seed, step)
        idx = batch_indices(len(data), cfg.batch_size, cfg.seed, step)
        terms = train_step(vlm, head, data, idx, domain, cfg, gen)
        loss = sum(terms.values())
        pending.append((step, loss.detach()))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        target_step += domain == 0
        bar.update(int(domain == 0))
        is_eval = domain == 0 and validate is not None and cfg.eval_every and (
            target_step % cfg.eval_every == 0 or target_step == cfg.steps)
        is_ckpt = domain == 0 and (target_step == cfg.steps or (cfg.ckpt_every and target_step % cfg.ckpt_every == 0))
        record = None
        if step % cfg.log_every == 0 or is_eval or is_ckpt or target_step == cfg.steps:
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
    train_mode(vlm, False)

    # ==== the kept checkpoint ===============================================================
    if best["state"] is not None:
        vlm.visual.load_state_dict(best["state"]["visual"])
        head.load_state_dict(best["state"]["head"])
    return head, TrainResult(best["step"], best["score"], history, time.time() - t0, out)


def _check_finite(pending: list[tuple[int, torch.Tensor]], terms: dict[str, torch.Tensor]) -> None:
    if not pending:
        return
    ok = torch.isfinite(torch.stack([l for _, l in pending]))
    if not bool(ok.all()):
        bad = pending[int((~ok).nonzero()[0])][0]
        raise FloatingPointError(
            f"non-finite loss at step {bad} (last terms: { {k: float(v.detach()) for k, v in terms.items()} }). "
            "Training stopped; checkpoints already written were kept. Lower the learning rates or loss weights.")
