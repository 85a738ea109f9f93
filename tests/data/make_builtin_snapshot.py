"""Snapshot of the built-in study (spaces, protocol, sampling of the start-up design) at the current code."""
import json, sys
from dataclasses import asdict
from infusing_kit.study import Study, Runner
from infusing_kit import search as S, spaces

def kind(lo, hi, log):
    return "int" if spaces.is_int(lo, hi, log) else "float"

out = {}
for smoke in (False, True):
    st = Study.builtin(smoke)
    d = {"describe": json.loads(json.dumps(st.describe())), "protocol": repr(st.protocol), "methods": {}}
    for name, m in st.methods.items():
        cfg = st.runner.train_config(name)
        space = S._space_of(st.runner, name, cfg)
        rows = {"search": [[f, repr(lo), repr(hi), log, kind(lo, hi, log)] for f, lo, hi, log in m.search],
                "space": [[f, repr(lo), repr(hi), log, kind(lo, hi, log)] for f, lo, hi, log in space],
                "train": {k: repr(v) for k, v in asdict(cfg).items()}}
        if space:
            key = S.seed_key(name, 0, st.runner)
            pts = spaces.startup_points(space, spaces.startup_count(len(space)), S.study_seed(key))
            rows["startup"] = [{k: repr(v) for k, v in p.items()} for p in pts]
            rows["from_unit"] = [[repr(spaces.from_unit(u, lo, hi, log)) for u in (0.0, 0.37, 0.999)]
                                 for f, lo, hi, log in space]
        d["methods"][name] = rows
    out["smoke" if smoke else "full"] = d
json.dump(out, open(sys.argv[1], "w"), indent=0, sort_keys=True)
