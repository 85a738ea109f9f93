"""Many machines, one study, on a real PostgreSQL server that each test starts and stops itself (Debian's
postgresql; .ci/run installs it): two worker processes finish one study with no point run twice, and a worker
killed with kill -9 mid-trial has that trial failed by its heartbeat and run again by the other worker."""
import functools
import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _pg_bin(name: str) -> str | None:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return found[-1] if found else shutil.which(name)


def _as_postgres(cmd: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: run its commands as the postgres user when the tests run as root."""
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def postgres():
    """A fresh PostgreSQL cluster on a Unix socket (no TCP), its URL, and teardown."""
    initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
    if initdb is None or pg_ctl is None:
        pytest.skip("PostgreSQL is not installed (.ci/run installs Debian's postgresql)")
    base = Path(tempfile.mkdtemp(prefix="kit-pg-"))
    data, sock = base / "data", base / "sock"
    sock.mkdir()
    if os.geteuid() == 0:
        shutil.chown(base, "postgres")
        shutil.chown(sock, "postgres")
    subprocess.run(_as_postgres([initdb, "-D", str(data), "-A", "trust", "-U", "postgres"]), check=True,
                   capture_output=True)
    port = _free_port()
    subprocess.run(_as_postgres([pg_ctl, "-D", str(data), "-w", "-l", str(base / "log"), "-o",
                                 f"-k {sock} -p {port} -c listen_addresses=''", "start"]), check=True,
                   capture_output=True)
    try:
        yield f"postgresql://postgres@/postgres?host={sock}&port={port}"
    finally:
        subprocess.run(_as_postgres([pg_ctl, "-D", str(data), "-m", "immediate", "stop"]), capture_output=True)
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def study_file(smoke_study):
    return smoke_study


def _worker(study_file, url, out, trials=8, env=None):
    return subprocess.Popen([sys.executable, "-m", "infusing_kit", "search", "--config", str(study_file), "--method",
                             "toy-l2sp", "--storage", url, "--out", str(out), "--trials", str(trials)],
                            cwd=ROOT, env={**os.environ, "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1", **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@functools.lru_cache(maxsize=None)
def _storage(url):
    import optuna
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.storages.RDBStorage(url)  # one connection pool per server (the wait loop polls it)


def _trials(url):
    import optuna
    store = _storage(url)
    names = [s.study_name for s in optuna.get_all_study_summaries(store)]
    return names, (optuna.load_study(study_name=names[0], storage=store).trials if names else [])


@pytest.mark.parametrize("where", ["sqlite", "postgresql"])
def test_two_searches_opening_one_new_study_at_once_queue_each_decision_once(where, tmp_path, monkeypatch, request):
    """Two machines that open a new study at the same moment: without a lock both found it empty, both queued its
    start-up design and every point ran twice (a fresh-clone CI run: 12 trials, 6 points). Here the check before
    the design, the design and each edge extension are made slow, so that both searches are inside them at once;
    each is still queued once. The experiment is a cheap fake whose best value sits above the range (the study
    extends it). SQLite: two processes creating the schema at once also failed ("table studies already exists")."""
    import math
    import threading

    from conftest import FakeRunner
    from infusing_kit.protocol import fingerprint, search as S, spaces
    storage = str(tmp_path / "s.db") if where == "sqlite" else request.getfixturevalue("postgres")

    def run(preset, out, seed, overrides, **_):
        x = overrides["l2sp"]
        return {"val": {"fine_map@20": 0.5, "generic_map@20": 0.5, "mean_map@20": 0.9 - abs(math.log10(x) - 6) / 20},
                "train": {"steps": 100, **overrides}, "updates": {"target": 100}, "best_step": 100}

    def slowly(f):
        def slow(*a, **k):
            time.sleep(1.0)  # wide enough for the other search to arrive at the same decision
            return f(*a, **k)
        return slow
    fake = FakeRunner(fake=run)
    monkeypatch.setattr(fingerprint, "check_study", slowly(fingerprint.check_study))  # between reading and queueing
    monkeypatch.setattr(S, "startup_points", slowly(spaces.startup_points))
    monkeypatch.setattr(S, "extend_space", slowly(spaces.extend_space))
    results, errors = [], []

    def one():
        try:
            results.append(S.search("toy-l2sp", storage, tmp_path / "runs", trials=14, base={"steps": 100},
                                    runner=fake))
        except BaseException as e:  # noqa: BLE001 (the test reports it)
            errors.append(e)
    threads = [threading.Thread(target=one) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    assert not errors, errors
    rows = S.trial_rows(storage)
    points = [r["params"]["l2sp"] for r in rows]
    assert len(points) == len(set(points)), f"a point was run twice: {sorted(points)}"
    assert sum(r["design"] == "startup" for r in rows) == spaces.startup_count(1)
    assert sum(r["design"] == "extension" for r in rows) > 0, "the study should have extended its range"
    assert 14 <= len(rows) <= 15, "the budget, and at most one trial more (both finish a last trial at once)"
    history = results[0]["extensions"]
    assert history == results[1]["extensions"] and sum(r["design"] == "extension" for r in rows) <= 4 * len(history), \
        "an extension's points (at most 4 per grown field) were queued by both searches"
    S.search("toy-l2sp", tmp_path / "alone.db", tmp_path / "alone", trials=14, base={"steps": 100}, runner=fake)
    alone = S.trial_rows(tmp_path / "alone.db")  # one search: the start-up design the two must have shared
    assert (sorted(r["params"]["l2sp"] for r in rows if r["design"] == "startup")
            == sorted(r["params"]["l2sp"] for r in alone if r["design"] == "startup"))


@pytest.mark.slow
def test_two_workers_finish_one_study_with_no_point_run_twice(postgres, study_file, tmp_path):
    procs = [_worker(study_file, postgres, tmp_path / "shared") for _ in range(2)]
    outs = [p.communicate(timeout=900) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    names, trials = _trials(postgres)
    assert names == ["quick-study:toy-l2sp-seed0"]
    done = [t for t in trials if t.state.name == "COMPLETE"]
    assert len([t for t in trials if t.state.name in ("COMPLETE", "PRUNED")]) >= 8  # the study's whole budget
    points = [round(t.params["l2sp"], 12) for t in trials if t.state.name in ("COMPLETE", "PRUNED")]
    assert len(points) == len(set(points)), "a point was run twice"
    workers = {t.user_attrs["worker"] for t in done}
    assert len(workers) == 2, f"both workers should have taken trials: {workers}"
    folders = sorted(p.name for p in (tmp_path / "shared" / "quick-study-toy-l2sp-seed0").iterdir())
    assert len(folders) == len(trials) and all((tmp_path / "shared" / "quick-study-toy-l2sp-seed0" / f / "metrics.json")
                                               .exists() for f in folders)
    best = json.loads(outs[0][0][outs[0][0].index("{"):])
    assert best["method"] == "toy-l2sp" and best["trials"] >= 8


@pytest.mark.slow
def test_a_worker_killed_mid_trial_has_its_trial_run_again_by_the_other(postgres, study_file, tmp_path):
    env = {"INFUSING_KIT_HEARTBEAT": "1", "INFUSING_KIT_GRACE": "4"}
    a = _worker(study_file, postgres, tmp_path / "shared", env=env)
    victim = None
    deadline = time.time() + 600
    while victim is None and time.time() < deadline:  # wait until a's first trial is running, then kill -9 it
        time.sleep(0.5)
        if a.poll() is not None:  # a worker that stopped before its first trial says why (no wait to the deadline)
            raise AssertionError(f"the first worker exited with {a.returncode}: {a.communicate()[1][-2000:]}")
        _, trials = _trials(postgres)
        running = [t for t in trials if t.state.name == "RUNNING" and t.user_attrs.get("worker", "").endswith(
            f":{a.pid}")]
        if running:
            victim = running[0]
    assert victim is not None, "the first worker never started a trial"
    os.kill(a.pid, signal.SIGKILL)
    a.communicate()
    b = _worker(study_file, postgres, tmp_path / "shared", env=env)
    out, err = b.communicate(timeout=900)
    assert b.returncode == 0, err[-2000:]
    _, trials = _trials(postgres)
    by_number = {t.number: t for t in trials}
    assert by_number[victim.number].state.name == "FAIL", "the killed trial was not failed by its heartbeat"
    retried = [t for t in trials if t.system_attrs.get("failed_trial") == victim.number]
    assert retried and retried[0].state.name == "COMPLETE" and retried[0].params == victim.params
    assert sum(t.state.name in ("COMPLETE", "PRUNED") for t in trials) >= 8  # the study's whole budget
