"""Hyper-parameter search on validation only (method.md section 5), with Optuna.

  python -m infusing_kit search --preset toy-paper --trials 8 --storage runs/search.db [--smoke] [--seed 0]

Each trial runs the preset with the sampled strengths (its `search` ranges) and returns the validation
score of its kept checkpoint: the mean of fine-grained and generic validation mAP@20. Test sets are never
evaluated in a trial. The study lives in an SQLite file, so an interrupted search resumes where it stopped
(trials already finished are kept; a trial that was running when the process died is marked failed and
re-run). `final_runs` then runs the chosen configuration once per seed with test evaluation, appending
to the results registry.
"""
from __future__ import annotations

from pathlib import Path

from .experiment import PRESETS, run_experiment

OBJECTIVE = "mean_map@20"


def _study(preset: str, storage: str | Path, smoke: bool, seed: int):
    import optuna
    storage = Path(storage)
    storage.parent.mkdir(parents=True, exist_ok=True)
    name = f"{preset}{'-smoke' if smoke else ''}-seed{seed}"
    study = optuna.create_study(study_name=name, storage=f"sqlite:///{storage}", direction="maximize",
                                load_if_exists=True)
    # a sampler seeded the same way on every resume would propose the same start-up points again: offset it
    study.sampler = optuna.samplers.TPESampler(seed=seed * 10_000 + len(study.trials))
    # a trial left RUNNING by a killed process would never finish: mark it failed so it is not counted
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        study._storage.set_trial_state_values(t._trial_id, optuna.trial.TrialState.FAIL)
    return study


def search(preset: str, trials: int, storage: str | Path, out_root: str | Path, smoke: bool = False, seed: int = 0,
           device: str = "cpu", progress: bool = False) -> dict:
    """Run trials until the study holds `trials` finished ones; returns the best trial's parameters and score."""
    import optuna
    space = PRESETS[preset].search
    if not space:
        raise ValueError(f"preset {preset!r} has no search space (it has no strength to choose)")
    study = _study(preset, storage, smoke, seed)

    def objective(trial: optuna.Trial) -> float:
        params = {}
        for field, low, high, log in space:
            if isinstance(low, int) and isinstance(high, int) and not log:
                params[field] = trial.suggest_int(field, low, high)
            else:
                params[field] = trial.suggest_float(field, low, high, log=log)
        out = Path(out_root) / study.study_name / f"trial{trial.number:03d}"
        m = run_experiment(preset, out, smoke=smoke, seed=seed, device=device, progress=progress,
                           overrides=params, test=False)
        for k, v in m["val"].items():
            trial.set_user_attr(k, v)
        return m["val"][OBJECTIVE]

    done = len([t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE])
    if done < trials:
        study.optimize(objective, n_trials=trials - done)
    best = study.best_trial
    return {"preset": preset, "params": best.params, "value": best.value, "trials": len(study.trials),
            "val": best.user_attrs}


def final_runs(preset: str, params: dict, seeds: list[int], out_root: str | Path, registry: str | Path,
               smoke: bool = False, device: str = "cpu", progress: bool = False) -> list[dict]:
    """The chosen configuration, once per seed, with test evaluation; one registry row each."""
    rows = []
    for s in seeds:
        out = Path(out_root) / f"{preset}{'-smoke' if smoke else ''}-s{s}"
        rows.append(run_experiment(preset, out, smoke=smoke, seed=s, device=device, progress=progress,
                                   overrides=params, registry=registry))
    return rows


def trial_rows(storage: str | Path) -> list[dict]:
    """Every finished trial of every study in an SQLite file, one row each: {"study", "method", "seed", "smoke",
    "trial", "params", "val"} (validation scores only; trials never see test data)."""
    import optuna
    url = f"sqlite:///{Path(storage)}"
    if not Path(storage).exists():
        raise FileNotFoundError(f"no Optuna storage at {storage}")
    rows = []
    for summary in optuna.get_all_study_summaries(url):
        study = optuna.load_study(study_name=summary.study_name, storage=url)
        name, _, seed = summary.study_name.rpartition("-seed")
        for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
            rows.append({"study": summary.study_name, "method": name.removesuffix("-smoke"), "seed": int(seed),
                         "smoke": name.endswith("-smoke"), "trial": t.number, "params": t.params,
                         "val": dict(t.user_attrs)})
    return rows

