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
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from . import distributed
from .checkpoints import RunFolder, tower_fingerprint
from .methods.inputs import INPUTS
from .methods.lora import add_lora, merge_lora
from .losses import CosineClassifier, classification_loss
from .models import VLM, param_groups, preprocess, progress_bar, train_mode
from .methods.regularizers import Quadratic, quadratic_penalty_
from .run_state import Anchors, RunState, TrainResult, TrainState
from .datasets.sampling import ADAPTIVE, batches, domain_at, step_generator
from .methods.terms import TermBatch, active, needed_inputs
from .towers import layout
from .trainconfig import TrainConfig

__all__ = ["TrainConfig", "TrainResult", "TrainState", "train", "train_step", "count_updates", "needed_inputs"]


def train_step(vlm: VLM, head: CosineClassifier, images: torch.Tensor, labels: torch.Tensor | None, idx: torch.Tensor,
               domain: int, cfg: TrainConfig, generator: torch.Generator,
               anchors: Anchors | None = None) -> dict[str, torch.Tensor]:
    """Named, weighted loss terms for one batch of uint8 images (autograd terms only). domain 0 = target (labels
    given), 1 = generic (idx: the images' indices in the split, for pre-extracted teacher embeddings).

    target batch: ce (per-sample weighted by the "samples" TERMS switched on) + the target TERMS switched on;
    generic batch: the generic TERMS switched on, against the frozen pretrained model. Weight-space penalties and step
    rules act in train(), after backward."""
    on = active(cfg, "target" if domain == 0 else "generic")
    blocks = any(t.features == "blocks" for t in on)
    pixels = preprocess(vlm, images, train=True, augment=cfg.augment, generator=generator)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=vlm.device.type == "cuda"):
        emb, student_blocks = _embed(vlm.visual, pixels, blocks)  # (B, D), L2-normalised float32
    out = {}
    if domain == 0:
        reweight = active(cfg, "samples")
        if not reweight:
            ce = classification_loss(head(emb), labels.to(emb.device), cfg.classifier, cfg.margin, cfg.scale)
        else:  # mean_b w_b CE_b, w the product of the rows' sample weights
            ce = classification_loss(head(emb), labels.to(emb.device), cfg.classifier, cfg.margin, cfg.scale,
                                     reduction="none")
            for t in reweight:
                ce = ce * t.sample_weights(cfg, anchors, idx).to(ce.device)
            ce = ce.mean()
        out["ce"] = cfg.ce_weight * ce
    if not on:
        return out
    teacher, teacher_blocks = _teacher(vlm, images, idx, domain, anchors, blocks)  # un-augmented, eval preprocessing
    batch = TermBatch(emb, teacher, cfg, anchors, generator, student_blocks, teacher_blocks, images)
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
    """The frozen pretrained model's view of the batch; None when no switched-on term needs it (a term with a
    teacher of its own, TRACER's). Target batches: its embeddings of the target images; generic batches: the
    pre-extracted embeddings, or a frozen copy of the tower (teacher='live', and LDIFS's block features)."""
    inputs = anchors.inputs
    if domain == 0:
        emb = inputs.get("target_teacher")
        return (None, None) if emb is None else (emb[idx.to(emb.device)], None)
    emb = inputs.get("teacher")
    live = emb if isinstance(emb, torch.nn.Module) else inputs.get("live_teacher")
    if not isinstance(emb, torch.Tensor):
        emb = None
    if live is not None and (blocks or emb is None):
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=vlm.device.type == "cuda"):
            return _embed(live, preprocess(vlm, images), blocks)
    if emb is None:
        return None, None
    return emb[idx.to(emb.device)], None


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
                "classes": n_classes, "config": asdict(cfg), "threads": torch.get_num_threads(),
                "validation": _validation_identity(validate)}
    sizes = (len(target), len(generic) if generic is not None else 0)
    with _handed_back(vlm, cfg):  # the model goes back as it came (trainable set, LoRA merged) whatever happens
        opt = torch.optim.AdamW(param_groups(vlm, head, cfg.lr_backbone, cfg.lr_head, cfg.weight_decay),
                                betas=(0.9, 0.999), eps=1e-8)
        anchors = _anchors(vlm, cfg, target, generic, head, labels, inputs)
        ckpt = folder.restore(identity, config_defaults=asdict(TrainConfig()))
        run = RunState(folder, cfg, vlm, head, opt, ckpt, identity, anchors)
        t0 = time.time()
        if validate is not None and cfg.eval_every and run.step == 0:
            run.validate(validate)  # the pretrained model: logged; kept only with cfg.keep_pretrained
        train_mode(vlm, True)
        bar = progress_bar(None, progress and distributed.is_main(), total=cfg.steps, initial=run.target_step,
                           desc="train")
        for step, domain, idx, images in batches((target, generic), cfg.sampler, cfg.seed, cfg.batch_size, cfg.steps,
                                                 start=run.step,
                                                 adaptive=run.adaptive if run.official is None else run.official):
            frozen = run.target_step < cfg.lp_ft_steps  # LP-FT: head only, the backbone gets no gradient at all
            if frozen and domain == 1:  # nothing trains on a generic batch then (the head sees target data only)
                run.step = step + 1
                continue
            next_target = run.target_step + (domain == 0)
            is_eval = domain == 0 and validate is not None and cfg.eval_every and (
                next_target % cfg.eval_every == 0 or next_target == cfg.steps)
            is_ckpt = domain == 0 and (next_target == cfg.steps or (cfg.ckpt_every and next_target % cfg.ckpt_every == 0))
            is_log = (step + 1) % cfg.log_every == 0 or is_eval or is_ckpt or next_target == cfg.steps
            if frozen != run.params_frozen:  # LP-FT's switch (a frozen BatchNorm keeps its statistics: train_mode)
                for p in anchors.params:
                    p.requires_grad_(not frozen)
                train_mode(vlm, True)
                run.params_frozen = frozen
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
        updates = run.counts() if cfg.sampler in ADAPTIVE else count_updates(cfg, sizes, run.step)
        result = run.result(time.time() - t0, updates)
    return head, result


def _validation_identity(validate) -> dict | None:
    """The validation data's fingerprints (`evaluation.validation_fn`), part of a run's resume identity: a run
    resumed on other validation data would keep a checkpoint chosen on two validation sets. None: a validate
    function that does not say what it validates on."""
    of = getattr(validate, "data_identity", None)
    return of() if callable(of) else None


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


def count_updates(cfg: TrainConfig, sizes: tuple[int, int], steps: int) -> dict[str, int]:
    """Batches of each domain in the first `steps` optimiser steps, and how many of them updated the backbone
    (all but the LP-FT warm-up's). A pure function of the config, like the schedule itself (not for the adaptive
    sampler, whose schedule depends on the losses: train() counts those)."""
    if cfg.sampler in ADAPTIVE:
        raise ValueError(f"the {cfg.sampler} sampler's batch counts depend on the run: read TrainResult.updates")
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
            users = [t.name for t in active(cfg) if name in t.needs]
            raise ValueError(f"{users} need {INPUTS[name].hint} (inputs.prepare_inputs builds it)")
    if cfg.weight_terms() or cfg.step_terms() or cfg.average != "none":
        a.theta0 = [p.detach().clone() for p in a.params]
    ctx = {"head": head, "labels": labels, "params": a.params, "names": a.names, "target": target, "generic": generic}
    inputs = dict(inputs)
    for name in sorted(need):  # built here first (in_train rows), then the given ones made ready, in name order
        if INPUTS[name].in_train:
            inputs[name] = INPUTS[name].build(vlm, target, cfg, ctx)
    for name in sorted(need):
        if not INPUTS[name].in_train:
            inputs[name] = INPUTS[name].ready(inputs[name], vlm, cfg, ctx)
    params = dict(named)
    for t in active(cfg, "weights"):
        a.quad.append((t.name, Quadratic.build(t.weights(params, cfg, inputs), getattr(cfg, t.name),
                                               a.theta0 if t.centre == "pretrained" else None)))
    a.steps = [t.step(cfg, a, inputs) for t in active(cfg) if t.step is not None]  # step rules, in TERMS order
    a.inputs = inputs
    return a
