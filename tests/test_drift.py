"""Per-block drift (drift.py) against brute force, and the post-hoc merges LiNeS and Model Stock by hand."""
import numpy as np
import pytest
import torch

from conftest import tiny_world_and_model
from infusing_kit.methods import drift
from infusing_kit.protocol import experiment
from infusing_kit.models import load_model
from infusing_kit.methods.merges import lines, model_stock, wise_ft


def _hsic(k, l):
    n = len(k)
    h = np.eye(n) - np.ones((n, n)) / n
    return np.trace(k @ h @ l @ h)


def test_linear_cka_equals_the_hsic_definition_and_its_invariances():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 7))
    y = x @ rng.normal(size=(7, 5)) + 0.5 * rng.normal(size=(40, 5))
    k, l = x @ x.T, y @ y.T  # linear kernels
    brute = _hsic(k, l) / np.sqrt(_hsic(k, k) * _hsic(l, l))
    assert drift.linear_cka(x, y) == pytest.approx(brute, rel=1e-10)
    q, _ = np.linalg.qr(rng.normal(size=(7, 7)))
    assert drift.linear_cka(x, 3.0 * x @ q + 2.0) == pytest.approx(1.0, abs=1e-12)  # rotation, scale, shift
    assert drift.linear_cka(x, rng.normal(size=(40, 7))) < 0.5
    with pytest.raises(ValueError, match="same inputs"):
        drift.linear_cka(x, y[:10])


@pytest.fixture(scope="module")
def tiny_pair():
    torch.manual_seed(0)
    a = load_model("toy-clip-tiny", pretrained=None)
    b = load_model("toy-clip-tiny", pretrained=None)
    b.visual.load_state_dict(a.visual.state_dict())
    return a, b


def test_block_weight_distance_finds_the_block_that_changed(tiny_pair):
    a, b = tiny_pair
    theta0 = a.visual.state_dict()
    theta1 = {k: v.clone() for k, v in theta0.items()}
    name = "transformer.resblocks.1.mlp.c_fc.weight"
    theta1[name] += 0.1
    d = drift.block_weight_distance(theta0, theta1, a.visual)
    assert drift.groups(a.visual) == ["stem", "block 1", "block 2", "post"]
    block = [k for k in theta0 if k.startswith("transformer.resblocks.1.")]
    want = 0.1 * theta0[name].numel() ** 0.5 / sum(float(theta0[k].pow(2).sum()) for k in block) ** 0.5
    assert d["block 2"] == pytest.approx(want, rel=1e-5)
    assert d["stem"] == d["block 1"] == d["post"] == 0.0


def test_layer_drift_is_one_for_the_same_tower_and_drops_after_the_changed_block(tiny_pair):
    a, b = tiny_pair
    images = torch.randint(0, 256, (64, 3, 32, 32), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    same = drift.layer_drift(a, b, {"x": images})
    assert all(v == pytest.approx(1.0, abs=1e-6) for v in same["cka"]["x"].values())
    assert all(v == 0.0 for v in same["weight"].values())
    outs = drift.block_outputs(a, images)
    assert [o.shape for o in outs] == [(64, 64), (64, 64), (64, a.embed_dim)]
    with torch.no_grad():
        for n, p in b.visual.named_parameters():
            if n.startswith("transformer.resblocks.1."):
                p.add_(0.5 * torch.randn_like(p))
    changed = drift.layer_drift(a, b, {"x": images})["cka"]["x"]
    assert changed["block 1"] == pytest.approx(1.0, abs=1e-6)  # before the change: the same features
    assert changed["block 2"] < 0.99
    b.visual.load_state_dict(a.visual.state_dict())


def test_fisher_by_block_shares_sum_to_one(tiny_pair):
    a, _ = tiny_pair
    fisher = {n: torch.ones_like(p) * (2.0 if n.startswith("transformer.resblocks.0.") else 1.0)
              for n, p in a.visual.named_parameters()}
    f = drift.fisher_by_block(fisher, a.visual)
    assert sum(v["share"] for v in f.values()) == pytest.approx(1.0)
    assert f["block 1"]["mean"] == pytest.approx(2.0) and f["block 2"]["mean"] == pytest.approx(1.0)


def test_lines_by_hand():
    a = {"s": torch.zeros(2), "b": torch.zeros(3), "p": torch.zeros(1), "n": torch.tensor(1)}
    b = {"s": torch.ones(2), "b": torch.ones(3), "p": torch.ones(1), "n": torch.tensor(9)}
    depth = {"s": 1, "b": 2, "p": 3, "n": 1}
    out = lines(a, b, depth, 3, alpha=0.2, beta=0.6)  # lambda = 0.2, 0.5, 0.8
    assert out["s"].tolist() == pytest.approx([0.2, 0.2]) and out["b"].tolist() == pytest.approx([0.5] * 3)
    assert out["p"].tolist() == pytest.approx([0.8]) and out["n"].item() == 9
    flat = lines(a, b, depth, 3, alpha=0.3, beta=0.0)
    assert all(torch.equal(flat[k], wise_ft(a, b, 0.3)[k]) for k in a)


def test_model_stock_by_hand():
    theta0 = {"w": torch.zeros(2), "n": torch.tensor(0)}
    same = [{"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(5)}] * 2
    merged, t = model_stock(theta0, same)
    assert t["w"] == pytest.approx(1.0) and merged["w"].tolist() == pytest.approx([1.0, 2.0]) and merged["n"] == 5
    orthogonal = [{"w": torch.tensor([1.0, 0.0]), "n": torch.tensor(0)}, {"w": torch.tensor([0.0, 1.0]),
                                                                         "n": torch.tensor(0)}]
    merged, t = model_stock(theta0, orthogonal)
    assert t["w"] == 0.0 and merged["w"].tolist() == [0.0, 0.0]
    at60 = [{"w": torch.tensor([1.0, 0.0]), "n": torch.tensor(0)},
            {"w": torch.tensor([0.5, 0.75 ** 0.5]), "n": torch.tensor(0)}]  # cos = 0.5 -> t = 2/3
    merged, t = model_stock(theta0, at60)
    assert t["w"] == pytest.approx(2 / 3)
    torch.testing.assert_close(merged["w"], 2 / 3 * torch.tensor([0.75, 0.75 ** 0.5 / 2]))
    with pytest.raises(ValueError, match="at least 2"):
        model_stock(theta0, same[:1])


def test_lines_and_model_stock_candidates_are_labelled_and_validated():
    from infusing_kit.methods import posthoc
    world, vlm = tiny_world_and_model()
    theta0 = posthoc.states_of(vlm)
    runs = []
    for s in (1, 2):
        g = torch.Generator().manual_seed(s)
        runs.append({k: v + 0.05 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
                     for k, v in theta0.items()})
    curve, best = posthoc.choose("lines", vlm, theta0, runs[:1], experiment.validation_fn(world), "generic_map@20")
    assert {(r["alpha"], r["beta"]) for r in curve} == {(a, b) for a in posthoc.GRID for b in posthoc.GRID
                                                       if a + b <= 1 + 1e-9}
    assert best == max(curve, key=lambda r: r["generic_map@20"])
    merges, _ = posthoc.choose("model_stock", vlm, theta0, runs, experiment.validation_fn(world), "generic_map@20")
    assert [r["merge"] for r in merges] == ["stock"] + ["uniform"] * len(posthoc.GRID)
    at0 = merges[1]  # t = 0: the pretrained tower itself
    vlm.visual.load_state_dict(theta0)
    assert {k: v for k, v in at0.items() if k not in ("merge", "t")} == experiment.validation_fn(world)(vlm)


def test_validation_reports_agreement_with_the_reference():
    world, vlm = tiny_world_and_model()
    from infusing_kit.models import embed_images
    ref = embed_images(vlm, world.generic_val, progress=False)
    assert experiment.validation_fn(world, ref)(vlm)["generic_agreement"] == pytest.approx(1.0, abs=1e-5)
    with torch.no_grad():
        for p in vlm.visual.parameters():
            p.add_(0.2 * torch.randn_like(p))
    assert experiment.validation_fn(world, ref)(vlm)["generic_agreement"] < 0.99
    assert "generic_agreement" not in experiment.validation_fn(world)(vlm)
