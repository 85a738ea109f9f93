"""The measured cost of `python -m infusing_kit compare`, from a comparison folder's own records, and the predicted
wall time of a whole comparison from scratch.

  python benchmarks/bench_protocol.py DIR [--jobs 2] [--json FILE]

DIR: a comparison folder (`compare --out DIR`) or a state folder (results/in-progress/...): DIR/search.db (the
Optuna studies, one per searched method and seed), DIR/chosen.json (the finished stages) and, where present,
DIR/runs/{calibration,final,ingredients}/*/metrics.json (finished runs). Nothing is run or written (but --json).

Prints (markdown tables):
1. per trial kind (sampler family: target-only or generic batches (round robin, balanced, ...); EWC or not;
   complete or pruned): timed trials, median and IQR of a trial's wall seconds, seconds per backbone update;
2. per study: trials by state and by design (startup, TPE, extension, transition), the sum of its trials' wall
   seconds (one thread each: CPU-seconds) and its first-start-to-last-end span;
3. per stage (calibration, searches, final runs, ingredients, post-hoc rows): measured CPU-seconds, and for the
   searches the busy wall time (the union of the trials' intervals) and how many trials ran at once;
4. a prediction for a whole comparison from scratch with --jobs J workers (one thread each): per-kind costs
   (the median seconds of a complete and of a pruned trial give a fixed cost per run and a cost per target step),
   the observed pruned share, and the trials and runs the kit's protocol plans (`planned_counts`, from
   `Study.builtin()`: the one function to adapt when the protocol changes); wall = CPU-seconds / J (perfect
   packing; also shown at the folder's measured packing). Next to it the measured totals, and measured / predicted
   where the folder allows a comparison (the cost model on its timed trials, the trial counts of its finished
   studies, its runs per run).
Trials restored from a file (`storage.restore_trials`: start == end) and trials without an end (running, or left
running by a killed process) are not timed; the counts say how many. Per-trial wall seconds include whatever else
ran on the machine then; medians keep the estimate robust to such spikes, the IQR shows them.
"""
import argparse
import json
import re
import sys
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

POSTHOC_SECONDS = 5.0   # a post-hoc row's cost (merge + validation + test) where the folder has none measured
DESIGNS = ("startup", "tpe", "extension", "transition")
STATES = ("COMPLETE", "PRUNED", "FAIL", "RUNNING", "WAITING")


# ---------------------------------------------------------------------------- small helpers
def family(sampler: str) -> str:
    return "target-only" if sampler == "target_only" else "generic-batch"


def kind(sampler: str, ewc: float) -> str:
    return family(sampler) + (" +EWC" if ewc and ewc > 0 else "")


def stats(xs) -> dict:
    xs = [x for x in xs if x is not None]
    if not xs:
        return {"n": 0, "median": None, "q1": None, "q3": None}
    q1, med, q3 = np.percentile(xs, [25, 50, 75])
    return {"n": len(xs), "median": float(med), "q1": float(q1), "q3": float(q3)}


def union_seconds(intervals) -> float:
    """Length of the union of (start, end) intervals: the wall time during which at least one ran."""
    total, end = 0.0, None
    for a, b in sorted(intervals):
        if end is None or a > end:
            total += b - a
            end = b
        elif b > end:
            total += b - end
            end = b
    return total


def max_overlap(intervals) -> int:
    events = sorted([(a, 1) for a, _ in intervals] + [(b, -1) for _, b in intervals], key=lambda e: (e[0], e[1]))
    now = most = 0
    for _, d in events:
        now += d
        most = max(most, now)
    return most


def fmt(x, digits=1) -> str:
    return "—" if x is None else f"{x:,.{digits}f}"


def hours(s) -> str:
    return "—" if s is None else f"{s / 3600:.2f} h"


def table(headers, rows) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def ratio(a, b):
    return a / b if a is not None and b else None


# ---------------------------------------------------------------------------- reading the folder
def read_trials(db: Path) -> tuple[list[dict], list[dict]]:
    """The studies of an Optuna storage and every trial of them (one dict each; seconds None where not timed)."""
    import optuna

    from infusing_kit.protocol.storage import open_storage
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    store = open_storage(db)
    studies, trials = [], []
    for s in optuna.get_all_study_summaries(store):
        study = optuna.load_study(study_name=s.study_name, storage=store)
        a = study.user_attrs
        seed = int(a.get("seed", s.study_name.rpartition("-seed")[2] or 0))
        method = a.get("method", s.study_name.rpartition("-seed")[0])
        key = method if seed == 0 else f"{method}@search{seed}"  # chosen.json's key of the study's choice
        rec = {"study": s.study_name, "method": method, "seed": seed, "key": key, "d": len(a.get("space", [])),
               "states": Counter(), "designs": Counter(), "restored": 0, "untimed": 0}
        for t in study.get_trials(deepcopy=False):
            u, state = t.user_attrs, t.state.name
            design = u.get("design", "tpe")
            rec["states"][state] += 1
            rec["designs"][design] += 1
            start, end = t.datetime_start, t.datetime_complete
            seconds = (end - start).total_seconds() if start and end else None
            if seconds == 0:
                rec["restored"] += 1
                seconds = None
            elif seconds is None and state not in ("WAITING",):
                rec["untimed"] += 1   # running, or left running by a process that died
            train, updates = u.get("train") or {}, u.get("updates") or {}
            steps, backbone, pruned_at = train.get("steps"), updates.get("backbone"), u.get("pruned_at")
            if backbone is not None and pruned_at is not None and steps and updates.get("target", 0) >= steps:
                backbone = backbone * pruned_at / steps  # a record of the whole schedule's updates: scale it
            trials.append({"study": s.study_name, "key": rec["key"], "number": t.number, "state": state,
                           "design": design, "seconds": seconds, "steps": steps, "backbone": backbone,
                           "pruned_at": pruned_at,
                           "kind": kind(train.get("sampler", "target_only"), train.get("ewc", 0)) if train else None,
                           "interval": (start.timestamp(), end.timestamp()) if seconds is not None else None})
        studies.append(rec)
    return studies, trials


RUN_NAME = re.compile(r"^(?P<preset>.+?)(?P<what>-constraint|-search1)?-s(?P<seed>\d+)$")


def read_runs(runs: Path) -> list[dict]:
    """Finished runs (metrics.json) of the calibration, final and ingredients stages (runs/search holds trials)."""
    out = []
    for stage in ("calibration", "final", "ingredients"):
        for f in sorted((runs / stage).glob("*/metrics.json")):
            m = json.loads(f.read_text())
            tags, train = m.get("tags") or {}, m.get("train") or {}
            match = RUN_NAME.match(f.parent.name)
            what = (match.group("what") or "") if match else ""
            role = stage
            if stage == "final":
                role = "post-hoc" if m.get("post_hoc") else \
                    "constraint" if tags.get("rule") == "constraint" or what == "-constraint" else \
                    "search1" if tags.get("search_seed") == 1 or what == "-search1" else "final"
            out.append({"stage": stage, "role": role, "folder": f.parent.name, "preset": m.get("preset"),
                        "seed": m.get("seed"), "seconds": m.get("seconds"), "train_seconds": m.get("train_seconds"),
                        "steps": train.get("steps"), "threads": m.get("threads"),
                        "kind": kind(train.get("sampler", "target_only"), train.get("ewc", 0))})
    return out


# ---------------------------------------------------------------------------- 1-3: what was measured
def kind_rows(trials: list[dict]) -> list[dict]:
    groups = defaultdict(list)
    for t in trials:
        if t["seconds"] is not None and t["state"] in ("COMPLETE", "PRUNED") and t["kind"]:
            groups[(t["kind"], t["state"].lower())].append(t)
    rows = []
    for (k, state), ts in sorted(groups.items()):
        rows.append({"kind": k, "state": state, **stats([t["seconds"] for t in ts]),
                     "s_per_update": stats([t["seconds"] / t["backbone"] for t in ts if t["backbone"]])["median"],
                     "steps": stats([t["steps"] for t in ts])["median"]})
    return rows


def study_rows(studies: list[dict], trials: list[dict], chosen: dict) -> list[dict]:
    rows = []
    for s in studies:
        timed = [t for t in trials if t["study"] == s["study"] and t["seconds"] is not None]
        iv = [t["interval"] for t in timed]
        finished = [t for t in trials if t["study"] == s["study"] and t["state"] in ("COMPLETE", "PRUNED")]
        # the edge and transition phases: every finished trial from the first extension / transition point on
        first = min((t["number"] for t in trials if t["study"] == s["study"]
                     and t["design"] in ("extension", "transition")), default=None)
        rows.append({**{k: s[k] for k in ("study", "key", "method", "seed", "d", "restored", "untimed")},
                     "states": dict(s["states"]), "designs": dict(s["designs"]), "timed": len(timed),
                     "finished": len(finished), "done": s["key"] in chosen and not (s["states"]["WAITING"] or
                                                                                   s["states"]["RUNNING"]),
                     "extras": sum(t["number"] >= first for t in finished) if first is not None else 0,
                     "cpu_s": sum(t["seconds"] for t in timed),
                     "span_s": max(b for _, b in iv) - min(a for a, _ in iv) if iv else None,
                     "busy_s": union_seconds(iv) if iv else None})
    return rows


def measured_stages(trials: list[dict], runs: list[dict]) -> dict:
    iv = [t["interval"] for t in trials if t["interval"] is not None]
    out = {"searches": {"n": sum(t["state"] in ("COMPLETE", "PRUNED") for t in trials), "timed": len(iv),
                        "failed": sum(t["state"] == "FAIL" and t["interval"] is not None for t in trials),
                        "cpu_s": sum(t["seconds"] for t in trials if t["seconds"] is not None) if iv else None,
                        "busy_s": union_seconds(iv) if iv else None, "concurrency": max_overlap(iv) if iv else None}}
    s = out["searches"]
    s["packing"] = s["cpu_s"] / (s["concurrency"] * s["busy_s"]) if iv and s["busy_s"] else None
    for stage, roles in (("calibration", ("calibration",)), ("final runs", ("final", "constraint", "search1")),
                         ("ingredients", ("ingredients",)), ("post-hoc rows", ("post-hoc",))):
        rs = [r for r in runs if r["role"] in roles and r["seconds"] is not None]
        out[stage] = {"n": len(rs), "cpu_s": sum(r["seconds"] for r in rs) if rs else None}
    return out


# ---------------------------------------------------------------------------- 4: the prediction
def planned_counts(study) -> dict:
    """What the protocol runs from scratch (the one place to adapt when the protocol changes):
    {"trials": {study key: finished trials}, key = the method, or "method@search1" for its second search;
     "finals": {trained method: final runs (its final seeds, held-out seeds, second search's held-out runs)},
     "constraint": {method: runs where its constraint-rule choice differs}, "ingredients": {"stock"|"soup": runs},
     "posthoc": {method: rows}, "calibration": runs at calibration_steps}."""
    pr, M = study.protocol, study.methods
    try:
        from infusing_kit.protocol.search import study_budget   # a study's whole budget, every phase included
    except ImportError:                                  # (a kit from before it)
        def study_budget(d):
            return {1: 12, 2: 20}.get(d, 12 * d)
    seeds_of = getattr(pr, "seeds_of", lambda m: pr.final_seeds)
    n_cons = getattr(pr, "constraint_seeds", len(pr.final_seeds))
    searched = [m for m in M if M[m].search]
    trials = {m: pr.trials_of(m) or study_budget(len(M[m].search)) for m in searched}
    trials.update({f"{m}@search1": trials[m] for m in pr.second_search if m in searched and m != pr.baseline})
    n_final, n_held = len(pr.final_seeds), len(pr.heldout_seeds)
    finals = {m: len(pr.final_seeds if m == pr.baseline else seeds_of(m)) + n_held * (m in pr.heldout)
              + n_held * (f"{m}@search1" in trials) for m in M if not M[m].post_hoc}
    posthoc = {m: n_final for m in M if M[m].post_hoc}
    ingredients = {"stock": n_final if any(M[m].ingredients == "seeds" for m in posthoc) else 0,
                   "soup": pr.soup_ingredients * n_final if any(M[m].ingredients == "lrs" for m in posthoc) else 0}
    return {"trials": trials, "finals": finals,
            "constraint": {m: len(tuple(seeds_of(m))[:n_cons]) for m in searched if m != pr.baseline},
            "ingredients": ingredients, "posthoc": posthoc, "calibration": len(pr.search_seeds)}


def method_kind(study, m: str) -> str:
    p = study.methods[m]
    return kind(p.train.sampler, p.train.ewc or float(any(f == "ewc" for f, *_ in p.search)))


def family_of(k: str) -> str:
    return k.split(" ")[0]


def fit_costs(trials: list[dict]) -> dict:
    """Per kind (and pooled per family and over all, for kinds this folder never timed): the median wall seconds and
    target steps of complete trials (C at S) and of pruned ones (P at the median pruned_at Sp); from the two, a
    fixed cost per run and a cost per target step (a + b x steps), where both come out positive."""
    timed = [t for t in trials if t["seconds"] is not None and t["state"] in ("COMPLETE", "PRUNED") and t["kind"]]
    groups = defaultdict(list)
    for t in timed:
        for g in (t["kind"], family_of(t["kind"]) + " (pooled)", "all (pooled)"):
            groups[g].append(t)
    fit = {}
    for g, ts in groups.items():
        comp = [t for t in ts if t["state"] == "COMPLETE"]
        if not comp:
            continue
        pr = [t for t in ts if t["state"] == "PRUNED"]
        f = {"n_complete": len(comp), "complete_s": stats([t["seconds"] for t in comp])["median"],
             "steps": stats([t["steps"] for t in comp])["median"], "n_pruned": len(pr),
             "pruned_s": stats([t["seconds"] for t in pr])["median"],
             "pruned_steps": stats([t["pruned_at"] for t in pr])["median"], "fixed_s": None, "per_step_s": None}
        if f["pruned_s"] is not None and f["pruned_steps"] and f["steps"] > f["pruned_steps"]:
            b = (f["complete_s"] - f["pruned_s"]) / (f["steps"] - f["pruned_steps"])
            a = f["complete_s"] - b * f["steps"]
            if a >= 0 and b > 0:
                f["fixed_s"], f["per_step_s"] = a, b
        fit[g] = f
    return fit


def cost_at(fit: dict, k: str, steps: float):
    """(seconds of one run of kind k that trains `steps` target steps, the fit group used)."""
    for g in (k, family_of(k) + " (pooled)", "all (pooled)"):
        f = fit.get(g)
        if f is not None:
            if f["per_step_s"] is not None:
                return f["fixed_s"] + f["per_step_s"] * steps, g
            return f["complete_s"] * steps / f["steps"], g
    return None, None


def trial_cost(fit, k, steps, share, frac):
    """Expected seconds of a search trial: complete, or pruned (probability `share`) at `frac` of its schedule."""
    c, g = cost_at(fit, k, steps)
    p, _ = cost_at(fit, k, frac * steps)
    return (None if c is None else (1 - share) * c + share * p), g


def observed_shares(trials: list[dict], rows: list[dict], chosen: dict) -> dict:
    """From every finished trial (restored ones included: their state needs no clock): the pruned share, where in
    its schedule pruning stopped a trial (median), the edge/transition trials of the finished studies by number of
    searched fields, and the share of searched choices whose constraint-rule choice differs from the mean rule's."""
    fin = [t for t in trials if t["state"] in ("COMPLETE", "PRUNED")]
    pruned = [t for t in fin if t["state"] == "PRUNED"]
    extras, finished = defaultdict(list), defaultdict(list)
    for r in rows:
        if r["done"]:
            extras[r["d"]].append(r["extras"])
            finished[r["d"]].append(r["finished"])
    keys = [k for k, v in chosen.items() if isinstance(v, dict) and "constraint_params" in v and v.get("search")]
    differs = [k for k in keys if chosen[k]["constraint_params"] not in (None, chosen[k].get("params"))]
    return {"pruned_share": len(pruned) / len(fin) if fin else 0.0,
            "pruned_frac": stats([t["pruned_at"] / t["steps"] for t in pruned if t["pruned_at"] and t["steps"]])
            ["median"] or 0.5,
            "extras_by_d": {d: float(np.mean(v)) for d, v in sorted(extras.items())},
            "finished_by_d": {d: float(np.mean(v)) for d, v in sorted(finished.items())},
            "studies_by_d": {d: len(v) for d, v in sorted(extras.items())},
            "constraint_share": len(differs) / len(keys) if keys else None, "constraint_of": len(keys)}


def test_overhead(runs: list[dict]) -> float | None:
    """Seconds a final run spends outside training beyond what a validation-only run does (test evaluation): the
    median (seconds - train_seconds) of trained final runs minus that of calibration runs; None where either is
    absent (then counted as 0)."""
    def extra(roles):
        return stats([r["seconds"] - r["train_seconds"] for r in runs if r["role"] in roles
                      and r["seconds"] is not None and r["train_seconds"] is not None])["median"]
    f, c = extra(("final", "constraint", "search1")), extra(("calibration",))
    return max(0.0, f - c) if f is not None and c is not None else None


def _sum(xs):
    xs = list(xs)
    return None if any(x is None for x in xs) else float(sum(xs))


def predict(study, plan: dict, fit: dict, obs: dict, runs: list[dict], T: int) -> dict:
    """Predicted CPU-seconds (one thread per worker) per planned study and per stage."""
    pr, M = study.protocol, study.methods
    base = pr.baseline
    share, frac = obs["pruned_share"], obs["pruned_frac"]
    studies = []
    for key, n in plan["trials"].items():
        m = key.split("@")[0]
        k, steps = method_kind(study, m), pr.calibration_steps if m == base else T
        per, g = trial_cost(fit, k, steps, share, frac)
        extra = obs["extras_by_d"].get(len(M[m].search), 0.0)
        studies.append({"key": key, "kind": k, "fit": g, "d": len(M[m].search), "steps": steps, "trials": n,
                        "per_trial_s": per, "cpu_s": None if per is None else per * n,
                        "old_extras": extra, "old_cpu_s": None if per is None else per * (n + extra)})
    test_s = test_overhead(runs) or 0.0
    finals = []
    for m, n in plan["finals"].items():
        p = M[m]  # a method with no search and no base to take settings from: its length relative to the baseline's
        steps = T if (p.search or p.ablation_of or m == base) else round(T * p.train.steps / M[base].train.steps)
        c, g = cost_at(fit, method_kind(study, m), steps)
        finals.append({"method": m, "runs": n, "steps": steps, "fit": g,
                       "cpu_s": None if c is None else (c + test_s) * n})
    cshare = obs["constraint_share"] or 0.0
    per_cons = [cost_at(fit, method_kind(study, m), T)[0] for m in plan["constraint"]]
    cons = _sum(None if c is None else (c + test_s) * n * cshare for c, n in zip(per_cons, plan["constraint"].values()))
    one_base = cost_at(fit, method_kind(study, base), T)[0]
    cal = cost_at(fit, method_kind(study, base), pr.calibration_steps)[0]
    ph = [r["seconds"] for r in runs if r["role"] == "post-hoc" and r["seconds"] is not None]
    ph_s = stats(ph)["median"] if ph else POSTHOC_SECONDS
    n_ingr, n_ph = sum(plan["ingredients"].values()), sum(plan["posthoc"].values())
    stages = {
        "calibration": {"n": plan["calibration"], "cpu_s": None if cal is None else cal * plan["calibration"],
                        "per_run_s": cal},
        "searches": {"n": sum(plan["trials"].values()), "cpu_s": _sum(s["cpu_s"] for s in studies)},
        "final runs": {"n": sum(plan["finals"].values()) + cshare * sum(plan["constraint"].values()),
                       "cpu_s": _sum([*(f["cpu_s"] for f in finals), cons])},
        "ingredients": {"n": n_ingr, "cpu_s": None if one_base is None else one_base * n_ingr, "per_run_s": one_base},
        "post-hoc rows": {"n": n_ph, "cpu_s": ph_s * n_ph, "per_run_s": ph_s},
    }
    stages["all"] = {"n": sum(s["n"] for s in stages.values()), "cpu_s": _sum(s["cpu_s"] for s in stages.values())}
    return {"schedule_steps": T, "test_overhead_s": test_s, "test_overhead_measured": test_overhead(runs) is not None,
            "posthoc_row_s": ph_s, "posthoc_measured": bool(ph), "constraint_share": cshare,
            "constraint_cpu_s": cons, "old_extras_cpu_s": _sum(s["old_cpu_s"] for s in studies),
            "studies": studies, "finals": finals, "stages": stages}


def comparisons(study, rows: list[dict], trials: list[dict], pred: dict, fit: dict, runs: list[dict],
                measured: dict) -> dict:
    """measured / predicted where this folder allows it. Searches: (a) the cost model on every timed trial (its
    measured seconds vs the fit's seconds for its kind and the steps it trained; in-sample: the medians come from
    these trials, so this is mean over median, the weight of slow spells); (b) the trial counts of the finished
    studies vs the plan's budget. Run stages: the measured runs vs the predicted cost of as many runs."""
    out = {}
    timed = [t for t in trials if t["seconds"] is not None and t["state"] in ("COMPLETE", "PRUNED") and t["kind"]]
    if timed:
        model = _sum(cost_at(fit, t["kind"], t["pruned_at"] if t["state"] == "PRUNED" and t["pruned_at"] else
                             t["steps"])[0] for t in timed)
        meas = sum(t["seconds"] for t in timed)
        out["search trials (cost model)"] = {
            "ratio": ratio(meas, model), "measured_cpu_s": meas, "predicted_cpu_s": model, "n": len(timed),
            "note": f"{len(timed)} timed trials: {fmt(meas, 0)} s measured vs {fmt(model, 0)} s from the fit for "
                    f"their kinds and steps (in-sample: mean over median)"}
    by_key = {s["key"]: s for s in pred["studies"]}
    done = [r for r in rows if r["done"] and r["key"] in by_key]
    if done:
        n_meas = sum(r["finished"] for r in done)
        n_plan = sum(by_key[r["key"]]["trials"] for r in done)
        out["search trials (count)"] = {
            "ratio": n_meas / n_plan, "measured": n_meas, "planned": n_plan, "studies": len(done),
            "note": f"{len(done)} finished studies ran {n_meas} trials; the plan's budget for them is {n_plan}"}
    per = {"calibration": pred["stages"]["calibration"]["per_run_s"], "ingredients":
           pred["stages"]["ingredients"]["per_run_s"], "post-hoc rows": pred["posthoc_row_s"]}
    for stage, c in per.items():
        m = measured[stage]
        if m["n"] and m["cpu_s"] is not None and c:
            out[stage] = {"ratio": m["cpu_s"] / (c * m["n"]), "note": f"{m['n']} measured runs: {fmt(m['cpu_s'], 0)} s "
                          f"vs {fmt(c * m['n'], 0)} s predicted for as many"}
    fin = [r for r in runs if r["role"] in ("final", "constraint", "search1") and r["seconds"] is not None]
    if fin:
        pred_s = _sum((cost_at(fit, r["kind"], r["steps"])[0] or 0.0) + pred["test_overhead_s"] for r in fin)
        meas = sum(r["seconds"] for r in fin)
        out["final runs"] = {"ratio": ratio(meas, pred_s), "note": f"{len(fin)} measured runs: {fmt(meas, 0)} s vs "
                             f"{fmt(pred_s, 0)} s predicted for the same runs (kind and steps from their metrics.json)"}
    return out


# ---------------------------------------------------------------------------- printing
def print_kinds(rows):
    print("## 1. Trials per kind (timed trials only)\n")
    print(table(["kind", "state", "trials", "median s", "IQR s", "median target steps", "s / backbone update"],
                [[r["kind"], r["state"], r["n"], fmt(r["median"]), f"{fmt(r['q1'])}–{fmt(r['q3'])}",
                  fmt(r["steps"], 0), fmt(r["s_per_update"], 3)] for r in rows]))
    print("\nKind: sampler family (target-only, or generic batches: round robin, balanced, proportional, adaptive), "
          "EWC (its Fisher computed) or not. A pruned trial's steps are its schedule's; it stopped at pruned_at.")


def print_studies(rows):
    print("\n## 2. Studies\n")
    print(table(["study", "d", "complete", "pruned", "fail", "running", "waiting", "startup", "TPE", "extension",
                 "transition", "not timed", "trials' wall s", "span", "busy", "finished"],
                [[r["study"], r["d"], *(r["states"].get(s, 0) for s in STATES),
                  *(r["designs"].get(x, 0) for x in DESIGNS),
                  r["restored"] + r["untimed"], fmt(r["cpu_s"], 0), hours(r["span_s"]), hours(r["busy_s"]),
                  "yes" if r["done"] else "no"] for r in rows]))
    print(f"\nNot timed: {sum(r['restored'] for r in rows)} trials restored from a file (start == end; in "
          f"{sum(r['restored'] > 0 for r in rows)} studies) and {sum(r['untimed'] for r in rows)} without an end "
          "(running, or left running by a process that died); waiting trials never started. Trials' wall s: the sum "
          "over complete, pruned and failed trials (one thread each: CPU-seconds); span: first start to last end; "
          "busy: the union of its trials' intervals; finished: its choice is in chosen.json and no trial waits or "
          "runs.")


def print_measured(m, jobs_obs):
    print("\n## 3. Stages, measured\n")
    s = m["searches"]
    rows = [["searches", f"{s['n']} finished trials; {s['timed']} timed ({s['failed']} of them failed)",
             fmt(s["cpu_s"], 0), hours(s["busy_s"])]]
    rows += [[k, f"{v['n']} runs", fmt(v["cpu_s"], 0), "—"] for k, v in m.items() if k != "searches"]
    print(table(["stage", "what", "CPU-s (sum of wall s)", "busy wall"], rows))
    if s["busy_s"]:
        print(f"\nSearches: at most {jobs_obs} trials ran at once; packing: CPU-s / ({jobs_obs} x busy wall) = "
              f"{m['searches']['packing']:.2f}. Run stages: the sum of each metrics.json's `seconds` (whole run).")


def print_prediction(pred, fit, obs, measured, cmp, jobs, jobs_obs, T_source):
    print(f"\n## 4. Prediction: a whole comparison from scratch, --jobs {jobs}\n")
    print(table(["fit group", "complete", "median s", "at steps", "pruned", "median s", "at steps (pruned_at)",
                 "fixed s / run", "s / target step"],
                [[g, f["n_complete"], fmt(f["complete_s"]), fmt(f["steps"], 0), f["n_pruned"], fmt(f["pruned_s"]),
                  fmt(f["pruned_steps"], 0), fmt(f["fixed_s"]), fmt(f["per_step_s"], 3)] for g, f in fit.items()
                 if not g.endswith("(pooled)") or not any(f == fit[k] for k in fit if not k.endswith("(pooled)"))]))
    print(f"\nA run of a kind costs fixed + per step x target steps where complete and pruned medians give both "
          f"(positive); else the complete median scaled by steps. A kind never timed here takes its family's pooled "
          f"fit, else all trials'. Pruned share {obs['pruned_share']:.3f} of every finished trial (restored ones "
          f"included), stopped at {obs['pruned_frac']:.2f} of the schedule (median). Schedule T = {T_source}; the "
          f"baseline's search and the calibration runs at calibration_steps.\n")
    print(table(["study", "kind (fit)", "d", "target steps", "trials", "s / trial", "CPU-s"],
                [[s["key"], f"{s['kind']} ({s['fit']})", s["d"], s["steps"], s["trials"], fmt(s["per_trial_s"]),
                  fmt(s["cpu_s"], 0)] for s in pred["studies"]]))
    print()
    rows = []
    for k, v in pred["stages"].items():
        mv = measured.get(k, {}) if k != "all" else {}
        c = cmp.get(k, {}).get("ratio")
        n = f"{mv['timed']} timed" if k == "searches" else mv.get("n", "—")
        rows.append([k, fmt(v["n"], 0), fmt(v["cpu_s"], 0), hours(v["wall_s"]), n,
                     fmt(mv.get("cpu_s"), 0), fmt(c, 2) + (" per run" if c is not None else "")])
    print(table(["stage", "planned trials / runs", "predicted CPU-s", f"predicted wall (/{jobs})", "measured n",
                 "measured CPU-s", "measured / predicted"], rows))
    how = "measured" if pred["test_overhead_measured"] else "not measured here: no final and calibration metrics.json"
    print(f"\nFinal runs: a complete run of the method's kind at its steps + {fmt(pred['test_overhead_s'])} s of test "
          f"evaluation ({how}); constraint-rule runs for the {fmt(100 * pred['constraint_share'], 0)}% of searched "
          f"choices whose constraint choice differed here (of {obs['constraint_of']} in chosen.json; none counted "
          f"without one). Post-hoc row: {fmt(pred['posthoc_row_s'])} s "
          f"({'measured median' if pred['posthoc_measured'] else 'assumed'}).")
    if pred["wall_at_measured_packing_s"] is not None:
        print(f"At this folder's measured search packing ({measured['searches']['packing']:.2f}) the whole "
              f"comparison takes {hours(pred['wall_at_measured_packing_s'])} wall.")
    if pred["old_extras_cpu_s"] is not None and obs["extras_by_d"]:
        ext = ", ".join(f"d={d}: {fmt(obs['finished_by_d'][d])} trials, {fmt(v)} of them edge/transition phase "
                        f"({obs['studies_by_d'][d]} studies)" for d, v in obs["extras_by_d"].items())
        print(f"This folder's finished studies ran, on average, {ext}. Were those phases on top of the "
              f"budget (not inside it), the searches would take {fmt(pred['old_extras_cpu_s'], 0)} CPU-s "
              f"({hours(pred['old_extras_cpu_s'] / jobs)} wall).")
    print()
    for k, c in cmp.items():
        print(f"- {k}: measured / predicted {fmt(c['ratio'], 2)}; {c['note']}")
    if jobs_obs and jobs_obs != jobs:
        print(f"\nNote: the per-trial costs were measured with up to {jobs_obs} trials at once; with --jobs {jobs} "
              "each may run at another speed (shared caches and memory bandwidth).")


def load_protocol_study(chosen: dict):
    """The kit's built-in study (smoke if this folder's runner was), whose protocol the prediction counts."""
    from infusing_kit.protocol.study import Study
    runner = (chosen.get("study") or {}).get("runner") or {}
    return Study.builtin(smoke=bool(runner.get("smoke", False)))


def protocol_changes(chosen: dict, study) -> dict:
    from dataclasses import asdict
    old = (chosen.get("study") or {}).get("protocol") or {}
    now = json.loads(json.dumps(asdict(study.protocol)))
    return {"differ": sorted(k for k in now if k in old and old[k] != now[k]),
            "new": sorted(k for k in now if old and k not in old)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dir", type=Path, help="a comparison folder (search.db, chosen.json, runs/)")
    ap.add_argument("--jobs", type=int, default=2, help="workers of the predicted comparison (one thread each)")
    ap.add_argument("--json", type=Path, help="also write every number printed to this (new) file")
    args = ap.parse_args()
    d = args.dir
    db, runs_dir = d / "search.db", d / "runs"
    if not db.exists() and not runs_dir.is_dir():
        sys.exit(f"{d}: not a comparison folder: it should hold search.db (the Optuna studies) and/or runs/ "
                 "(runs/{calibration,final,ingredients}/*/metrics.json)")
    if args.json is not None and args.json.exists():
        sys.exit(f"{args.json} exists; choose another --json file (nothing was written)")
    if args.jobs < 1:
        sys.exit(f"--jobs {args.jobs}: give at least 1 worker")
    chosen = json.loads((d / "chosen.json").read_text()) if (d / "chosen.json").exists() else {}
    studies, trials = read_trials(db) if db.exists() else ([], [])
    runs = read_runs(runs_dir) if runs_dir.is_dir() else []
    study = load_protocol_study(chosen)

    plan = planned_counts(study)
    kinds = kind_rows(trials)
    rows = study_rows(studies, trials, chosen)
    measured = measured_stages(trials, runs)
    jobs_obs = measured["searches"]["concurrency"]
    fit = fit_costs(trials)
    obs = observed_shares(trials, rows, chosen)
    T = (chosen.get("schedule") or {}).get("steps")
    T_source = f"{T} target steps (this folder's chosen.json)"
    if T is None:
        T = study.methods[study.protocol.baseline].train.steps
        T_source = f"{T} target steps (the baseline preset's: this folder has no schedule yet)"
    changes = protocol_changes(chosen, study)

    print(f"# Cost of the comparison in {d}\n")
    if changes["differ"] or changes["new"]:
        print(f"Note: this folder ran another protocol than the kit's current one (values differ: {changes['differ']}; "
              f"keys it did not have: {changes['new']}); the prediction counts the current one.\n")
    print_kinds(kinds)
    print_studies(rows)
    print_measured(measured, jobs_obs)
    report = {"folder": str(d), "jobs": args.jobs, "observed_concurrency": jobs_obs, "protocol_changes": changes,
              "kinds": kinds, "studies": rows, "measured": measured, "plan": plan, "fit": fit, "observed": obs,
              "schedule_steps": T}
    if fit:
        pred = predict(study, plan, fit, obs, runs, T)
        for v in pred["stages"].values():
            v["wall_s"] = None if v["cpu_s"] is None else v["cpu_s"] / args.jobs
        pk, wall = measured["searches"]["packing"], pred["stages"]["all"]["wall_s"]
        pred["wall_at_measured_packing_s"] = wall / pk if pk and wall is not None else None
        cmp = comparisons(study, rows, trials, pred, fit, runs, measured)
        print_prediction(pred, fit, obs, measured, cmp, args.jobs, jobs_obs, T_source)
        report.update(prediction=pred, comparison=cmp)
    else:
        print("\n## 4. Prediction\n\nNo timed trial in this folder: nothing to fit a cost model on.")
    if args.json is not None:
        with open(args.json, "x") as f:  # never over an existing file
            json.dump(report, f, indent=1)
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
