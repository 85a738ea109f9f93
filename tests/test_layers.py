"""The floor plan that infusing_kit/__init__.py draws and CONTRIBUTING.md states: a core of modules and five wings
(sub-packages); every import, module-level or inside a function, goes from a room to one listed before it in
ROOMS (a room: a core module or a whole wing), so there is no cycle between rooms, and no two modules import each
other anywhere."""
import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "infusing_kit"
ROOMS = ["checkpoints", "distributed", "budget", "metrics", "losses", "towers", "weightfiles", "hfweights",
         "datasets", "world", "models", "pretrain", "identity", "methods", "trainconfig", "run_state", "train",
         "evaluation", "protocol", "teaching", "__main__"]
WINGS = {"datasets", "world", "methods", "protocol", "teaching"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PKG).with_suffix("").parts
    return ".".join(p for p in parts if p != "__init__")


def _imports(path: Path) -> set[str]:
    """The kit's modules a file imports (dotted names below infusing_kit), anywhere in it."""
    here = _module_name(path).split(".") if _module_name(path) else []
    package = here if path.name == "__init__.py" else here[:-1]
    out = set()
    for n in ast.walk(ast.parse(path.read_text())):
        if isinstance(n, ast.ImportFrom):
            if n.level:
                base = package[:len(package) - (n.level - 1)] + (n.module.split(".") if n.module else [])
            elif n.module and n.module.split(".")[0] == "infusing_kit":
                base = n.module.split(".")[1:]
            else:
                continue
            for a in n.names:  # `from . import x` names a module; `from .x import f` names x
                sub = base + [a.name]
                out.add(".".join(sub) if (PKG.joinpath(*sub).with_suffix(".py").exists()
                                          or (PKG.joinpath(*sub) / "__init__.py").exists()) else ".".join(base))
        elif isinstance(n, ast.Import):
            out |= {a.name.split(".", 1)[1] for a in n.names if a.name.startswith("infusing_kit.")}
    return {m for m in out if m}


def _room(module: str) -> str:
    return module.split(".")[0]


GRAPH = {_module_name(p): _imports(p) for p in sorted(PKG.rglob("*.py")) if _module_name(p)}


def test_every_module_sits_in_a_listed_room():
    assert {_room(m) for m in GRAPH} == set(ROOMS), ({_room(m) for m in GRAPH} ^ set(ROOMS))
    assert all((PKG / w / "__init__.py").exists() for w in WINGS)


def test_every_import_goes_to_an_earlier_room():
    wrong = [f"{m} -> {t}" for m, ts in GRAPH.items() for t in ts
             if _room(t) != _room(m) and ROOMS.index(_room(t)) > ROOMS.index(_room(m))]
    assert not wrong, f"imports against the floor plan (CONTRIBUTING.md, 'The layers'): {wrong}"


def test_no_two_modules_import_each_other():
    both = sorted({tuple(sorted((m, t))) for m, ts in GRAPH.items() for t in ts if m in GRAPH.get(t, ())})
    assert not both, both


def test_the_layer_check_sees_a_cycle_when_there_is_one(tmp_path):
    # the parser itself: a relative import up a level, and a module of a wing named by `from . import`
    pkg = tmp_path / "infusing_kit"
    (pkg / "protocol").mkdir(parents=True)
    (pkg / "models.py").write_text("def f():\n    from .protocol import experiment\n")
    (pkg / "protocol" / "__init__.py").write_text("")
    (pkg / "protocol" / "experiment.py").write_text("from ..models import f\nfrom . import results\n")
    (pkg / "protocol" / "results.py").write_text("")
    global PKG
    old, PKG = PKG, pkg
    try:
        assert _imports(pkg / "models.py") == {"protocol.experiment"}
        assert _imports(pkg / "protocol" / "experiment.py") == {"models", "protocol.results"}
    finally:
        PKG = old
