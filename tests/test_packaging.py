"""The two install paths (pip + constraints, conda environment.yml) list the same stack; notebooks are stored clean."""
import json
import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _name(req: str) -> str:
    return re.split(r"[<>=!~\[ ;]", req.strip(), maxsplit=1)[0].lower().replace("_", "-")


def test_environment_yml_matches_pyproject():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    want = set(meta["dependencies"]) | set(meta["optional-dependencies"]["dev"])
    lines = [l.strip()[2:].strip() for l in (ROOT / "environment.yml").read_text().splitlines()
             if l.strip().startswith("- ") and l.startswith("      ")]
    got = {l for l in lines if not l.startswith("-")}
    assert got == want, f"only in environment.yml: {got - want}; only in pyproject.toml: {want - got}"
    assert "-c constraints.txt" in lines and "-e ." in lines


def test_constraints_pin_the_working_torch_pair_and_every_dependency():
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            pins[name.lower().replace("_", "-")] = version
    assert pins["torch"] == "2.14.1" and pins["torchvision"] == "0.29.1"
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for req in meta["dependencies"] + meta["optional-dependencies"]["dev"]:
        assert _name(req) in pins, f"{req} is not pinned in constraints.txt"


def test_notebooks_are_stored_without_outputs_and_have_one_parameters_cell():
    for path in sorted((ROOT / "notebooks").glob("*.ipynb")):
        nb = json.loads(path.read_text())
        code = [c for c in nb["cells"] if c["cell_type"] == "code"]
        assert all(not c.get("outputs") and c.get("execution_count") is None for c in code), f"{path.name} has outputs"
        tagged = [c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", [])]
        assert len(tagged) == 1, f"{path.name} needs exactly one cell tagged 'parameters'"
        if path.name[:2].isdigit():  # the chapters; explorer_page.ipynb (the Voila page) trains nothing
            assert "SMOKE" in "".join(tagged[0]["source"]), f"{path.name}: the parameters cell must define SMOKE"
        assert nb["metadata"]["kernelspec"]["name"] == "python3", path.name


def test_every_module_is_on_the_module_map_and_stays_small():
    # the map in infusing_kit/__init__.py names every module; a module past 400 lines holds two concepts: split it
    import infusing_kit
    for path in sorted((ROOT / "infusing_kit").rglob("*.py")):
        if path.stem == "__init__":
            continue
        assert re.search(rf"(^|\s){path.stem}(\s|$)", infusing_kit.__doc__, re.M), f"{path.name} is not on the module map"
        n = len(path.read_text().splitlines())
        assert n <= 400, f"{path.name} has {n} lines: split it (CONTRIBUTING.md, the layers)"
