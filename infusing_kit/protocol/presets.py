"""The methods the kit compares, one table: `PRESETS` (name -> `Preset`). `python -m infusing_kit presets` lists them.

A preset is a `TrainConfig` on the naive schedule (same target steps, same data, same learning rates unless its
search says otherwise) plus what the protocol needs around it: the ranges its search explores on validation, an
optional post-hoc step (`posthoc.METHODS`), which family it belongs to (one colour and marker per family in every
figure, figures.STYLE), and, for ablations, which other preset's chosen strengths it starts from. Whether it uses
the frozen text tower follows from its terms (`terms.uses_text`).

Strengths (and learning rates) are chosen on validation by `python -m infusing_kit compare` (README, "The
comparison"); the values below are the choices of the near world's current comparison (`CHOSEN_FILE`, at full
precision; tests/test_results.py checks them against it and against the comparison's registry). The SMOKE schedule
keeps its own, hand-set values (`smoke=`): it only checks that the pipeline runs and each phenomenon's direction.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

from ..metrics import FINE, MEAN
from ..methods.terms import uses_text
from ..trainconfig import TrainConfig

FAMILIES = ("baseline", "weight space", "function space", "data", "optimisation", "step rule", "post hoc")


@dataclass(frozen=True)
class Preset:
    description: str
    train: TrainConfig
    smoke_train: TrainConfig
    search: tuple = ()                # (field, low, high, log) ranges that `search` explores on validation
    post_hoc: str | None = None       # a posthoc.METHODS row applied after training, chosen on validation
    family: str = "baseline"
    ablation_of: str | None = None    # takes that preset's chosen settings, then `ablation` on top (no search)
    ablation: dict = field(default_factory=dict)
    ingredients: str | None = None    # post hoc on several runs: "seeds" (another fine-tuning seed) or "lrs" (soup)

    @property
    def wise_ft(self) -> bool:
        return self.post_hoc == "wise_ft"

    @property
    def text(self) -> bool:
        """Uses the frozen text tower in training (a text-using reference row)."""
        return uses_text(self.train)


# The naive schedule: learning rates chosen on fine-grained validation by `compare` (stage 1) and the length at which
# naive's validation curves flatten (stage 2). The SMOKE schedule keeps its own, hand-set rates: it only checks
# that the pipeline runs and the direction of each phenomenon shows.
NAIVE = TrainConfig(steps=325, batch_size=64, lr_backbone=0.0006009027435481118, lr_head=0.07306471155428777,
                    eval_every=25, select=FINE, ckpt_every=100, augment="none")
SMOKE_NAIVE = replace(NAIVE, steps=150, batch_size=64, lr_backbone=5e-4, lr_head=1e-2, eval_every=25, ckpt_every=50)
LR_SPACE = (("lr_backbone", 1e-5, 1e-2, True),)


def _method(description: str, family: str, search: tuple = (), smoke: dict | None = None, **changes) -> Preset:
    """A regularized method: the naive schedule plus `changes`; its checkpoint is kept by the mean of fine-grained
    and generic validation mAP@20 (docs/method.md, "Protocol"). `smoke`: changes for the SMOKE schedule only.
    Keywords of Preset (post_hoc, ablation_of, ablation, ingredients) pass through."""
    own = {k: changes.pop(k) for k in ("post_hoc", "ablation_of", "ablation", "ingredients") if k in changes}
    changes = {"select": MEAN, **changes, **own.get("ablation", {})}  # an ablation runs as the comparison runs it
    return Preset(description, replace(NAIVE, **changes), replace(SMOKE_NAIVE, **{**changes, **(smoke or {})}),
                  search, family=family, **own)


PRESETS: dict[str, Preset] = {
    # --- the baseline and its controls
    "toy-naive": Preset("image tower fine-tuned on the fine-grained domain, no regularizer; checkpoint chosen on "
                        "fine-grained validation only", NAIVE, SMOKE_NAIVE,
                        search=LR_SPACE + (("lr_head", 1e-4, 1e-1, True),)),
    "toy-naive-long": Preset("naive fine-tuning with twice the target steps: as many backbone updates as a "
                             "round-robin method (is it only the number of updates?)",
                             replace(NAIVE, steps=2 * NAIVE.steps), replace(SMOKE_NAIVE, steps=2 * SMOKE_NAIVE.steps)),
    # --- the paper's combination and its ablations
    "toy-paper": _method("the paper's combination: L2-SP (per-tensor mean) + embedding distillation on generic "
                         "batches, round robin, NormFace classifier on target batches", "function space",
                         l2sp=6.226006622329039, distill=67.01696643509307, sampler="round_robin",
                         smoke=dict(l2sp=20.5, distill=18.2),
                         search=(("l2sp", 0.1, 1e4, True), ("distill", 0.1, 1e3, True))),
    "toy-paper-no-l2sp": _method("ablation: the combination's chosen distillation without its L2-SP (l2sp = 0)",
                                 "function space", distill=67.01696643509307, sampler="round_robin",
                                 smoke=dict(distill=18.2),
                                 ablation_of="toy-paper", ablation={"l2sp": 0.0}),
    "toy-paper-select-fine": _method("ablation: the combination with its checkpoint kept on fine-grained validation "
                                     "only (the official code's in-domain switch)", "function space",
                                     l2sp=6.226006622329039, distill=67.01696643509307, sampler="round_robin",
                                     smoke=dict(l2sp=20.5, distill=18.2),
                                     ablation_of="toy-paper", ablation={"select": FINE}),
    # --- weight space
    "toy-l2sp": _method("L2-SP to the pretrained weights, per-tensor mean (the paper's form)", "weight space",
                        l2sp=213.80855262494447, smoke=dict(l2sp=258.0), search=(("l2sp", 0.1, 1e5, True),)),
    "toy-l2sp-sum": _method("L2-SP, classic summed form 1/2||theta - theta0||^2 (Li et al. 2018)", "weight space",
                            l2sp=0.01674941440600089, smoke=dict(l2sp=0.0155), l2sp_form="sum",
                            search=(("l2sp", 1e-4, 1e3, True),)),
    "toy-ewc": _method("EWC with a diagonal Fisher of the zero-shot classifier on generic data", "weight space",
                       ewc=89.93042883742748, smoke=dict(ewc=1.86e4), search=(("ewc", 0.1, 1e8, True),)),
    "toy-l2-zero": _method("plain L2 to zero (control: pulls towards 0, not towards what the model knew)",
                           "weight space", l2_zero=5.874864718600675e-05, smoke=dict(l2_zero=0.00159),
                           search=(("l2_zero", 1e-5, 10.0, True),)),
    # --- step rules (around the optimiser's step)
    "toy-spd": _method("SPD: selective projection decay towards the pretrained weights, only for tensors whose step "
                       "would gain from it (Tian et al. 2024, AdamSPD)", "step rule", spd=1.9188062722588084,
                       smoke=dict(spd=1.7),
                       search=(("spd", 1e-3, 2.0, True),)),
    "toy-tpgm": _method("projected fine-tuning: each tensor kept within a ball around its pretrained value, radius a "
                        "fraction of its norm (TPGM/FTP; one relative radius chosen on validation)", "step rule",
                        tpgm=0.05943263411791685, smoke=dict(tpgm=0.0774), search=(("tpgm", 1e-3, 1.0, True),)),
    "toy-sparse": _method("sparse update: only the fraction of the tower's entries with the largest gradient at the "
                          "start ever changes (SAFT)", "step rule", sparse=0.19683674161439343,
                          smoke=dict(sparse=0.01), search=(("sparse", 1e-4, 0.5, True),)),
    "toy-ema": _method("an EMA of the weights along training is validated and kept (time constant chosen on "
                       "validation)", "step rule", average="ema", average_tau=206.7139179563677,
                       smoke=dict(average_tau=50.0),
                       search=(("average_tau", 2.0, 2000.0, True),)),
    "toy-weight-avg": _method("ZSCL's weight ensemble: the mean of the pretrained weights and the weights every k "
                              "steps is validated and kept", "step rule", average="uniform", average_every=38,
                              smoke=dict(average_every=10),
                              search=(("average_every", 1, 150, False),)),
    # --- function space (generic batches)
    "toy-distill": _method("embedding distillation (MSE) to the pretrained model on generic batches, round robin",
                           "function space", distill=38.1850100403239, sampler="round_robin", smoke=dict(distill=19.1),
                           search=(("distill", 0.1, 1e3, True),)),
    "toy-distill-lr": _method("ablation: embedding distillation with its backbone learning rate searched too",
                              "function space", distill=117.34888299916999, sampler="round_robin",
                              smoke=dict(distill=19.1, lr_backbone=0.000526),
                              lr_backbone=0.00044432916017015473, search=(("distill", 0.1, 1e3, True),) + LR_SPACE),
    "toy-distill-cos": _method("embedding distillation (cosine) on generic batches, round robin", "function space",
                               distill=3.185396979654457, smoke=dict(distill=3.11), distill_kind="cosine",
                               sampler="round_robin",
                               search=(("distill", 0.01, 1e3, True),)),
    "toy-relational": _method("relational (Gram-matrix) distillation on generic batches, round robin",
                              "function space", relational=10.727411673051412, smoke=dict(relational=13.3),
                              sampler="round_robin",
                              search=(("relational", 0.1, 1e4, True),)),
    "toy-ldifs": _method("LDIFS: every block's features kept near the frozen model's on generic batches, round robin "
                         "(Mukhoti et al. 2023)", "function space", ldifs=24.128167078388856, smoke=dict(ldifs=10.0),
                         sampler="round_robin",
                         search=(("ldifs", 0.01, 1e4, True),)),
    "toy-lwf": _method("LwF: KL to the pretrained zero-shot logits of the generic classes, round robin (uses the text "
                       "tower)", "function space", lwf=0.03482800432582163, smoke=dict(lwf=1.33),
                       sampler="round_robin", search=(("lwf", 0.01, 100.0, True),)),
    "toy-lipsum": _method("Lipsum-FT: the image embeddings' inner products with random-token texts of the frozen text "
                          "tower kept on target batches (Nam et al. 2024; uses the text tower)", "function space",
                          lipsum=2.7327124588318883, smoke=dict(lipsum=10.0), search=(("lipsum", 0.01, 1e4, True),)),
    "toy-tracer": _method("distillation (MSE) on generic batches to a Beta moving average of the fine-tuning "
                          "trajectory's weights instead of the frozen pretrained model (TRACER's teacher, 2026; "
                          "CLIPood's BMA, Shu et al. 2023, alpha = beta = 0.5), round robin", "function space",
                          tracer=228.12275657632787, smoke=dict(tracer=38.1850100403239), sampler="round_robin",
                          search=(("tracer", 0.1, 1e3, True),)),
    "toy-dive-avl": _method("DiVE's average vector loss on generic batches: the difference vectors (fine-tuned minus "
                            "pretrained embedding) kept equal to their batch mean, so the embeddings' geometry is kept "
                            "(Suzuki et al. 2026, image side), round robin", "function space",
                            avl=0.17849397803521533, smoke=dict(avl=1.0),
                            sampler="round_robin", search=(("avl", 0.01, 1e3, True),)),
    # --- data mixing
    "toy-mix-balanced": _method("embedding distillation with the balanced sampler (generic with probability 1/2)",
                                "data", distill=228.12275657632787, smoke=dict(distill=19.1), sampler="balanced",
                                search=(("distill", 0.1, 1e3, True),)),
    "toy-mix-proportional": _method("embedding distillation with the size-proportional sampler", "data",
                                    distill=88.1911893166253, smoke=dict(distill=19.1),
                                    sampler="proportional", search=(("distill", 0.1, 1e3, True),)),
    "toy-mix-adaptive": _method("embedding distillation with the adaptive domain sampler: the domains re-weighted from "
                                "their training losses every 25 target steps (after the official code)", "data",
                                distill=139.034477529343, smoke=dict(distill=19.1), sampler="adaptive",
                                search=(("distill", 0.1, 1e3, True),)),
    "toy-flow": _method("FLOW: the target cross-entropy reweighted per sample by exp(-L0/tau), L0 the pretrained "
                        "tower's loss under a class-mean head, mean weight 1 (Sanyal et al. 2025; strength 1/tau "
                        "chosen on validation)", "data", flow=0.8503936530108309, smoke=dict(flow=1.0),
                        search=(("flow", 0.01, 10.0, True),)),
    # --- optimisation side
    "toy-low-lr": _method("naive fine-tuning with its backbone learning rate chosen on the mean of fine-grained and "
                          "generic validation (the retention-aware choice)", "optimisation",
                          lr_backbone=9.657402177523896e-05, smoke=dict(lr_backbone=1.64e-4),
                          search=LR_SPACE),
    "toy-lp-ft": _method("LP-FT: the head is trained alone for the first target steps (how many: chosen on "
                         "validation)", "optimisation", lp_ft_steps=162, smoke=dict(lp_ft_steps=100),
                         search=(("lp_ft_steps", 0, 1000, False),)),
    "toy-freeze": _method("the patch embedding and the first blocks frozen (how many: chosen on validation)",
                          "optimisation", freeze_blocks=1, smoke=dict(freeze_blocks=3),
                          search=(("freeze_blocks", 0, 4, False),)),
    "toy-lora": _method("LoRA: rank-4 factors on the attention and MLP weights train, the pretrained weights stay "
                        "frozen (Hu et al. 2021)", "optimisation", lora_rank=4, lr_backbone=0.002086982784175053,
                        smoke=dict(lr_backbone=5e-3),
                        search=(("lr_backbone", 1e-4, 1e-1, True),)),
    # --- post hoc (on naive's runs: no training of their own in a comparison)
    "toy-wise-ft": _method("WiSE-FT: naive fine-tuning, then weights interpolated towards the pretrained ones "
                           "(alpha chosen on validation)", "post hoc", post_hoc="wise_ft", select=FINE),
    "toy-lines": _method("LiNeS: naive's fine-tuning residual scaled by depth (alpha, beta chosen on validation)",
                         "post hoc", post_hoc="lines", select=FINE),
    "toy-model-stock": _method("Model Stock: two fine-tuning seeds of naive merged towards the pretrained weights, "
                               "per tensor, or their plain average (chosen on validation)", "post hoc",
                               post_hoc="model_stock", ingredients="seeds", select=FINE),
    "toy-soup-uniform": _method("uniform soup: the mean of naive runs with the search's best learning rates "
                                "(Wortsman et al. 2022)", "post hoc", post_hoc="soup_uniform", ingredients="lrs",
                                select=FINE),
    "toy-soup-greedy": _method("greedy soup: naive runs with the search's best learning rates added while "
                               "validation improves", "post hoc", post_hoc="soup_greedy", ingredients="lrs",
                               select=FINE),
}
# Every searched preset holds its choice in the near world's current comparison, at full precision, so that
# `experiment --preset NAME --seed S` retrains that comparison's row of seed S (tests/test_results.py checks both).
CHOSEN_FILE = "toy-chosen-near-cpu-v4b.json"
NOT_IN_THE_TABLE = {  # methods a reviewer expects that have no row, and why
    "FLYP": "contrastive fine-tuning against class-name prompts needs class names; the built-in fine-grained classes "
            "have none (their captions name the shape and colour family shared by 8 classes). `lipsum` and `lwf` are "
            "the text-using rows.",
}
SMOKE_WORLD = dict(generic_train=1000, generic_val_combos=40, generic_test_combos=60, text_pairs=150,
                   fine_train_classes=150, fine_val_classes=30, fine_test_classes=64, fine_per_class=8)


def ingredient_overrides(kind: str | None, cfg, lrs: list[dict] | None = None) -> list[dict]:
    """The other runs a merge of several runs needs besides its own (their TrainConfig changes), by its
    ingredients (`Preset.ingredients`, `Setup.ingredients`). "seeds": one more fine-tuning seed (seed + 1000).
    "lrs": the same training with other learning rates (`lrs`, e.g. the search's next best; by default half and
    twice the backbone rate). None: no other run."""
    if kind == "seeds":
        return [{"seed": cfg.seed + 1000}]
    if kind == "lrs":
        return lrs if lrs is not None else [{"lr_backbone": cfg.lr_backbone * f} for f in (0.5, 2.0)]
    return []
