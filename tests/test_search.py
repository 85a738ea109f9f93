"""Hyper-parameter search bookkeeping, with the experiment replaced by a cheap fake (the real path runs in
notebook 09 and `compare --smoke`): trials never ask for test metrics; the start-up design fills the range;
an interrupted study resumes without repeating points; a best value at an edge extends the range; trailing
trials are pruned; the exported trial rows match the study; the schedule length is found on flat curves."""
import json
import math

import pytest

from conftest import FakeRunner
from infusing_kit.protocol import experiment, search as S, spaces, storage
from infusing_kit.__main__ import main
from infusing_kit.protocol.comparison import choose_schedule, flat_length


def _fake(score, smoke=False):
    """A runner whose runs are a validation curve rising towards score(l2sp) (conftest.FakeRunner); .calls: its runs."""
    def run(preset, out, seed, overrides, test=True, hooks=(), **_):
        x = overrides.get("l2sp", 1.0)
        val = score(x)
        stopped = None
        from infusing_kit.train import TrainState
        for step in (25, 50, 75, 100):  # a validation curve that rises towards val
            state = TrainState(step, step, "target", {}, {"mean_map@20": val * step / 100, "fine_map@20": 0.5})
            if any(h(state) is False for h in hooks):
                stopped = step
                break
        return {"val": {"fine_map@20": 0.5, "generic_map@20": x / (1 + x), "mean_map@20": val},
                "train": {"steps": 100, **overrides}, "updates": {"target": stopped or 100}, "best_step": 100}

    return FakeRunner(smoke, fake=run)


def test_search_fills_the_range_uses_validation_only_and_resumes_without_repeats(tmp_path):
    fake = _fake(lambda x: 0.5 - abs(math.log10(x) - 2) / 10)  # best at l2sp = 100, inside
    db = tmp_path / "s.db"
    lo, hi = 0.1, 1e5
    S.search("toy-l2sp", db, tmp_path / "runs", trials=8, base={"steps": 100}, runner=fake)
    assert len(fake.calls) == 8 and not any(c["test"] for c in fake.calls), "a trial evaluated test data"
    first = sorted(c["overrides"]["l2sp"] for c in fake.calls[:6])
    # the start-up design: one point in each sixth of the log range
    slices = sorted(int(6 * (math.log(v) - math.log(lo)) / (math.log(hi) - math.log(lo))) for v in first)
    assert slices == list(range(6)), first
    assert all(c["overrides"]["steps"] == 100 for c in fake.calls), "the shared base settings were not applied"
    best = S.search("toy-l2sp", db, tmp_path / "runs", trials=12, base={"steps": 100}, runner=fake)  # a second session continues
    values = [c["overrides"]["l2sp"] for c in fake.calls]
    assert len(values) == 12 and len(set(values)) == 12, f"resumed study repeated trials: {values}"
    assert best["trials"] == 12 and best["distinct"]["l2sp"] == 12 and best["at_edge"] == []
    assert 10 < best["params"]["l2sp"] < 1000

    rows = S.trial_rows(db)
    assert sorted(r["params"]["l2sp"] for r in rows) == sorted(values)
    assert {r["method"] for r in rows} == {"toy-l2sp"} and all("mean_map@20" in r["val"] for r in rows)
    assert all(r["train"]["steps"] == 100 for r in rows), "trials must keep their whole config"
    assert sum(r["design"] == "startup" for r in rows) == 6
    with pytest.raises(ValueError, match="base settings"):  # one study, one schedule
        S.search("toy-l2sp", db, tmp_path / "runs", trials=12, base={"steps": 200}, runner=fake)

    out = tmp_path / "trials.jsonl"
    assert main(["trials", "--storage", str(db), "--out", str(out)]) == 0
    assert [json.loads(l) for l in out.read_text().splitlines()] == rows
    with pytest.raises(SystemExit):  # never overwrites
        main(["trials", "--storage", str(db), "--out", str(out)])


def test_a_best_value_at_the_edge_extends_the_range(tmp_path):
    fake = _fake(lambda x: 0.9 - abs(math.log10(x) - 6) / 20)  # best at 1e6, above the range [0.1, 1e5]
    best = S.search("toy-l2sp", tmp_path / "s.db", tmp_path / "runs", base={"steps": 100}, runner=fake)
    assert len(best["extensions"]) >= 1 and best["space"][0][2] > 1e6, best["extensions"]
    assert 1e5 < best["params"]["l2sp"] < 1e7 and best["at_hard_limit"] == []
    assert max(c["overrides"]["l2sp"] for c in fake.calls) > 1e5
    assert len(fake.calls) == best["trials"] == S.study_budget(1), "extension points come out of the study's budget"


def test_a_range_grows_only_where_its_score_is_still_rising():
    """The edge rule: the best in the outer 5% of a log range, nothing beyond it falling, and the best above every
    tried value in the next quarter inward by more than the noise (SPD's best sat at 98% of its range, rising)."""
    space = [("spd", 1e-3, 2.0, True)]
    u = lambda f: float(math.exp(math.log(1e-3) + f * (math.log(2.0) - math.log(1e-3))))
    params = [{"spd": u(f)} for f in (0.1, 0.5, 0.8, 0.9, 0.98)]
    grow = lambda scores, noise=0.003: spaces.extend_space(space, params, params[int(max(range(5), key=lambda i: scores[i]))],
                                                           200, None, scores, noise)[1]
    assert grow([0.88, 0.89, 0.895, 0.897, 0.905]), "rising at the edge: the range grows"
    assert not grow([0.88, 0.89, 0.903, 0.904, 0.905]), "a plateau within the noise: no growth"
    assert not grow([0.88, 0.89, 0.895, 0.905, 0.899]), "the best is inside (0.9 of the range): no growth"
    params.append({"spd": u(0.99)})
    assert not grow([0.88, 0.89, 0.895, 0.897, 0.905, 0.89]), "a value beyond the best falls: no growth"


def test_a_choice_stuck_at_a_hard_limit_is_reported(tmp_path):
    fake = _fake(lambda x: math.log10(x) / 20)  # keeps rising: the best is always the largest value tried
    best = S.search("toy-l2sp", tmp_path / "s.db", tmp_path / "runs", trials=16, base={"steps": 100}, runner=fake)
    assert best["space"][0][2] == spaces.DEFAULT_LIMITS[1], best  # the range grew as far as the field allows
    top = [("l2sp", 0.1, spaces.DEFAULT_LIMITS[1], True)]
    tried = [{"l2sp": v} for v in (1.0, 1e4, 0.9e8)]
    assert spaces.extend_space(top, tried, tried[-1], 100, None, [0.1, 0.2, 0.4], 0.01)[2] == ["l2sp"]


def test_trailing_trials_are_pruned_but_never_the_startup_design(tmp_path):
    fake = _fake(lambda x: 1 / (1 + abs(math.log10(x) - 2)))
    S.search("toy-l2sp", tmp_path / "s.db", tmp_path / "runs", trials=16, base={"steps": 100}, extend=False, runner=fake)
    rows = S.trial_rows(tmp_path / "s.db")
    assert all(r["state"] == "complete" for r in rows if r["design"] == "startup")
    assert any(r["state"] == "pruned" for r in rows), [(r["design"], r["state"], r["params"]) for r in rows]


def test_presets_without_a_search_space_are_refused(tmp_path):
    fake = _fake(lambda x: 0.5)
    with pytest.raises(ValueError, match="no search space"):
        S.search("toy-wise-ft", tmp_path / "s.db", tmp_path / "runs", runner=fake)
    with pytest.raises(ValueError, match="start-up points"):
        S.search("toy-paper", tmp_path / "s.db", tmp_path / "runs", trials=10, runner=fake)  # 12 start-up points for 2 fields


def test_every_search_space_is_valid():
    for name, p in experiment.PRESETS.items():
        for field, lo, hi, log in p.search:
            assert hasattr(p.train, field), (name, field)
            assert lo < hi and (not log or lo > 0), (name, field)


def test_flat_length_ignores_the_plateau_before_take_off():
    curve = [(0, 0.01), (25, 0.01), (50, 0.012), (75, 0.3), (100, 0.8), (125, 0.95), (150, 0.97), (175, 0.975),
             (200, 0.98), (225, 0.98)]
    # at 150 the last 20% starts at 100 (0.8 -> 0.97); at 175 it starts at 125 (0.95 -> 0.975) and < 0.03 is to come
    assert flat_length(curve) == 175
    assert flat_length([(0, 0.0), (25, 0.1), (50, 0.3)]) is None
    sched = choose_schedule([curve, [(s + 25, v) for s, v in curve]], eval_every=25, budget=600)
    assert sched["flat"] == [175, 200] and sched["steps"] == 250 and sched["all_flat"]  # 200 x 1.25



def test_trials_running_at_once_draw_from_different_random_streams():
    # two workers that start a trial at the same moment see the same finished trials; with one seed per finished
    # count they proposed the same strength twice (trials 9 and 10 of a CPU comparison run had equal values)
    import optuna
    sampler = storage.trial_seeded_sampler(123, n_startup=4)
    study = optuna.create_study(direction="maximize", sampler=sampler)
    dist = {"x": optuna.distributions.FloatDistribution(1e-3, 1e3, log=True)}
    for x in (1e-2, 1e-1, 1.0, 10.0, 100.0):
        study.add_trial(optuna.trial.create_trial(params={"x": x}, distributions=dist, value=-abs(math.log10(x))))
    a, b = study.ask(), study.ask()  # both running, nothing sampled yet
    draws = []
    for t in (a, b):
        sampler.before_trial(study, study._storage.get_trial(t._trial_id))
        draws.append(sampler._rng.rng.random())
    assert draws[0] != draws[1]
    # and a lone worker's stream depends only on the finished trials (resume determinism)
    study.tell(b, state=optuna.trial.TrialState.FAIL)
    sampler.before_trial(study, study._storage.get_trial(a._trial_id))
    assert sampler._rng.rng.random() == draws[0]


def test_points_a_killed_session_queued_still_run(tmp_path):
    # a session killed after queuing an edge extension left those points WAITING; the next session ran nothing
    # (its trial budget was already met) and the extension's strip stayed unexplored
    import optuna
    fake = _fake(lambda x: 0.5 - abs(math.log10(x) - 2) / 10)
    db = tmp_path / "s.db"
    S.search("toy-l2sp", db, tmp_path / "runs", trials=8, base={"steps": 100}, extend=False, runner=fake)
    study = optuna.load_study(study_name=fake.study_name("toy-l2sp", 0), storage=f"sqlite:///{db}")
    for x in (3e-2, 5e-2):
        study.enqueue_trial({"l2sp": x}, user_attrs={"design": "extension"})
    S.search("toy-l2sp", db, tmp_path / "runs", trials=8, base={"steps": 100}, extend=False, runner=fake)
    assert len(fake.calls) == 10 and {c["overrides"]["l2sp"] for c in fake.calls[-2:]} == {3e-2, 5e-2}


def test_transitions_get_points_where_the_score_changes_beyond_the_noise():
    space = [("l2sp", 1e-2, 1e4, True)]
    tried = [({"l2sp": v}, s) for v, s in ((1e-2, 0.80), (1e-1, 0.80), (1.0, 0.81), (1e3, 0.50), (1e4, 0.40))]
    points = spaces.transition_points(space, tried, noise=0.01)
    # beside the best (1.0): 1 -> 1e3 jumps; 1e3 -> 1e4 jumps by 0.10 > 0.02 too, but on the collapsed side
    assert [round(math.log10(p["l2sp"]), 6) for p in points] == [1.5]
    # where fine-grained validation crosses the constraint rule's threshold (0.7, between 1e3 and 1e4), next
    fine = dict(zip((1e-2, 1e-1, 1.0, 1e3, 1e4), (0.9, 0.9, 0.88, 0.75, 0.6)))
    tried3 = [(p, v, fine[p["l2sp"]]) for p, v in tried]
    points = spaces.transition_points(space, tried3, noise=0.01, threshold=0.7)
    assert [round(math.log10(p["l2sp"]), 6) for p in points] == [1.5, 3.5]
    assert len(spaces.transition_points(space, tried3, noise=0.01, threshold=0.7, max_points=1)) == 1
    assert spaces.transition_points(space, tried, noise=0.2) == []      # every change within 2 x noise
    assert spaces.transition_points(space + space, tried, noise=0.01) == []  # one-field studies only


def test_flat_studies_and_the_constraint_rule():
    assert spaces.is_flat([0.80, 0.81, 0.805], noise=0.01) and not spaces.is_flat([0.80, 0.83], noise=0.01)
    assert not spaces.is_flat([0.8, 0.8], noise=0.0), "without a noise estimate nothing is called flat"
    rows = [{"params": {"x": i}, "val": {"fine": f, "generic": g}}
            for i, (f, g) in enumerate(((0.99, 0.5), (0.95, 0.7), (0.90, 0.9), (0.95, 0.7)))]
    assert spaces.constrained_choice(rows, "fine", "generic", 0.94)["params"] == {"x": 1}  # 2 misses; 1 before 3
    assert spaces.constrained_choice(rows, "fine", "generic", 0.999) is None


def test_a_search_with_a_noise_estimate_maps_the_transition_and_reports_flatness(tmp_path):
    fake = _fake(lambda x: 0.9 if x < 30 else 0.3)  # a step at 30: no effect below, too strong above
    best = S.search("toy-l2sp", tmp_path / "s.db", tmp_path / "runs", trials=8, base={"steps": 100}, extend=False,
                    noise=0.01, constraint=("fine_map@20", "generic_map@20", 0.4), runner=fake)
    transitions = [c["overrides"]["l2sp"] for c in fake.calls[6:]]
    assert transitions, "the jump got no points"
    assert len(fake.calls) == best["trials"] == 8, "transition points come out of the study's budget"
    assert not best["flat"] and best["spread"] == pytest.approx(0.6)
    assert best["constraint"]["params"] is not None and best["constraint"]["threshold"] == 0.4
    flat = S.search("toy-ewc", tmp_path / "f.db", tmp_path / "runs", trials=8, base={"steps": 100}, extend=False,
                    noise=0.01, runner=fake)
    assert flat["flat"] and flat["spread"] == 0.0


def _pop_queued(path: str, out) -> None:
    """A worker that starts queued trials until none is left (what each parallel search worker does first)."""
    import optuna
    from infusing_kit.protocol.storage import open_storage
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study = optuna.load_study(study_name="queued", storage=open_storage(path))
    got = []
    while True:
        t = study.ask()
        if study._storage.get_trial(t._trial_id).system_attrs.get("fixed_params") is None:  # the queue is empty
            study.tell(t, state=optuna.trial.TrialState.FAIL)
            break
        got.append(t.number)
    out.put(got)


def test_parallel_workers_on_one_sqlite_file_never_start_a_queued_trial_twice(tmp_path):
    """SQLite has no SELECT ... FOR UPDATE: without the kit's lock, 4 processes starting 60 queued trials started
    67-73 in 5 tries (a comparison crashed on it: two workers in one trial's folder). With it, each queued trial runs once."""
    import multiprocessing as mp

    import optuna
    from infusing_kit.protocol.storage import open_storage
    path = str(tmp_path / "search.db")
    study = optuna.create_study(study_name="queued", storage=open_storage(path))
    for i in range(60):
        study.enqueue_trial({"x": float(i)})
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_pop_queued, args=(path, out)) for _ in range(4)]
    for p in procs:
        p.start()
    started = sum((out.get(timeout=300) for _ in procs), [])
    for p in procs:
        p.join(60)
    assert sorted(started) == list(range(60)), f"{len(started)} starts of 60 queued trials"


def test_a_lost_study_comes_back_from_its_committed_trials(tmp_path):
    """restore_trials is trial_rows' inverse: a study searched here, read back as rows (a trials.jsonl), restored into
    a new storage gives the same rows and the same best trial; restoring twice is refused."""
    import optuna
    from infusing_kit.protocol.storage import open_storage, restore_trials
    fake = _fake(lambda x: 1 / (1 + abs(math.log10(x) - 2)))  # (as in the pruning test: some are pruned)
    first = tmp_path / "a.db"
    best = S.search("toy-l2sp", first, tmp_path / "runs", trials=16, base={"steps": 100}, extend=False, runner=fake)
    rows = S.trial_rows(first)
    assert any(r["state"] == "pruned" for r in rows) and any(r["state"] == "complete" for r in rows)
    attrs = optuna.load_study(study_name=best["study"], storage=open_storage(first)).user_attrs
    assert restore_trials(rows, tmp_path / "b.db", best["space"], "mean_map@20", attrs) == len(rows) >= 16
    assert S.trial_rows(tmp_path / "b.db") == rows
    restored = optuna.load_study(study_name=best["study"], storage=open_storage(tmp_path / "b.db"))
    assert restored.best_trial.params == best["params"] and restored.user_attrs == attrs
    with pytest.raises(ValueError, match="already holds"):
        restore_trials(rows, tmp_path / "b.db", best["space"], "mean_map@20")


def test_no_search_range_can_grow_past_what_its_field_accepts():
    """A range grows at its edge up to the field's hard limit: every limit of every preset's searched field must be a
    value TrainConfig accepts (the near world's comparison crashed when toy-sparse's range grew past a fraction of
    1: sparse = 3.1 was refused by TrainConfig mid-search)."""
    from dataclasses import replace

    from infusing_kit.protocol.spaces import hard_limits
    from infusing_kit.protocol.runners import Builtin
    for name, preset in experiment.PRESETS.items():
        for field, lo, hi, log in S._space_of(Builtin(), name, preset.train):  # the ranges a search starts from
            hard_lo, hard_hi = hard_limits(field, preset.train.steps, 4 if field == "freeze_blocks" else None)
            assert hard_lo <= lo and (hard_hi is None or hi <= hard_hi), (name, field, (lo, hi), (hard_lo, hard_hi))
            for v in (hard_lo, hard_hi):
                if v is not None:
                    replace(preset.train, **{field: v})  # raises where TrainConfig refuses the value


def test_a_fields_limits_live_in_one_row_that_validation_and_search_both_read(monkeypatch):
    """trainconfig.LIMITS is the one place a field's limits live: every numeric field's search limits are values its
    check accepts, a value past its row's bound is refused naming the field, and changing the row changes both the
    check and how far a search may grow (nothing else holds a copy)."""
    import dataclasses

    from infusing_kit import trainconfig as tc
    from infusing_kit.protocol.spaces import hard_limits
    cfg = tc.TrainConfig()
    for f in dataclasses.fields(cfg):
        if f.type not in ("int", "float"):
            continue
        row = tc.limits(f.name)
        lo, hi = hard_limits(f.name, cfg.steps, 4)
        for v in (lo, hi):
            row.check(f.name, type(getattr(cfg, f.name))(v))  # a search never proposes a value the check refuses
        if row.lo is not None:
            bad = row.lo - 1
            with pytest.raises(ValueError, match=rf"TrainConfig\.{f.name} must be"):
                dataclasses.replace(cfg, **{f.name: type(getattr(cfg, f.name))(bad)})
    monkeypatch.setitem(tc.LIMITS, "lr_head", tc.Limits(0, 0.5, above=True, search=(1e-5, 0.25)))
    with pytest.raises(ValueError, match=r"lr_head must be in \(0, 0.5\]"):
        tc.TrainConfig(lr_head=0.6)
    assert hard_limits("lr_head", 100, None) == (1e-5, 0.25)
