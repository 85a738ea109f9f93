"""What a study's trials and a comparison's choices depend on besides the searched fields: the model, the data and
the fixed (not searched) TrainConfig fields.

A study's storage records `study_fingerprint` in the study's user attributes ("fingerprint") and a comparison its
`comparison_fingerprint` in chosen.json ("fingerprint"), when they start; continuing either on another model, other
data or other fixed fields is refused before any trial or run trains, naming what changed (`check`). A storage or
chosen.json made before fingerprints existed has none: it is accepted and records the current one on first use (a
log line says so). A fixed field that one side does not know (a TrainConfig field the code added since) is not
compared.

The data's fingerprint is made of the files a study file names (split files, CSVs, caption files: their bytes;
a folder: its file names and sizes); the built-in world's, of its world and pretraining configurations.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict
from pathlib import Path

BIG = 64 << 20   # files above this size are fingerprinted by their size and their first and last MiB


def _digest(path: str) -> str:
    p = Path(path)
    h = hashlib.sha256()
    if p.is_dir():
        for f in sorted(q for q in p.rglob("*") if q.is_file()):
            h.update(f"{f.relative_to(p)}|{f.stat().st_size}\n".encode())
        return h.hexdigest()[:16]
    size = p.stat().st_size
    h.update(str(size).encode())
    with open(p, "rb") as f:
        if size <= BIG:
            h.update(f.read())
        else:
            h.update(f.read(1 << 20))
            f.seek(size - (1 << 20))
            h.update(f.read())
    return h.hexdigest()[:16]


def _table(t: dict, skip=("root", "cache_dir")) -> str:
    """A config table's fingerprint: its values, with every existing absolute path replaced by its content's."""
    out = {}
    for k, v in sorted(t.items()):
        if k in skip:
            continue
        if isinstance(v, dict):
            v = _table(v, skip)
        elif isinstance(v, str) and os.path.isabs(v) and os.path.exists(v):
            v = "file:" + _digest(v)
        out[k] = v
    return hashlib.sha256(json.dumps(out, sort_keys=True, default=str).encode()).hexdigest()[:16]


def fixed_fields(runner, method: str, base: dict | None = None) -> dict:
    """A method's TrainConfig fields that no search of it sets (with `base` applied), and its post-hoc step."""
    from dataclasses import replace
    m = runner.method(method)
    cfg = asdict(replace(runner.train_config(method), **(base or {})))
    searched = {f for f, *_ in m.search} | {"seed"}
    out = {k: v for k, v in cfg.items() if k not in searched}
    out["post_hoc"] = m.post_hoc
    return json.loads(json.dumps(out, default=str))


def study_fingerprint(runner, method: str, base: dict) -> dict:
    return {**runner.model_and_data(), "fixed": fixed_fields(runner, method, base)}


def comparison_fingerprint(study) -> dict:
    return {**study.runner.model_and_data(), "methods": {m: fixed_fields(study.runner, m) for m in study.methods}}


def own_choices(old: dict | None, new: dict, chosen: dict, base_method: str) -> dict:
    """`new` (a comparison's fingerprint) with the fields this comparison chose itself put back to their recorded
    values: a preset that now holds the comparison's own choice (its searched strengths, the baseline's learning
    rates and schedule, which every method's runs override) is not a change of what the comparison runs."""
    if not old:
        return new
    base = (chosen.get(base_method) or {}).get("params") or {}
    methods = {}
    for m, fields in new.get("methods", {}).items():
        was, own = old.get("methods", {}).get(m, {}), {**base, **((chosen.get(m) or {}).get("params") or {})}
        methods[m] = {k: (was[k] if k in own and k in was and v == own[k] else v) for k, v in fields.items()}
    return {**new, "methods": methods}


def differences(old: dict, new: dict) -> list[str]:
    """What changed from `old` to `new` (fingerprints), in words; [] when nothing did."""
    out = []
    if old.get("model") != new.get("model"):
        out.append("the model ([model]: its name, weights file or settings)")
    for k in sorted(set(old.get("data", {})) | set(new.get("data", {}))):
        if old.get("data", {}).get(k) != new.get("data", {}).get(k):
            out.append(f"the data {k}")
    pairs = [("", old.get("fixed"), new.get("fixed"))] if "fixed" in old or "fixed" in new else []
    pairs += [(f"{m}: ", old["methods"][m], new["methods"][m]) for m in sorted(old.get("methods", {}))
              if m in new.get("methods", {})]
    for who, a, b in pairs:
        a, b = a or {}, b or {}
        for k in sorted(set(a) & set(b)):
            if a[k] != b[k]:
                out.append(f"{who}fixed field {k} {a[k]!r} -> {b[k]!r}")
    return out


def check(old: dict | None, new: dict, what: str, remedy: str) -> dict:
    """Refuse `new` when it differs from the recorded `old` (ValueError naming what changed); returns the fingerprint
    to record (old None: nothing recorded yet, or a record made before fingerprints: accepted)."""
    if old is None:
        return new
    diff = differences(old, new)
    if diff:
        raise ValueError(f"{what} was made on another model, data or fixed settings: changed {'; '.join(diff)}. "
                         f"{remedy}")
    return new


def check_study(study, runner, method: str, base: dict, storage, log=print) -> None:
    """A search's study (Optuna) against its runner's model, data and fixed fields: refused when they changed, the
    fingerprint recorded when it has none (a study made before fingerprints: said in a log line)."""
    new = study_fingerprint(runner, method, base)
    old = study.user_attrs.get("fingerprint")
    check(old, new, f"study {study.study_name} in {storage}",
          "Continue it with the same model, data and fixed fields, or use another --storage for a new study")
    if old is None:
        if study.trials:
            log(f"study {study.study_name} in {storage} has no fingerprint (made before fingerprints were recorded): "
                "recorded this model's, data's and fixed fields'; later changes are refused")
        study.set_user_attr("fingerprint", new)
