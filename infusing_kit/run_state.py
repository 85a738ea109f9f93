"""The state of one training run besides the weights: counters, history, the kept (best) checkpoint, weight
averages, the adaptive sampler's window, and the files they live in (`checkpoints.RunFolder`). train() owns one
`RunState`; what hooks see after a step is a `TrainState` and what train() returns a `TrainResult`.
"""
from __future__ import annotations

import contextlib
import copy
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from . import distributed
from .checkpoints import RunFolder
from .models import VLM, train_mode
from .methods.regularizers import Quadratic, WeightAverage, adaptive_generic_share
from .datasets.sampling import AdaptiveState, OfficialAdaptive
from .methods.terms import StepRule
from .trainconfig import TrainConfig


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
    inputs: dict = field(default_factory=dict)        # every input the terms need (inputs.INPUTS rows), made ready


class RunState:
    """The state of one training run: counters, history, the best checkpoint, averages, and their files."""

    def __init__(self, folder: RunFolder, cfg: TrainConfig, vlm: VLM, head, opt, ckpt: dict | None, identity: dict,
                 anchors: Anchors):
        self.folder, self.cfg, self.vlm, self.head, self.opt, self.identity = folder, cfg, vlm, head, opt, identity
        self.anchors = anchors
        self.step = self.target_step = 0
        self.history: list[dict] = []
        self.best = {"score": None, "step": None, "state": None}
        self.start_score = None  # the pretrained model's validation score on cfg.select
        self.params_frozen = None  # whether the backbone is frozen now (LP-FT's head-only steps)
        self.pending: list[tuple[int, torch.Tensor]] = []  # losses not yet checked (avoids a sync per step)
        self.last_losses: dict[str, float] = {}
        self.average = WeightAverage(cfg.average, anchors.theta0, cfg.average_tau, cfg.average_every) \
            if cfg.average != "none" else None
        self.adaptive = AdaptiveState() if cfg.sampler == "adaptive" else None
        self.official = OfficialAdaptive(cfg.adaptive_every, cfg.adaptive_ema) \
            if cfg.sampler == "adaptive_official" else None  # the official code's rule (sampling.OfficialAdaptive)
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
            for rule, state in zip(anchors.steps, ckpt.get("step_rules", ())):
                if state is not None:  # a step rule's own state (TRACER's averaged teacher)
                    rule.load_state_dict(state)
            if self.adaptive is not None:
                self.adaptive.p_generic, self.adaptive.target_done = ckpt["adaptive"]["p"], self.target_step
                self.window = ckpt["adaptive"]["window"]
            if self.official is not None:
                self.official.load_state_dict(ckpt["adaptive_official"]["state"])
                self.official.target_done = self.target_step
                self.window = ckpt["adaptive_official"]["window"]
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
        if not frozen:
            for rule in self.anchors.steps:
                rule.advance(self.anchors.params, self.step, self.target_step)
        if self.adaptive is not None:
            self._adapt(domain, terms, frozen)
        if self.official is not None:
            self._observe_official(domain, terms, frozen)
        if is_log:
            self.check_finite()
            values = distributed.mean_over_ranks(torch.stack([v.detach().float() for v in terms.values()]))
            terms_now = dict(zip(terms, values.tolist()))  # the global batch's losses, under torchrun too
            record = {"step": self.step, "target_step": self.target_step, "domain": ("target", "generic")[domain],
                      "loss": float(sum(terms_now.values())), **terms_now}
            if self.adaptive is not None:
                record["p_generic"] = self.adaptive.p_generic
            if self.official is not None:
                record["p_generic"] = self.official.weights[1]
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

    def _observe_official(self, domain: int, terms: dict, frozen: bool) -> None:
        """adaptive_official: the step's raw classifier loss (the ce term over its weight; a generic batch has
        none) goes to the sampler's block window; the batch counts as for the adaptive sampler."""
        w, name = self.window, ("target", "generic")[domain]
        w["n"][name] += 1
        w["n"]["backbone"] += not frozen
        ce = float(terms["ce"].detach()) / self.cfg.ce_weight if "ce" in terms else None
        self.official.observe(domain, ce)

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
        rules = [rule.state_dict() for rule in self.anchors.steps]
        if any(r is not None for r in rules):
            extra["step_rules"] = rules
        if self.adaptive is not None:
            extra["adaptive"] = {"p": self.adaptive.p_generic, "window": self.window}
        if self.official is not None:
            extra["adaptive_official"] = {"state": self.official.state_dict(), "window": self.window}
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
