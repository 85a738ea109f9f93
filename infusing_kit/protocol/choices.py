"""What a finished study chose (`summary`): the mean rule's trial, the constraint rule's (`spaces.constrained_choice`),
what was explored, whether the range still sits at an edge, and whether the study can tell its settings apart at
all (`flat`) or beat the baseline beyond the seed noise (`no_gain`). search.py's docstring says how the trials were
placed.
"""
from __future__ import annotations

from pathlib import Path

from .spaces import constrained_choice, extend_space, is_flat
from .storage import open_storage


def summary(name: str, storage: str | Path, n_blocks: int | None = None, steps: int | None = None,
            noise: float = 0.0, constraint: tuple | None = None, inert: float | None = None) -> dict:
    """The chosen trial of a study (mean rule; and the constraint rule's, given `constraint`), what was explored,
    whether the study is flat within the seed noise, and (given `inert`, the baseline's score on the study's
    selection key) whether its best beats the range's inert end by more than twice the noise."""
    import optuna
    study = optuna.load_study(study_name=name, storage=open_storage(storage))
    finished = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not finished:
        raise RuntimeError(f"study {name} in {storage} has no finished trial yet")
    best = study.best_trial
    space = [tuple(s) for s in study.user_attrs["space"]]
    steps = steps or best.user_attrs.get("train", {}).get("steps", 1)
    _, grown, stuck = extend_space(space, [t.params for t in finished], best.params, steps, n_blocks,
                                   [t.value for t in finished], noise)
    all_params = [t.params for t in study.trials if t.state in (optuna.trial.TrialState.COMPLETE,
                                                                optuna.trial.TrialState.PRUNED)]
    method = study.user_attrs.get("method", name.rsplit("-seed", 1)[0].removesuffix("-smoke"))
    return {"study": name, "method": method, "preset": method, "params": best.params,
            "value": best.value, "trials": len(all_params), "complete": len(finished),
            "distinct": {f: len({round(p[f], 12) for p in all_params if f in p}) for f, *_ in space},
            "val": {k: v for k, v in best.user_attrs.items() if k not in ("train", "updates", "design", "identity", "worker")},
            "space": [list(s) for s in space], "extensions": study.user_attrs.get("extensions", []),
            "at_edge": [g.split(":")[0] for g in grown], "at_hard_limit": stuck,
            "base": study.user_attrs.get("base", {}), "noise": noise,
            "flat": is_flat([t.value for t in finished], noise),
            "inert": inert, "no_gain": None if inert is None or noise <= 0 else bool(best.value - inert <= 2 * noise),
            "codes": sorted({str(t.user_attrs.get("code")) for t in finished}),
            "spread": float(max(t.value for t in finished) - min(t.value for t in finished)),
            "constraint": _constraint_summary(finished, constraint)}


def _constraint_summary(finished, constraint: tuple | None) -> dict | None:
    if constraint is None:
        return None
    fine, generic, threshold = constraint
    rows = [{"trial": t.number, "params": t.params, "val": t.user_attrs} for t in finished]
    best = constrained_choice(rows, fine, generic, threshold)
    out = {"rule": f"max {generic} subject to {fine} >= {threshold:.4f}", "threshold": threshold}
    if best is None:
        return {**out, "params": None, "trial": None, "val": None}
    return {**out, "params": best["params"], "trial": best["trial"],
            "val": {k: v for k, v in best["val"].items() if k not in ("train", "updates", "design", "identity", "worker")}}
