"""What the regularizers compare against, one table: `INPUTS`. Each row is one input a term of `terms.TERMS` may
need, how it is built, and the hint shown when it is missing.

Two kinds of row:
- built from the experiment's data before training (`build(vlm, domains, cfg, ctx)`; `prepare_inputs` builds the
  ones a config needs): pre-extracted teacher embeddings, EWC's Fisher, class prompts, random-token texts;
- built by train() itself from the model it starts from (`in_train=True`; `build(vlm, target, cfg, ctx)`): a frozen
  copy of the tower, the gradient scores of a sparse update, TRACER's averaged teacher, FLOW's pretrained losses.
A given input is made ready by its row before the first step (`ready(value, vlm, cfg, ctx)`: checked against the
model and data, normalised, moved to the model's device); terms read the result as `anchors.inputs[name]`. A new
input is one row here; a term names it in its `needs`, and train() never names it.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch


@dataclass(frozen=True)
class Input:
    name: str
    build: Callable
    hint: str
    in_train: bool = False
    ready: Callable = lambda value, vlm, cfg, ctx: value  # what train() does with a given input before the first step


@dataclass(frozen=True)
class ClassPrompts:
    """LwF's zero-shot classifier over the generic classes: normalised (C, D) prompt embeddings and the model's scale."""
    emb: torch.Tensor
    scale: float

    def logits(self, emb: torch.Tensor) -> torch.Tensor:
        return self.scale * emb @ self.emb.T


def _teacher(vlm, domains, cfg, ctx):
    from .teacher import extract_teacher
    return extract_teacher(vlm, domains.generic_train, progress=ctx.get("progress", False), path=ctx.get("teacher_path"))


def _target_teacher(vlm, domains, cfg, ctx):
    from .teacher import extract_teacher
    return extract_teacher(vlm, domains.target_train, progress=ctx.get("progress", False))


def _prompts(vlm, domains):
    from ..models import embed_texts
    if domains.generic_prompts is None:
        raise ValueError("the generic data have no class prompts, which EWC's Fisher and LwF need (config: "
                         "[data.generic] prompt = 'a photo of a {}.' or prompts = FILE)")
    return torch.from_numpy(embed_texts(vlm, domains.generic_prompts, progress=False))


def _class_emb(vlm, domains, cfg, ctx):
    return _prompts(vlm, domains)


def _normalised(value, vlm) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.as_tensor(value).float(), dim=-1).to(vlm.device)


def _teacher_ready(value, vlm, cfg, ctx):
    """A pre-extracted teacher, checked against the model and the generic images, as a (N_generic, D) tensor on the
    model's device; teacher='live': a frozen copy of the tower (an nn.Module)."""
    if isinstance(value, str) and value == "live":
        return _live_teacher(vlm, ctx["target"], cfg, ctx)
    value.check(vlm, ctx["generic"])
    return value.embeddings.to(vlm.device)


def _target_teacher_ready(value, vlm, cfg, ctx):
    value.check(vlm, ctx["target"], "target")
    return value.embeddings.to(vlm.device)


def _fisher(vlm, domains, cfg, ctx):
    """EWC's diagonal Fisher on the first fisher_images generic images; inside a comparison computed once per
    starting weights, data and threads (`budget.cached`: the same bits every run would compute)."""
    import os

    from ..budget import CACHE, cached, key_of
    from .regularizers import fisher_diagonal
    n = min(ctx.get("fisher_images", 1000), len(domains.generic_train))
    part = domains.generic_train.rows(0, n)
    compute = lambda: fisher_diagonal(vlm, part, part.labels, _prompts(vlm, domains), progress=ctx.get("progress", False))
    if not os.environ.get(CACHE):
        return compute()
    from ..pretrain import fingerprint
    key = key_of("fisher", fingerprint(vlm), part.fingerprint(), domains.generic_prompts, n, torch.get_num_threads(),
                 str(torch.__version__), str(vlm.device))
    return cached("fisher", key, compute, save=torch.save, load=lambda p: torch.load(p, weights_only=True))


def _random_texts(vlm, domains, cfg, ctx, n: int = 1000, seed: int = 0):
    return random_text_embeddings(vlm, n, seed)


def random_text_embeddings(vlm, n: int = 1000, seed: int = 0, min_len: int = 3) -> torch.Tensor:
    """(n, D) L2-normalised embeddings, by the frozen text tower, of token sequences of random length and random
    tokens (Lipsum-FT's random texts: no captions needed). The tokenizer's own layout is kept: its start token (if
    any), random ids below its special tokens, then its end token."""
    import torch.nn.functional as F
    template = vlm.tokenizer([""])[0]
    eot_pos = int(template.argmax())          # open_clip pools at the largest id: the end-of-text token
    eot, ctx_len = int(template[eot_pos]), len(template)
    specials = {int(t) for t in template[:eot_pos + 1]}
    high = min(specials) if eot_pos > 0 else eot  # ids below the start token (open_clip) or the end token (toy)
    g = torch.Generator().manual_seed(seed)
    tokens = torch.zeros(n, ctx_len, dtype=torch.long)
    lengths = torch.randint(min_len, ctx_len - eot_pos, (n,), generator=g)
    for i, length in enumerate(lengths.tolist()):
        tokens[i, :eot_pos] = template[:eot_pos]
        tokens[i, eot_pos:eot_pos + length] = torch.randint(1, high, (length,), generator=g)
        tokens[i, eot_pos + length] = eot
    out = []
    with torch.no_grad():
        for i in range(0, n, 256):
            out.append(F.normalize(vlm.model.encode_text(tokens[i:i + 256].to(vlm.device)).float(), dim=-1).cpu())
    return torch.cat(out)


def _live_teacher(vlm, target, cfg, ctx):
    return copy.deepcopy(vlm.visual).eval().requires_grad_(False)


def _gradient_scores(vlm, target, cfg, ctx, batches: int = 10):
    """|gradient| of the cross-entropy summed over `batches` target batches at the starting weights and head (SAFT's
    selection of the entries to update)."""
    from ..datasets.sampling import batch_indices
    from ..losses import classification_loss
    from ..models import image_embedding, preprocess
    head, labels, params = ctx["head"], ctx["labels"], ctx["params"]
    scores = [torch.zeros_like(p) for p in params]
    for k in range(batches):
        idx = batch_indices(len(target), cfg.batch_size, cfg.seed + 7_777, k)
        emb = image_embedding(vlm, preprocess(vlm, target.take(idx)))
        loss = classification_loss(head(emb), labels[idx].to(emb.device), cfg.classifier, cfg.margin, cfg.scale)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        for s, g in zip(scores, grads):
            if g is not None:
                s.add_(g.abs())
    return scores


def _bma_teacher(vlm, target, cfg, ctx):
    from .teacher import TrajectoryTeacher
    names = [n for n, p in vlm.visual.named_parameters() if p.requires_grad]
    return TrajectoryTeacher(vlm, names, cfg.steps, cfg.bma_alpha, cfg.bma_beta)


def _pretrained_losses(vlm, target, cfg, ctx):
    """FLOW's L0: the starting (pretrained) tower's per-sample loss on the target training images, eval
    preprocessing, under a class-mean head (`regularizers.class_mean_losses`, the run's margin loss and scale).
    Not the run's own head, whose random initial weights would make every loss noise around log C; no text either
    (the fine-grained classes have no names)."""
    from ..models import embed_images
    from .regularizers import class_mean_losses
    emb = torch.from_numpy(embed_images(vlm, target, progress=False)).to(vlm.device)
    return class_mean_losses(emb, ctx["labels"].to(vlm.device), cfg.classifier, cfg.margin, cfg.scale)


INPUTS = {i.name: i for i in (
    Input("teacher", _teacher, "a teacher: train(..., teacher=extract_teacher(pretrained_model, generic)) or "
                               "teacher='live'", ready=_teacher_ready),
    Input("fisher", _fisher, "a Fisher: train(..., fisher=fisher_diagonal(model, generic images, labels, prompts))",
          ready=lambda value, vlm, cfg, ctx: {n: value[n].to(vlm.device) for n in ctx["names"]}),
    Input("class_emb", _class_emb, "class prompts: train(..., class_emb=(C, D) generic class-prompt embeddings)",
          ready=lambda value, vlm, cfg, ctx: ClassPrompts(_normalised(value, vlm),
                                                          float(vlm.model.logit_scale.exp()))),
    Input("target_teacher", _target_teacher, "the pretrained model's embeddings of the target images: train(..., "
                                             "target_teacher=extract_teacher(pretrained_model, target))",
          ready=_target_teacher_ready),
    Input("random_texts", _random_texts, "random-token text embeddings: train(..., random_texts="
                                         "inputs.random_text_embeddings(model))",
          ready=lambda value, vlm, cfg, ctx: _normalised(value, vlm)),
    Input("live_teacher", _live_teacher, "(built by train: a frozen copy of the tower)", in_train=True),
    Input("gradient_scores", _gradient_scores, "(built by train: |gradient| at the start)", in_train=True),
    Input("bma_teacher", _bma_teacher, "(built by train: a copy of the tower, averaged along training)",
          in_train=True),
    Input("pretrained_losses", _pretrained_losses, "(built by train: the starting tower's per-sample target losses)",
          in_train=True),
)}


def prepare_inputs(vlm, cfg, domains, teacher_path: str | Path | None = None, fisher_images: int = 1000,
                   progress: bool = False) -> dict:
    """The inputs this config's terms need (terms.needed_inputs) that are built from the data before training;
    train() builds the others. Used by experiments and benchmarks alike."""
    from .terms import needed_inputs
    ctx = {"teacher_path": teacher_path, "fisher_images": fisher_images, "progress": progress}
    return {name: INPUTS[name].build(vlm, domains, cfg, ctx) for name in sorted(needed_inputs(cfg))
            if not INPUTS[name].in_train}
