"""The regularizers, one table: `TERMS`. Each row is one `TrainConfig` weight field and what it needs.

A row says where the term acts (`on`), which inputs train() must be given for it (`needs`, rows of
`inputs.INPUTS`) and its pure function from regularizers.py:
- "target": a loss on target batches, added to the cross-entropy: `loss(batch)`;
- "generic": a loss on generic batches (the only losses there): `loss(batch)`; `features="blocks"` asks the forward
  pass for every block's features too (student and frozen teacher);
- "weights": a quadratic 1/2 sum w (theta - c)^2 over the tower (`weights(named_params, cfg, inputs)` per tensor,
  centred on the pretrained weights or on 0), applied at every step as an analytic gradient;
- "step": a rule applied around each optimiser step (`step(cfg, anchors, inputs)` -> a `StepRule`);
- "samples": per-sample weights of the target cross-entropy, `sample_weights(cfg, anchors, idx)` -> (B,) (the loss
  becomes mean_b w_b CE_b).
A row of another kind may carry a `step` too: a `StepRule` that keeps a state along training (TRACER's averaged
teacher). `text=True` marks a term that uses the frozen text tower (a text-using reference, not the paper's
image-only premise).

A new regularizer with existing inputs is: its pure function (regularizers.py), its TrainConfig field, one row here,
a preset (presets.py) and a test. A new input is one row of `inputs.INPUTS`. Every weight field must be >= 0
(0 switches the term off): TrainConfig checks that from this table.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

import torch

from .regularizers import (average_vector_loss, embedding_distillation, flow_weights, ldifs, lipsum, lwf_distillation,
                           project_, quadratic_weights, relational_distillation, spd_, top_fraction_mask)


@dataclass
class TermBatch:
    """What a target or generic term sees of one batch: L2-normalised embeddings of the student (B, D, with grad) and
    of the frozen pretrained model (B, D); block features (lists of (B, tokens, width)) when the term asks for them;
    the batch's uint8 images (for a teacher of the term's own)."""
    student: torch.Tensor
    teacher: torch.Tensor | None
    cfg: object
    anchors: object
    generator: torch.Generator | None = None
    student_blocks: list | None = None
    teacher_blocks: list | None = None
    images: torch.Tensor | None = None


@dataclass(frozen=True)
class Term:
    name: str
    on: Literal["target", "generic", "weights", "step", "samples"]
    needs: tuple[str, ...] = ()
    loss: Callable | None = None
    weights: Callable | None = None
    centre: Literal["pretrained", "zero"] = "pretrained"
    step: Callable | None = None
    sample_weights: Callable | None = None
    features: Literal["embedding", "blocks"] = "embedding"
    text: bool = False
    cite: str = ""


class StepRule:
    """A rule around the optimiser's step: `before(params)` after backward (may change .grad), `after(params, prev)`
    after the step (may change the weights; prev = the weights before the step when `wants_prev`), `advance(params,
    step, target_step)` once the run's counters have moved past a backbone update. A rule with a state of its own
    returns it from `state_dict` (kept in last.pt; None: nothing to keep)."""
    wants_prev = False

    def before(self, params: list[torch.Tensor]) -> None:
        pass

    def after(self, params: list[torch.Tensor], prev: list[torch.Tensor] | None) -> None:
        pass

    def advance(self, params: list[torch.Tensor], step: int, target_step: int) -> None:
        pass

    def state_dict(self) -> dict | None:
        return None

    def load_state_dict(self, state: dict) -> None:
        pass


class SPD(StepRule):
    wants_prev = True

    def __init__(self, theta0: list[torch.Tensor], strength: float):
        self.theta0, self.strength = theta0, strength

    def after(self, params, prev):
        spd_(params, prev, [p.grad for p in params], self.theta0, self.strength)


class Projection(StepRule):
    def __init__(self, theta0: list[torch.Tensor], relative_radius: float):
        self.theta0 = theta0
        self.radii = [relative_radius * float(t.norm()) for t in theta0]

    def after(self, params, prev):
        project_(params, self.theta0, self.radii)


class SparseUpdate(StepRule):
    """Only the masked entries change: their gradient is kept (others zeroed, so the optimiser's state stays 0 there)
    and after the step every other entry is put back (undoing weight decay)."""

    def __init__(self, theta0: list[torch.Tensor], masks: list[torch.Tensor]):
        self.theta0, self.masks = theta0, masks

    def before(self, params):
        for p, m in zip(params, self.masks):
            if p.grad is not None:
                p.grad.mul_(m)

    @torch.no_grad()
    def after(self, params, prev):
        for p, t0, m in zip(params, self.theta0, self.masks):
            p.copy_(torch.where(m, p, t0))


class TrajectoryAverage(StepRule):
    """TRACER's teacher follows the trajectory: after every backbone update its Beta moving average
    (teacher.TrajectoryTeacher) takes the new weights, at the run's position in target steps."""

    def __init__(self, teacher):
        self.teacher = teacher

    def advance(self, params, step, target_step):
        self.teacher.average.update(params, target_step)

    def state_dict(self):
        return self.teacher.average.state_dict()

    def load_state_dict(self, state):
        self.teacher.average.load_state_dict(state)


def _sparse(cfg, anchors, inputs) -> StepRule:
    return SparseUpdate(anchors.theta0, top_fraction_mask(inputs["gradient_scores"], cfg.sparse))


def _flow(cfg, anchors, idx: torch.Tensor) -> torch.Tensor:
    """FLOW's weights of the batch's samples, normalised over the whole target training set (N softmax terms per
    step: negligible next to a forward pass)."""
    losses = anchors.inputs["pretrained_losses"]
    return flow_weights(losses, cfg.flow)[idx.to(losses.device)]


TERMS = (
    Term("l2sp", "weights", weights=lambda named, cfg, inp: quadratic_weights(named, f"l2sp_{cfg.l2sp_form}",
                                                                             cfg.l2sp_split_qkv),
         cite="Li et al. 2018; the paper's per-tensor mean"),
    Term("ewc", "weights", needs=("fisher",), weights=lambda named, cfg, inp: [inp["fisher"][n] for n in named],
         cite="Kirkpatrick et al. 2017"),
    Term("l2_zero", "weights", weights=lambda named, cfg, inp: quadratic_weights(named, "l2_zero"), centre="zero"),
    Term("distill", "generic", needs=("teacher",),
         loss=lambda b: embedding_distillation(b.student, b.teacher, b.cfg.distill_kind), cite="the paper's L_e"),
    Term("relational", "generic", needs=("teacher",), loss=lambda b: relational_distillation(b.student, b.teacher),
         cite="Park et al. 2019"),
    Term("lwf", "generic", needs=("teacher", "class_emb"), text=True, cite="Li & Hoiem 2016",
         loss=lambda b: lwf_distillation(b.anchors.inputs["class_emb"].logits(b.student),
                                         b.anchors.inputs["class_emb"].logits(b.teacher), b.cfg.lwf_temperature)),
    Term("ldifs", "generic", needs=("live_teacher",), features="blocks",
         loss=lambda b: ldifs(b.student_blocks, b.teacher_blocks), cite="Mukhoti et al. 2023"),
    Term("lipsum", "target", needs=("target_teacher", "random_texts"), text=True, cite="Nam et al. 2024",
         loss=lambda b: lipsum(b.student, b.teacher, _texts_for_step(b))),
    Term("tracer", "generic", needs=("bma_teacher",), cite="TRACER 2026's teacher; CLIPood's BMA (Shu et al. 2023)",
         loss=lambda b: embedding_distillation(b.student, b.anchors.inputs["bma_teacher"].embed(b.images),
                                               b.cfg.distill_kind),
         step=lambda cfg, a, inp: TrajectoryAverage(inp["bma_teacher"])),
    Term("avl", "generic", needs=("teacher",), loss=lambda b: average_vector_loss(b.student, b.teacher),
         cite="Suzuki et al. 2026 (DiVE's AVL, image side, batch mean)"),
    Term("flow", "samples", needs=("pretrained_losses",), cite="Sanyal et al. 2025 (FLOW)",
         sample_weights=_flow),
    Term("spd", "step", step=lambda cfg, a, inp: SPD(a.theta0, cfg.spd), cite="Tian et al. 2024"),
    Term("tpgm", "step", step=lambda cfg, a, inp: Projection(a.theta0, cfg.tpgm), cite="Tian et al. 2023"),
    Term("sparse", "step", needs=("gradient_scores",), step=_sparse, cite="Nguyen et al. 2024 (SAFT)"),
)
TERMS_BY_NAME = {t.name: t for t in TERMS}


def _texts_for_step(b: TermBatch) -> torch.Tensor:
    """The random-token texts of this step: cfg.lipsum_texts rows of the bank, drawn from the step's generator."""
    bank = b.anchors.inputs["random_texts"]
    idx = torch.randperm(len(bank), generator=b.generator)[:b.cfg.lipsum_texts]
    return bank[idx.to(bank.device)]


def active(cfg, on: str | None = None) -> list[Term]:
    """The rows switched on in cfg (weight > 0), optionally only those acting `on`."""
    return [t for t in TERMS if getattr(cfg, t.name) > 0 and (on is None or t.on == on)]


def needed_inputs(cfg) -> set[str]:
    """The inputs.INPUTS rows train() needs for this config besides the data."""
    return {n for t in active(cfg) for n in t.needs}


def uses_text(cfg) -> bool:
    """Whether any switched-on term uses the frozen text tower."""
    return any(t.text for t in active(cfg))
