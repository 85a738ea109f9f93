"""sampler="adaptive_official": the official code's dynamic sampling rule (sampling_utils.calc_sampling_weights and
_indices_from_weights, github nikosips/infusing) against schedules computed by hand, beside the kit's own
"adaptive" variant (docs/method.md, section 4, "data")."""
from dataclasses import replace

import numpy as np
import pytest
import torch

from infusing_kit.datasets.sampling import OfficialAdaptive, official_block, official_counts, official_weights


# ---------------------------------------------------------------------------- the rule, by hand
def test_weights_are_the_raw_losses_normalised_with_the_official_smoothing_and_no_clipping():
    # target loss 3, generic loss 1: p = 3/4, 1/4 (the harder domain gets more batches)
    assert official_weights([3.0, 1.0], (0.5, 0.5)) == pytest.approx((0.75, 0.25))
    # smoothing new = ema x old + (1 - ema) x raw: ema 0.5 -> 0.5 x 0.5 + 0.5 x 0.75 = 0.625
    assert official_weights([3.0, 1.0], (0.5, 0.5), ema=0.5) == pytest.approx((0.625, 0.375))
    # the official decay 0.3: 0.3 x 0.5 + 0.7 x 0.75 = 0.675
    assert official_weights([3.0, 1.0], (0.5, 0.5), ema=0.3) == pytest.approx((0.675, 0.325))
    # no clipping (the kit's "adaptive" clips to [0.1, 0.9]): 99 to 1 stays 0.99
    assert official_weights([99.0, 1.0], (0.5, 0.5)) == pytest.approx((0.99, 0.01))
    # the raw losses, not relative to a first window: the same ratio at any level gives the same weights
    assert official_weights([30.0, 10.0], (0.2, 0.8)) == pytest.approx((0.75, 0.25))


def test_a_domain_without_a_classifier_loss_keeps_its_share():
    # the kit's two domains: only the target has a classifier loss -> the generic share stays where it was
    assert official_weights([2.0, None], (0.5, 0.5)) == (0.5, 0.5)
    assert official_weights([7.0, None], (0.3, 0.7), ema=0.3) == pytest.approx((0.3, 0.7))
    # three domains, the middle one without a loss: it keeps 0.5; the others share the other 0.5 as 1 : 3
    assert official_weights([2.0, None, 6.0], (0.2, 0.5, 0.3)) == pytest.approx((0.125, 0.5, 0.375))
    # no loss at all (or all zero): nothing moves
    assert official_weights([None, None], (0.4, 0.6)) == (0.4, 0.6)
    assert official_weights([0.0, 0.0], (0.4, 0.6)) == (0.4, 0.6)
    with pytest.raises(ValueError, match="finite"):
        official_weights([float("nan"), 1.0], (0.5, 0.5))


def test_counts_truncate_every_domain_but_the_last_which_takes_the_remainder():
    assert official_counts((0.75, 0.25), 1000) == [750, 250]
    assert official_counts((0.625, 0.375), 1000) == [625, 375]
    assert official_counts((2 / 3, 1 / 3), 1000) == [666, 334]  # int(666.67) = 666, not rounded to 667
    assert official_counts((0.2, 0.5, 0.3), 10) == [2, 5, 3]
    # the official arithmetic: 0.3 x 0.5 + 0.7 x 0.75 is 0.67499999... in floating point, so 674 target batches
    assert official_counts(official_weights([3.0, 1.0], (0.5, 0.5), ema=0.3), 1000) == [674, 326]


def test_a_block_holds_exact_counts_shuffled_by_seed_and_start():
    block = official_block((0.75, 0.25), 1000, seed=0, start=0)
    assert len(block) == 1000 and int((block == 0).sum()) == 750 and int((block == 1).sum()) == 250
    assert torch.equal(block, official_block((0.75, 0.25), 1000, seed=0, start=0))
    assert not torch.equal(block, official_block((0.75, 0.25), 1000, seed=0, start=1000))
    assert not torch.equal(block, official_block((0.75, 0.25), 1000, seed=1, start=0))
    assert not torch.equal(block[:750], torch.zeros(750, dtype=torch.long))  # shuffled, not sorted


# ---------------------------------------------------------------------------- the state along a run
def _run(state, steps, loss_of, seed=0):
    """Ask the state for each step's domain in order and feed it that step's classifier loss."""
    out = []
    for s in range(steps):
        d = state.domain(s, seed)
        out.append(d)
        state.observe(d, loss_of(s, d))
    return out


def test_the_schedule_is_rebuilt_every_period_from_the_last_blocks_losses():
    state = OfficialAdaptive(period=10)
    domains = _run(state, 30, lambda s, d: 3.0 if d == 0 else 1.0)
    # block 0 (steps 0-9): weights 1/2, 1/2 -> exactly 5 and 5, in the order of official_block
    assert domains[:10] == official_block((0.5, 0.5), 10, 0, 0).tolist() and domains[:10].count(0) == 5
    # block 1 (steps 10-19): losses 3 and 1 -> 3/4, 1/4 -> int(7.5) = 7 target, 3 generic
    assert domains[10:20] == official_block((0.75, 0.25), 10, 0, 10).tolist() and domains[10:20].count(0) == 7
    # block 2: the same losses again -> the same weights (the rule has no memory without smoothing)
    assert domains[20:30].count(0) == 7 and state.weights == pytest.approx((0.75, 0.25))
    # with smoothing 0.5: block 1 has 0.625 -> 6 target; block 2 0.5 x 0.625 + 0.5 x 0.75 = 0.6875 -> 6
    smooth = OfficialAdaptive(period=10, ema=0.5)
    domains = _run(smooth, 30, lambda s, d: 3.0 if d == 0 else 1.0)
    assert [domains[i:i + 10].count(0) for i in (0, 10, 20)] == [5, 6, 6]
    assert smooth.weights == pytest.approx((0.6875, 0.3125))


def test_weights_change_only_at_a_block_boundary():
    a, b = OfficialAdaptive(period=10), OfficialAdaptive(period=10)
    first = _run(a, 20, lambda s, d: 3.0 if d == 0 else 1.0)
    # other losses in the second block (after its schedule was drawn) do not change the second block
    second = _run(b, 20, lambda s, d: (3.0 if d == 0 else 1.0) if s < 10 else (1.0 if d == 0 else 4.0))
    assert first == second
    a.domain(20, 0), b.domain(20, 0)  # step 20 starts block 2: its weights come from block 1's losses
    assert a.weights == pytest.approx((0.75, 0.25)) and b.weights == pytest.approx((0.2, 0.8))


def test_a_block_without_a_target_batch_is_refused():
    state = OfficialAdaptive(period=10, weights=(0.05, 0.95))
    with pytest.raises(ValueError, match="no batch of 10"):
        state.domain(0, 0)


def test_the_kits_generic_domain_has_no_classifier_loss_and_keeps_half_the_batches():
    state = OfficialAdaptive(period=10, ema=0.3)
    domains = _run(state, 40, lambda s, d: 5.0 - 0.1 * s if d == 0 else None)  # what train() feeds it
    assert [domains[i:i + 10].count(1) for i in range(0, 40, 10)] == [5, 5, 5, 5]
    assert state.weights == (0.5, 0.5)


def test_a_state_saved_mid_block_draws_the_same_domains():
    loss = lambda s, d: 3.0 + s % 3 if d == 0 else 1.0
    whole = OfficialAdaptive(period=10, ema=0.3)
    expected = _run(whole, 35, loss)
    part = OfficialAdaptive(period=10, ema=0.3)
    got = _run(part, 14, loss)
    saved = part.state_dict()
    resumed = OfficialAdaptive(period=10, ema=0.3)
    resumed.load_state_dict(saved)
    for s in range(14, 35):
        d = resumed.domain(s, 0)
        got.append(d)
        resumed.observe(d, loss(s, d))
    assert got == expected


# ---------------------------------------------------------------------------- in train()
def test_train_with_the_official_rule_runs_resumes_bit_identically_and_keeps_the_generic_share(tmp_path):
    from test_methods import CFG, _data, _score, _vlm

    from infusing_kit.methods.teacher import extract_teacher
    from infusing_kit.train import count_updates, train
    target, generic = _data(), _data(n_classes=5, seed=9)
    cfg = replace(CFG, steps=4, eval_every=2, ckpt_every=2, batch_size=4, distill=5.0, sampler="adaptive_official",
                  adaptive_every=4)
    with pytest.raises(ValueError, match="adaptive_official sampler's batch counts depend on the run"):
        count_updates(cfg, (len(target), len(generic)), 10)
    full = _vlm()
    head, res = train(full, target, cfg, tmp_path / "full", generic=generic, validate=_score, progress=False,
                      teacher=extract_teacher(full, generic, progress=False))
    steps = res.updates["target"] + res.updates["generic"]
    assert res.updates["target"] == cfg.steps and res.updates["generic"] >= 2 * (steps // 4) - 1 >= 1
    assert {h["p_generic"] for h in res.history if "p_generic" in h} == {0.5}  # no classifier loss on generic
    logged = [h["domain"] for h in res.history if "domain" in h]
    assert len(logged) == steps  # log_every = 1
    for i in range(0, steps - steps % 4, 4):  # every whole block: exactly 2 and 2
        assert logged[i:i + 4].count("generic") == 2
    part = _vlm()
    train(part, target, cfg, tmp_path / "part", generic=generic, validate=_score, progress=False,
          hooks=(lambda s: False if s.target_step == 2 else None,), teacher=extract_teacher(part, generic, progress=False))
    resumed = _vlm()
    _, res2 = train(resumed, target, cfg, tmp_path / "part", generic=generic, validate=_score, progress=False,
                    resume=True, teacher=extract_teacher(resumed, generic, progress=False))
    for a, b in zip(full.visual.state_dict().values(), resumed.visual.state_dict().values()):
        assert torch.equal(a, b)
    assert res2.updates == res.updates and np.isfinite(res.best_score)
