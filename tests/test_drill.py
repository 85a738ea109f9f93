"""The user-reported drill on studies, storages and resumes: one test per row, each a refusal (naming file, key or
value and what to do) before any trial trains, or the correct behaviour. Trials and runs are cheap fakes."""
import json
import os
import signal
import subprocess
import sys
import textwrap
from dataclasses import dataclass, fields, replace
from pathlib import Path

import pytest

from infusing_kit.protocol import comparison as C, search as S, spaces, storage
from infusing_kit.__main__ import main
from infusing_kit.protocol.runners import Builtin, StudyFile
from infusing_kit.protocol.study import Study, load_study

ROOT = Path(__file__).resolve().parents[1]
SNAPSHOT = ROOT / "tests" / "data" / "builtin-study-v4b.json"  # the presets at the v4b comparison's choices




L2SP = '[study.method.toy-l2sp]\npreset = "toy-l2sp"\nschedule = "smoke"'


def _study(world: Path, old: str = None, new: str = None, name: str = "s.toml") -> Path:
    """The exported quick study (configs/quick-study.toml), with one text replacement."""
    text = (world / "configs" / "quick-study.toml").read_text()
    if old is not None:
        assert old in text, old
        text = text.replace(old, new, 1)
    path = world / "configs" / name
    path.write_text(text)
    return path


@dataclass(frozen=True, eq=False)
class Quick(StudyFile):
    """A study file's runner whose every trial or run returns at once (a score that depends on the sampled values)."""

    def run(self, method, out_dir, seed=0, overrides=None, test=True, hooks=(), **kw):
        x = sum(float(v) for k, v in (overrides or {}).items() if k != "steps") % 1.0
        val = {"fine_map@20": 0.5 + x / 10, "generic_map@20": 0.5, "mean_map@20": 0.5 + x / 20}
        return {"val": val, "train": dict(overrides or {}), "updates": {"target": 1}, "best_step": 1, "code": "x",
                "weights": "w", "threads": 1, "torch": "t", "device_kind": "cpu"}


def quick(path) -> Study:
    """The study of a file, its runs made by `Quick`."""
    study = load_study(path)
    return replace(study, runner=Quick(**{f.name: getattr(study.runner, f.name) for f in fields(study.runner)}))


# ---------------------------------------------------------------------------- 1, 2: search ranges
def test_1_log_must_be_a_boolean(world):
    path = _study(world, L2SP, L2SP + '\nsearch = [{field = "l2sp", low = 0.1, high = 10.0, log = "no"}]')
    with pytest.raises(ValueError, match=r"s.toml \[study.method.toy-l2sp\] search l2sp: log = 'no' must be true or "
                                         "false"):
        load_study(path)


def test_2_integer_bounds_on_a_float_field_search_floats_and_the_built_in_spaces_are_unchanged(world):
    path = _study(world, L2SP, L2SP + '\nsearch = [{field = "sparse", low = 0, high = 1}]')
    space = list(load_study(path).methods["toy-l2sp"].search)
    assert space == [("sparse", 0.0, 1.0, False)]
    points = [p["sparse"] for p in spaces.startup_points(space, 6, 0)]
    assert len(set(points)) == 6 and not all(v in (0, 1) for v in points), points
    assert spaces.is_int(0, 1, False, "sparse") is False and spaces.is_int(0, 9, False, "lp_ft_steps") is True
    bad = _study(world, L2SP, L2SP + '\nsearch = [{field = "lp_ft_steps", low = 0.5, high = 9.0}]', "b.toml")
    with pytest.raises(ValueError, match="lp_ft_steps is an integer field; give integer bounds"):
        load_study(bad)
    assert _builtin_snapshot() == json.loads(SNAPSHOT.read_text()), "the built-in study changed"


def _builtin_snapshot() -> dict:
    """tests/data/make_builtin_snapshot.py's snapshot, from the current code."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("make_builtin_snapshot", ROOT / "tests" / "data" / "make_builtin_snapshot.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.snapshot()


# ---------------------------------------------------------------------------- 3: search --config takes [study] trials
def test_3_search_config_spends_the_study_files_trials(world, tmp_path, monkeypatch):
    path = _study(world, "[study]\n", "[study]\ntrials = {toy-l2sp = 7}\n")
    seen = {}
    monkeypatch.setattr(S, "search", lambda method, storage, out, trials=None, **kw: seen.update(trials=trials) or {})
    assert main(["search", "--config", str(path), "--method", "toy-l2sp", "--storage", str(tmp_path / "s.db"),
                 "--out", str(tmp_path / "o")]) == 0
    assert seen["trials"] == 7


# ---------------------------------------------------------------------------- 4: the same storage, other data or settings
def test_4_a_study_or_comparison_continued_on_other_data_or_fixed_fields_is_refused(world, tmp_path, monkeypatch,
                                                                                    capsys):
    path = _study(world)
    db, run = tmp_path / "s.db", lambda p: S.search("toy-l2sp", db, tmp_path / "o", trials=6, runner=quick(p).runner)
    run(path)
    _study(world, "eval_every = 10", "eval_every = 5")  # a fixed field of the searched method changes
    with pytest.raises(ValueError, match=r"changed fixed field eval_every 10 -> 5\. Continue it with the same"):
        run(path)
    _study(world)  # back to the original settings; now the train split changes
    _edit_train_split(world)
    with pytest.raises(ValueError, match=r"changed the data \[data.target\] train\. Continue it with the same"):
        run(path)
    # a storage made before fingerprints: accepted, recorded, said in a log line
    import optuna
    legacy = tmp_path / "legacy.db"
    name = load_study(path).runner.study_name("toy-l2sp", 0)
    attrs = {k: v for k, v in optuna.load_study(study_name=name, storage=storage.open_storage(db)).user_attrs.items()
             if k != "fingerprint"}
    rows = [r for r in S.trial_rows(db) if r["study"] == name]
    storage.restore_trials(rows, legacy, attrs["space"], "mean_map@20", attrs)
    capsys.readouterr()
    S.search("toy-l2sp", legacy, tmp_path / "o", trials=6, runner=quick(path).runner)
    assert "has no fingerprint (made before fingerprints were recorded): recorded" in capsys.readouterr().out
    assert "fingerprint" in optuna.load_study(study_name=name, storage=storage.open_storage(legacy)).user_attrs


def test_4_compare_stopped_after_stage_1_refuses_an_edited_train_split(world, tmp_path):
    path = _study(world, "[study]\n", "[study]\ntrials = {toy-naive = 12}\n")
    C.compare(tmp_path / "d", study=quick(path), stop_after=1, log=lambda *_: None)
    assert "fingerprint" in json.loads((tmp_path / "d" / "chosen.json").read_text())
    _edit_train_split(world)
    with pytest.raises(ValueError, match=r"chosen.json was made on another model, data or fixed settings: changed "
                                         r"the data \[data.target\] train"):
        C.compare(tmp_path / "d", study=quick(path), stop_after=2, log=lambda *_: None)


def _edit_train_split(world: Path) -> None:
    train = world / "target" / "train.json"
    train.write_text(json.dumps(json.loads(train.read_text())[:-1]))  # one image less


# ---------------------------------------------------------------------------- 5: validation data in the resume identity
def test_5_resuming_on_other_validation_data_is_refused_and_old_checkpoints_still_resume(tmp_path):
    import torch
    from conftest import TINY_TRAIN, cheap_validate, toy_target, toy_vlm
    from infusing_kit.train import train

    def on(name):
        v = lambda vlm: cheap_validate(vlm)
        v.data_identity = lambda: {"target_val": name, "generic_val": "g"}
        return v
    train(toy_vlm(), toy_target(), TINY_TRAIN, tmp_path / "r", validate=on("a"), progress=False,
          hooks=(lambda s: s.target_step < 3,))
    with pytest.raises(ValueError, match="other validation data"):
        train(toy_vlm(), toy_target(), TINY_TRAIN, tmp_path / "r", validate=on("b"), resume=True, progress=False)
    ckpt = torch.load(tmp_path / "r" / "last.pt", weights_only=False)  # a checkpoint of the kit before this record
    del ckpt["identity"]["validation"]
    torch.save(ckpt, tmp_path / "r" / "last.pt")
    train(toy_vlm(), toy_target(), TINY_TRAIN, tmp_path / "r", validate=on("b"), resume=True, progress=False)
    from conftest import tiny_world_and_model
    from infusing_kit.evaluation import validation_fn
    assert set(validation_fn(tiny_world_and_model()[0]).data_identity()) == {"target_val", "generic_val"}


# ---------------------------------------------------------------------------- 6: storages checked up front
def _sqlite_with_trials(path: Path) -> Path:
    import optuna
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name="x", storage=storage.open_storage(path))
    for i in range(8):  # some pages of trials
        study.enqueue_trial({"x": float(i)}, user_attrs={f"pad{j}": "p" * 2000 for j in range(10)})
    return path


def _truncated(path: Path) -> Path:
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])
    return path


@pytest.mark.parametrize("make, message", [
    (lambda d: "postgresql://u:secret@127.0.0.1:1/x", "postgresql://u:\\*\\*\\*@127.0.0.1:1/x: cannot open the "
                                                       "database \\(connection"),
    (lambda d: "postgres://h/x", "write postgresql://"),
    (lambda d: "http://h/x", "http:// is not a database URL"),
    (lambda d: "sqlite://rel.db", "three slashes"),
    (lambda d: "sqlite:///no/dir/x.db", "the folder no/dir does not exist; create it"),
    (lambda d: (d / "e.db").write_bytes(b"") or d / "e.db", "is an empty file \\(0 bytes\\), not an Optuna storage"),
    (lambda d: _truncated(_sqlite_with_trials(d / "t.db")), "is damaged \\(SQLite: .*malformed"),
])
def test_6_a_bad_storage_is_one_line_before_any_trial(tmp_path, capsys, make, message):
    with pytest.raises(SystemExit) as e:
        main(["search", "--preset", "toy-l2sp", "--storage", str(make(tmp_path)), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").rglob("trial*")), "a trial started"
    assert __import__("re").search(message, err), err


def test_6_a_read_only_storage_is_refused_for_search_and_read_for_trials(tmp_path, monkeypatch, capsys):
    db = _sqlite_with_trials(tmp_path / "t.db")
    real = os.access
    monkeypatch.setattr(storage.os, "access", lambda p, mode: False if mode == os.W_OK else real(p, mode))
    with pytest.raises(SystemExit):
        main(["search", "--preset", "toy-l2sp", "--storage", str(db), "--out", str(tmp_path / "o")])
    assert "cannot be written (a read-only file system" in capsys.readouterr().err
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").rglob("trial*")), "a trial ran on a read-only storage"
    assert storage.trial_rows(db) == []  # reading needs no write (its queued trials are not finished ones)


# ---------------------------------------------------------------------------- 7: a second worker on one SQLite file
def test_7_a_second_search_never_fails_a_live_workers_trial(tmp_path):
    import optuna
    db = tmp_path / "s.db"
    study, _ = S._prepare("toy-l2sp", db, Builtin(), 0, {"steps": 100})
    dead_pid = subprocess.Popen([sys.executable, "-c", "pass"])
    dead_pid.wait()
    live, dead, foreign = (study.ask() for _ in range(3))  # three queued start-up points, now RUNNING
    for t in (live, dead, foreign):
        t.suggest_float("l2sp", *study.user_attrs["space"][0][1:3], log=True)
    import socket
    live.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")  # this process: alive
    dead.set_user_attr("worker", f"{socket.gethostname()}:{dead_pid.pid}")
    foreign.set_user_attr("worker", "a-machine-this-file-was-copied-from:1")
    study, _ = S._prepare("toy-l2sp", db, Builtin(), 0, {"steps": 100})  # a second `search` joins
    state = {t.number: t.state for t in study.get_trials(deepcopy=False)}
    assert state[live.number] == optuna.trial.TrialState.RUNNING
    assert state[dead.number] == state[foreign.number] == optuna.trial.TrialState.FAIL
    waiting = [t.system_attrs["fixed_params"] for t in study.get_trials(deepcopy=False,
                                                                         states=(optuna.trial.TrialState.WAITING,))]
    assert dead.params in waiting and foreign.params in waiting  # the dead start-up points run again
    study.tell(live, 0.5)  # the first worker still finishes its trial


# ---------------------------------------------------------------------------- 8: report --baseline
def test_8_an_unknown_baseline_is_refused_naming_the_methods(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["report", "--registry", str(ROOT / "results" / "toy-comparison-cpu-v2.jsonl"), "--baseline", "naiv",
              "--figures", str(tmp_path)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--baseline 'naiv' is not a method of" in err and "'toy-naive'" in err, err


# ---------------------------------------------------------------------------- 9, 10: protocol fields, method names
@pytest.mark.parametrize("old, new, message", [
    ("search_seeds = [0, 1, 2, 3, 4]", "search_seeds = []", r"\[study\] search_seeds = \[\]: give at least one seed"),
    ("final_seeds = [0, 1, 2, 3, 4]", "final_seeds = [0, 0]", r"final_seeds = \[0, 0\] repeats a seed"),
    ('"toy-l2sp", "toy-l2sp-sum"', '"../../../escaped", "toy-l2sp-sum"',
     r"method name '../../../escaped' is not a safe folder name: use letters, digits"),
    ("[study.method.toy-l2sp]", '[study.method.".."]', r"method name '..' is not a safe folder name"),
])
def test_9_10_protocol_fields_and_method_names_are_checked_with_the_file(world, old, new, message):
    text = _study(world).read_text()
    assert old in text
    path = world / "configs" / "bad.toml"
    path.write_text(text.replace(old, new, 1).replace("[study.method.toy-l2sp]", '[study.method."../../../escaped"]')
                    if "escaped" in new else text.replace(old, new, 1))
    with pytest.raises(ValueError, match=message):
        load_study(path)


def test_12_a_study_method_merging_several_runs_gets_its_ingredients_and_no_search(world):
    """post_hoc = "model_stock" on a trained preset: the comparison made no second seed for it (the merge failed after
    the baseline's final runs trained), and a search of it trained trials that failed in posthoc.py."""
    searched = _study(world, L2SP, L2SP + '\npost_hoc = "model_stock"')
    with pytest.raises(ValueError, match=r"\[study.method.toy-l2sp\]: post_hoc = 'model_stock' merges several runs "
                                         r".* set search = \[\]"):
        load_study(searched)
    path = _study(world, L2SP, L2SP + '\npost_hoc = "model_stock"\nsearch = []', "m.toml")
    assert load_study(path).methods["toy-l2sp"].ingredients == "seeds"


def test_9_the_built_in_comparison_refuses_no_search_seed(tmp_path):
    with pytest.raises(ValueError, match="search_seeds = \\[\\]: give at least one seed"):
        C.compare(tmp_path / "c", search_seeds=[], smoke=True, log=lambda *_: None)


# ---------------------------------------------------------------------------- 11: --resume right after kill -9
def test_11_a_killed_runs_folder_is_free_at_once_though_its_children_live_on(tmp_path):
    """The run's process takes the folder's lock, forks a child (a DataLoader worker) and is killed with -9: the
    child, still alive, must not keep the folder (flock: 'in use by process PID', that PID dead)."""
    from infusing_kit.checkpoints import FolderLock
    script = textwrap.dedent(f"""
        import os, signal, time
        from infusing_kit.checkpoints import FolderLock
        lock = FolderLock({str(tmp_path / 'run')!r})
        child = os.fork()
        if child == 0:
            time.sleep(30)
            os._exit(0)
        open({str(tmp_path / 'child')!r}, "w").write(str(child))
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    res = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                         timeout=60)
    assert res.returncode == -signal.SIGKILL
    child = int((tmp_path / "child").read_text())
    try:
        os.kill(child, 0)  # the worker still lives
        FolderLock(tmp_path / "run").release()
    finally:
        os.kill(child, signal.SIGKILL)
