"""Snapshot of the built-in study at the current code: its protocol, each method's search range and space (and
whether a field is searched as an integer), the start-up design's points, and each method's TrainConfig.
tests/test_drill.py compares the code's snapshot with the committed one, so a refactor that changes the built-in
study fails. When the study is meant to change (new presets, a finished comparison's choices):

    python tests/data/make_builtin_snapshot.py tests/data/builtin-study-NAME.json

and point tests/test_drill.py's SNAPSHOT at the new file."""
import json
import sys
from dataclasses import asdict

from infusing_kit.protocol import search as S, spaces
from infusing_kit.protocol.study import Study


def snapshot() -> dict:
    kind = lambda f, lo, hi, log: "int" if spaces.is_int(lo, hi, log, f) else "float"  # noqa: E731
    out = {}
    for smoke in (False, True):
        st = Study.builtin(smoke)
        d = {"describe": json.loads(json.dumps(st.describe())), "protocol": repr(st.protocol), "methods": {}}
        for name, m in st.methods.items():
            cfg = st.runner.train_config(name)
            space = S._space_of(st.runner, name, cfg)
            rows = {"search": [[f, repr(lo), repr(hi), log, kind(f, lo, hi, log)] for f, lo, hi, log in m.search],
                    "space": [[f, repr(lo), repr(hi), log, kind(f, lo, hi, log)] for f, lo, hi, log in space],
                    "train": {k: repr(v) for k, v in asdict(cfg).items()}}
            if space:
                key = st.runner.seed_key(name, 0)
                pts = spaces.startup_points(space, spaces.startup_count(len(space)), S.study_seed(key))
                rows["startup"] = [{k: repr(v) for k, v in p.items()} for p in pts]
                rows["from_unit"] = [[repr(spaces.from_unit(u, lo, hi, log, f)) for u in (0.0, 0.37, 0.999)]
                                     for f, lo, hi, log in space]
            d["methods"][name] = rows
        out["smoke" if smoke else "full"] = d
    return json.loads(json.dumps(out, sort_keys=True))


if __name__ == "__main__":
    with open(sys.argv[1], "w") as f:
        json.dump(snapshot(), f, indent=1, sort_keys=True)
