"""Regularizers from continual learning that keep what the pretrained model knew (method.md section 4).

Weight space (theta: image-tower tensors T, theta0: their pretrained values; the head is never included):
  L2-SP, mean form (the paper):  R = sum_T mean_{i in T} (theta_i - theta0_i)^2
      every tensor counts equally. open_clip and timm fuse q, k, v into one tensor (and an attention pool's
      k, v into one) while the paper's JAX model keeps them apart; split_qkv=True takes the mean of each part
      (= 3x, or 2x, the fused mean; `towers.fused_parts`).
  L2-SP, sum form (Li et al. 2018, "Explicit inductive bias for transfer learning"):  R = 1/2 ||theta - theta0||^2
  EWC (Kirkpatrick et al. 2017):  R = 1/2 sum_i F_i (theta_i - theta0_i)^2, F the diagonal Fisher on generic data
  L2 to zero (a control, plain weight decay as a loss):  R = 1/2 ||theta||^2
All four are quadratics 1/2 sum_i w_i (theta_i - c_i)^2; `quadratic_penalty_` adds their analytic gradient
w (theta - c) to .grad with a few torch._foreach kernels after backward, so they cost no autograd graph.

Function space, on L2-normalised embeddings (student s, frozen pretrained teacher t, batch B, dim D):
  embedding distillation, mse:    mean_b 1/D ||s_b - t_b||^2
  embedding distillation, cosine: mean_b (1 - cos(s_b, t_b))
  relational (Gram) distillation (Park et al. 2019, RKD-style): mean_{a,b} (s_a.s_b - t_a.t_b)^2
  LwF logit distillation (Li & Hoiem 2016): T^2 KL(softmax(z_t / T) || softmax(z_s / T)), mean over the batch,
      z = logit_scale * emb @ class_prompt_emb^T (zero-shot logits of the generic classes)
  LDIFS (Mukhoti et al. 2023), on intermediate features h_l (B, tokens, width) of blocks l = 1..L:
      mean_l mean_{b, tokens} || h_l / |h_l| - h0_l / |h0_l| ||^2   (each token's feature unit-normalised)
  Lipsum-FT (Nam et al. 2024), on target batches, with M text embeddings u_j of random token sequences from the
      frozen text tower:  mean_{b, j} (s_b . u_j - t_b . u_j)^2
  DiVE's average vector loss (Suzuki et al., AAAI 2026), image side, batch form, with difference vectors
      d_b = s_b - t_b:  mean_b || d_b - mean_b' d_b' ||^2
  TRACER's teacher (2026; CLIPood's Beta moving average, Shu et al. 2023): embedding distillation as above, the
      teacher's weights a Beta-weighted average of the trajectory (`WeightAverage`, kind "bma")
Sample weights of the target cross-entropy:
  FLOW (Sanyal et al., ICML 2025):  w_i = exp(-L0_i / tau) / mean_j exp(-L0_j / tau), L0_i the pretrained model's loss
      on training sample i (`class_mean_losses`); the loss is mean_b w_b CE_b
Step rules, applied to each image-tower tensor T after the optimiser's step (theta~: its new value):
  SPD (Tian et al. 2024, "Rethinking weight decay for robust fine-tuning", AdamSPD):
      c_T = -g_T . (theta_T - theta0_T)  (the hyper-gradient of the loss w.r.t. a decay strength; theta before the step)
      if c_T < 0:  r_T = clip((||theta~_T - theta0_T|| - ||theta_T - theta0_T||) / ||theta~_T - theta0_T||, 0, 1)
                   theta~_T <- theta~_T - lambda r_T (theta~_T - theta0_T)
  projection (TPGM, Tian et al. 2023; FTP 2023), a ball around the pretrained tensor, radius gamma_T:
      theta_T <- theta0_T + min(1, gamma_T / ||theta_T - theta0_T||) (theta_T - theta0_T)
  sparse update (SAFT, Nguyen et al. 2024): only the entries with the largest |gradient| at the start (a fixed
      fraction of the tower, `top_fraction_mask`) ever change
  weight averaging along training: an EMA  a_t = (1 - 1/tau) a_{t-1} + (1/tau) theta_t  (a_0 = theta0), or ZSCL's
      uniform average of theta0 and the weights every k steps (Zheng et al. 2023); validated and kept instead of theta;
      or CLIPood's BMA  a = sum_t w_t theta_t / sum_t w_t over theta0 and every update, w_t = `beta_weight`
Post-hoc weight-space merges (WiSE-FT, LiNeS, Model Stock, soups) are `merges`'s.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..towers import fused_parts

# ---------------------------------------------------------------------------- weight space


def l2sp(params: dict[str, Tensor], ref: dict[str, Tensor], form: Literal["mean", "sum"] = "mean",
         split_qkv: bool = True) -> Tensor:
    """L2-SP value with autograd (the reference; training uses `quadratic_penalty_`). See module docstring."""
    missing = set(params) - set(ref)
    if missing:
        raise KeyError(f"no pretrained reference for {sorted(missing)[:5]}")
    total = 0.0
    for name, p in params.items():
        d2 = (p - ref[name]) ** 2
        if form == "sum":
            total = total + d2.sum() / 2
        elif split_qkv and fused_parts(name) > 1:
            total = total + sum(part.mean() for part in d2.chunk(fused_parts(name), dim=0))
        else:
            total = total + d2.mean()
    return total if isinstance(total, Tensor) else torch.tensor(0.0)


def ewc_penalty(params: dict[str, Tensor], ref: dict[str, Tensor], fisher: dict[str, Tensor]) -> Tensor:
    """EWC: 1/2 sum_i F_i (theta_i - theta0_i)^2."""
    return sum(((p - ref[n]) ** 2 * fisher[n]).sum() for n, p in params.items()) / 2


def l2_zero(params: dict[str, Tensor]) -> Tensor:
    """1/2 ||theta||^2."""
    return sum((p ** 2).sum() for p in params.values()) / 2


def quadratic_weights(params: dict[str, Tensor], kind: Literal["l2sp_mean", "l2sp_sum", "l2_zero"],
                      split_qkv: bool = True) -> list[float]:
    """Per-tensor w of 1/2 sum_i w_i (theta_i - c_i)^2 for the L2 penalties (EWC's w is the Fisher itself)."""
    if kind == "l2sp_mean":
        return [2.0 * (fused_parts(n) if split_qkv else 1) / p.numel() for n, p in params.items()]
    if kind in ("l2sp_sum", "l2_zero"):
        return [1.0] * len(params)
    raise ValueError(f"unknown quadratic penalty {kind!r}")


@dataclass
class Quadratic:
    """1/2 sum_i w_i (theta_i - c_i)^2 over a list of tensors, prepared once before training (w = coef * weights)."""
    centres: list[Tensor] | None        # c (None: 0)
    scales: list                        # w per tensor: a float, or a tensor shaped like theta (EWC)
    roots: list                         # sqrt(w), for the value when w is a tensor

    @classmethod
    def build(cls, weights: list, coef: float, centres: list[Tensor] | None = None) -> "Quadratic":
        if coef < 0:
            raise ValueError(f"a penalty weight must be >= 0, got {coef}")
        scales = [coef * w for w in weights]
        roots = [math.sqrt(s) if isinstance(s, (int, float)) else s.sqrt() for s in scales]
        return cls(centres, scales, roots)


@torch.no_grad()
def quadratic_penalty_(params: list[Tensor], q: Quadratic, value: bool = True,
                       foreach: bool | None = None) -> Tensor | None:
    """Add w (theta - c) to each p.grad; return 1/2 sum w (theta - c)^2 when `value` (else None).

    No autograd graph. foreach=None picks like torch.optim does: a fixed handful of torch._foreach kernels
    for CUDA tensors (d = theta - c; d *= w; grad += d), whatever the number of tensors; on the CPU a loop
    of one subtraction and one fused add per tensor, which reads memory fewer times (measured in
    benchmarks/bench_train_step.py). The value costs one more reduction, so train() asks for it only on
    logging steps. Same value and gradient as autograd through `l2sp` / `ewc_penalty` / `l2_zero`."""
    if foreach is None:
        foreach = bool(params) and params[0].is_cuda
    for p in params:
        if p.grad is None:  # a tensor that took no part in the loss (or a direct call on fresh tensors)
            p.grad = torch.zeros_like(p)
    scalar = all(isinstance(s, (int, float)) for s in q.scales)
    if not foreach:
        total = torch.zeros((), device=params[0].device) if value and params else None
        for i, p in enumerate(params):
            d = p if q.centres is None else p - q.centres[i]
            s = q.scales[i]
            if value:
                total += (d.square().sum() * s if scalar else (d.square() * s).sum()) / 2
            if scalar:
                p.grad.add_(d, alpha=s)
            else:
                p.grad.addcmul_(d, s)
        return total
    d = list(params) if q.centres is None else torch._foreach_sub(params, q.centres)
    total = None
    if value:
        if scalar:
            norms = torch.stack(torch._foreach_norm(d))
            total = (norms.square() * torch.tensor(q.scales, dtype=norms.dtype, device=norms.device)).sum() / 2
        else:
            total = torch.stack(torch._foreach_norm(torch._foreach_mul(d, q.roots))).square().sum() / 2
    if q.centres is None:
        d = torch._foreach_mul(d, q.scales)  # never scale the parameters themselves
    else:
        torch._foreach_mul_(d, q.scales)
    torch._foreach_add_([p.grad for p in params], d)
    return total


def fisher_diagonal(vlm, images, labels, class_emb: Tensor, logit_scale: float | None = None,
                    progress: bool = False) -> dict[str, Tensor]:
    """Diagonal empirical Fisher of the image tower on generic data:  F_i = mean_x (d log p(y_x | x) / d theta_i)^2,

    with p(y | x) = softmax(logit_scale * emb(x) @ class_emb^T) the frozen zero-shot classifier over the generic
    classes (class_emb: (C, D) prompt embeddings). One backward pass per image (a square of a batch gradient
    is not a mean of squares); eval preprocessing. Use a few hundred to a few thousand images.
    images: uint8 (N, 3, H, W) or a data.Split / data.FileSplit."""
    from ..models import image_embedding, preprocess, progress_bar
    visual = vlm.visual
    was_training = visual.training
    visual.eval()
    params = {n: p for n, p in visual.named_parameters() if p.requires_grad}
    scale = float(vlm.model.logit_scale.exp()) if logit_scale is None else logit_scale
    cls = F.normalize(torch.as_tensor(class_emb).to(vlm.device).float(), dim=-1)
    labels = torch.as_tensor(np.asarray(labels))
    fisher = {n: torch.zeros_like(p) for n, p in params.items()}
    threads = torch.get_num_threads()
    if vlm.device.type == "cpu":  # one image at a time: a thread pool only spins (measured: 50 images in 135 s with
        torch.set_num_threads(1)  # 2 threads on a loaded 2-core machine, 2.8 s with 1)
    try:
        for i in progress_bar(range(len(images)), progress, desc="fisher"):
            x = images[i:i + 1] if isinstance(images, Tensor) else images.take([i])
            emb = image_embedding(vlm, preprocess(vlm, x))
            log_p = F.log_softmax(scale * emb @ cls.T, dim=-1)[0, int(labels[i])]
            grads = torch.autograd.grad(log_p, list(params.values()))
            torch._foreach_addcmul_(list(fisher.values()), grads, grads)
    finally:
        torch.set_num_threads(threads)
        visual.train(was_training)
    return {n: f / len(images) for n, f in fisher.items()}


# ---------------------------------------------------------------------------- function space


def embedding_distillation(student: Tensor, teacher: Tensor, kind: Literal["mse", "cosine"] = "mse") -> Tensor:
    """mse: mean_b 1/D ||s_b - t_b||^2 (the paper's L_e);  cosine: mean_b (1 - cos(s_b, t_b)). Shapes (B, D)."""
    if kind == "mse":
        return F.mse_loss(student, teacher)
    if kind == "cosine":
        return (1 - F.cosine_similarity(student, teacher, dim=-1)).mean()
    raise ValueError(f"distillation kind must be 'mse' or 'cosine', got {kind!r}")


def relational_distillation(student: Tensor, teacher: Tensor) -> Tensor:
    """mean over the B x B Gram entries of (s_a . s_b - t_a . t_b)^2. Shapes (B, D), L2-normalised."""
    return ((student @ student.T - teacher @ teacher.T) ** 2).mean()


def lwf_distillation(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 2.0) -> Tensor:
    """T^2 * KL(softmax(z_t / T) || softmax(z_s / T)), summed over classes, mean over the batch (Hinton et al.'s T^2
    keeps gradients comparable across temperatures). Shapes (B, C)."""
    t = F.log_softmax(teacher_logits / temperature, dim=-1)
    s = F.log_softmax(student_logits / temperature, dim=-1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean") * temperature ** 2


def ldifs(student_blocks: list[Tensor], teacher_blocks: list[Tensor]) -> Tensor:
    """LDIFS feature-space distance: mean over blocks of mean over batch and tokens of the squared distance between
    the unit-normalised token features of student and teacher. Each block's features (B, tokens, width) or (B, width)."""
    if len(student_blocks) != len(teacher_blocks) or not student_blocks:
        raise ValueError(f"ldifs needs the same blocks of student and teacher, got {len(student_blocks)} and "
                         f"{len(teacher_blocks)}")
    d = [(F.normalize(s.float(), dim=-1) - F.normalize(t.float(), dim=-1)).square().sum(-1).mean()
         for s, t in zip(student_blocks, teacher_blocks)]
    return torch.stack(d).mean()


def lipsum(student: Tensor, teacher: Tensor, texts: Tensor) -> Tensor:
    """Lipsum-FT: mean over the batch and the texts of (s_b . u_j - t_b . u_j)^2. student, teacher (B, D); texts (M, D)
    (L2-normalised embeddings of random token sequences by the frozen text tower)."""
    return (student @ texts.T - teacher @ texts.T).square().mean()


def average_vector_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """DiVE's average vector loss (Suzuki et al., "Difference Vector Equalization for Robust Fine-tuning of
    Vision-Language Models", AAAI 2026), image side: with difference vectors d_b = s_b - t_b (fine-tuned minus
    pretrained embedding of the same image),  mean_b || d_b - dbar ||^2,  dbar = mean_b' d_b'  (squared norm summed
    over D). Zero when fine-tuning moves every embedding by the same vector, so the embeddings' geometry is kept.
    DiVE's centre is a weighted (moving) average of the difference vectors over training, and it adds the text side
    and a pairwise loss (PVL); here the centre is the batch mean (the gradient is the same whether dbar is detached
    or not: sum_b (d_b - dbar) = 0). Shapes (B, D)."""
    d = student - teacher
    return (d - d.mean(0, keepdim=True)).square().sum(-1).mean()


def class_mean_losses(emb: Tensor, labels: Tensor, loss: str = "normface", margin: float = 0.0,
                      scale: float = 16.0) -> Tensor:
    """Per-sample loss of frozen embeddings under a class-mean head (FLOW's L0 without a text tower or a trained
    head): W_c = the mean embedding of class c, the sample itself left out of its own class's mean (a class with
    one sample keeps it); L_i = cross-entropy of the margin logits (losses.classifier_logits) of cos(e_i, W_c).
    emb (N, D); labels (N,) in 0..C-1. Returns (N,)."""
    from ..losses import classifier_logits
    emb = F.normalize(emb.float(), dim=-1)
    labels = torch.as_tensor(labels, device=emb.device).long()
    n_classes = int(labels.max()) + 1
    sums = torch.zeros(n_classes, emb.shape[1], device=emb.device).index_add_(0, labels, emb)
    counts = torch.bincount(labels, minlength=n_classes)
    cos = emb @ F.normalize(sums, dim=-1).T
    own = sums[labels] - emb * (counts[labels] > 1)[:, None]   # leave-one-out mean of the sample's class
    cos = cos.scatter(1, labels[:, None], (emb * F.normalize(own, dim=-1)).sum(-1, keepdim=True))
    return F.cross_entropy(classifier_logits(cos, labels, loss, margin, scale), labels, reduction="none")


def flow_weights(losses: Tensor, strength: float) -> Tensor:
    """FLOW's sample weights (Sanyal et al., "Upweighting Easy Samples in Fine-Tuning Mitigates Forgetting", ICML
    2025): w_i = exp(-L0_i / tau) / mean_j exp(-L0_j / tau) with strength = 1/tau (0: every weight 1), normalised to
    mean 1 over the training set. losses (N,): the pretrained model's per-sample losses L0."""
    return len(losses) * torch.softmax(-strength * losses.float(), dim=0)


# ---------------------------------------------------------------------------- step rules
@torch.no_grad()
def spd_(params: list[Tensor], before: list[Tensor], grads: list[Tensor], theta0: list[Tensor],
         strength: float) -> list[bool]:
    """Selective projection decay after an optimiser step (module docstring): params hold theta~ and are changed in
    place; before = theta at the start of the step, grads = the step's gradient. Returns, per tensor, whether it
    was projected (c_T < 0)."""
    hit = []
    for p, b, g, t0 in zip(params, before, grads, theta0):
        c = -(g * (b - t0)).sum()
        if c < 0:
            new_norm = (p - t0).norm()
            ratio = ((new_norm - (b - t0).norm()) / new_norm).clamp(0.0, 1.0) if new_norm > 0 else new_norm * 0
            p.sub_(strength * ratio * (p - t0))
        hit.append(bool(c < 0))
    return hit


@torch.no_grad()
def project_(params: list[Tensor], theta0: list[Tensor], radii: list[float]) -> None:
    """Project each tensor into the ball of radius gamma_T around its pretrained value (in place)."""
    for p, t0, r in zip(params, theta0, radii):
        d = p - t0
        n = float(d.norm())
        if n > r:
            p.copy_(t0 + d * (r / n))


def top_fraction_mask(scores: list[Tensor], fraction: float) -> list[Tensor]:
    """Boolean masks shaped like `scores` that select exactly round(fraction x all entries) (at least 1) entries with
    the largest score over all tensors together (ties: the first in order). The sparse-update set of SAFT."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    flat = torch.cat([s.detach().flatten().float() for s in scores])
    k = max(1, int(round(fraction * flat.numel())))
    keep = torch.zeros(flat.numel(), dtype=torch.bool)
    keep[torch.topk(flat, k, sorted=False).indices] = True
    out, i = [], 0
    for s in scores:
        out.append(keep[i:i + s.numel()].view(s.shape).to(s.device))
        i += s.numel()
    return out


def beta_weight(k: int, steps: int, alpha: float = 0.5, beta: float = 0.5) -> float:
    """CLIPood's BMA weight (Shu et al., "CLIPood: Generalizing CLIP to Out-of-Distributions", ICML 2023) of the
    weights after k of `steps` target steps: the Beta(alpha, beta) density at u = (k + 0.5) / (steps + 1),
    u^(alpha-1) (1-u)^(beta-1) / B(alpha, beta) (the 0.5 keeps u inside (0, 1), where the density is finite).
    alpha = beta = 0.5 (CLIPood's default) weighs the start (the pretrained weights) and the end most."""
    u = (k + 0.5) / (steps + 1)
    log_b = math.lgamma(alpha) + math.lgamma(beta) - math.lgamma(alpha + beta)
    return math.exp((alpha - 1) * math.log(u) + (beta - 1) * math.log1p(-u) - log_b)


class WeightAverage:
    """An average of the tower's weights along training, starting at the pretrained weights: kind "ema"
    (a_t = (1 - 1/tau) a_{t-1} + (1/tau) theta_t after every step), "uniform" (ZSCL's weight ensemble: the mean of
    theta0 and of the weights after every k-th step) or "bma" (CLIPood's Beta moving average: theta0 with weight
    beta_weight(0) and the weights after every update with beta_weight(k), k = target steps done, over `steps`;
    a_t = a_{t-1} + (w_t / S_t) (theta_t - a_{t-1}), S_t = S_{t-1} + w_t, i.e. a = sum_t w_t theta_t / sum_t w_t).
    share=True: the average lives in the given tensors themselves (a teacher module's parameters), not in copies."""

    def __init__(self, kind: Literal["ema", "uniform", "bma"], theta0: list[Tensor], tau: float = 50.0,
                 every: int = 10, steps: int = 1, alpha: float = 0.5, beta: float = 0.5, share: bool = False):
        if kind not in ("ema", "uniform", "bma"):
            raise ValueError(f"weight averaging must be 'ema', 'uniform' or 'bma', got {kind!r}")
        if kind == "ema" and tau < 1:
            raise ValueError(f"the EMA's time constant tau must be >= 1 step, got {tau}")
        self.kind, self.tau, self.every = kind, float(tau), int(every)
        self.steps, self.alpha, self.beta = int(steps), float(alpha), float(beta)
        self.avg = [t.detach() if share else t.detach().clone() for t in theta0]
        self.count = 1  # theta0 is in the average
        self.total = beta_weight(0, self.steps, self.alpha, self.beta) if kind == "bma" else 1.0

    @torch.no_grad()
    def update(self, params: list[Tensor], step: int) -> None:
        """After optimiser step `step` (1-based; kind "bma": the target steps done, the position in the schedule)."""
        if self.kind == "ema":
            for a, p in zip(self.avg, params):
                a.lerp_(p.detach(), 1.0 / self.tau)
        elif self.kind == "bma":
            w = beta_weight(step, self.steps, self.alpha, self.beta)
            self.count += 1
            self.total += w
            for a, p in zip(self.avg, params):
                a.lerp_(p.detach(), w / self.total)
        elif step % self.every == 0:
            self.count += 1
            for a, p in zip(self.avg, params):
                a.add_((p.detach() - a) / self.count)

    def state_dict(self) -> dict:
        extra = {"total": self.total} if self.kind == "bma" else {}
        return {"avg": [a.clone() for a in self.avg], "count": self.count, **extra}

    def load_state_dict(self, state: dict) -> None:
        for a, b in zip(self.avg, state["avg"]):
            a.copy_(b)
        self.count = int(state["count"])
        self.total = float(state.get("total", self.total))


def adaptive_generic_share(target_losses: list[float], generic_losses: list[float], first: tuple[float, float],
                           previous: float, ema: float = 0.0, low: float = 0.1, high: float = 0.9) -> float:
    """The adaptive domain sampler's probability of a generic batch for the next window: the kit's variant of the
    official code's dynamic sampler (whose own rule, raw classifier losses without clipping, is sampler
    "adaptive_official", `sampling.official_weights`; docs/method.md section 4). Each domain's mean loss over the
    last window relative to its first window's, r_d = mean(L_d) / L_d(first);  p = r_g / (r_t + r_g), smoothed
    p <- ema p_prev + (1 - ema) p, clipped to [low, high]. A domain whose loss has fallen less gets more batches."""
    if not target_losses or not generic_losses:
        return previous
    r_t = float(np.mean(target_losses)) / max(first[0], 1e-12)
    r_g = float(np.mean(generic_losses)) / max(first[1], 1e-12)
    p = r_g / (r_t + r_g) if r_t + r_g > 0 else 0.5
    p = ema * previous + (1 - ema) * p
    return float(min(high, max(low, p)))
