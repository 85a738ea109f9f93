"""The built-in world: determinism, split disjointness, caption/attribute consistency."""
import numpy as np
import pytest
import torch

from infusing_kit import world as W

SMALL = W.WorldConfig(seed=3, generic_train=200, generic_val_combos=20, generic_test_combos=30, text_pairs=40,
                      fine_train_classes=40, fine_val_classes=10, fine_test_classes=40, fine_per_class=3)


@pytest.fixture(scope="module")
def world():
    return W.make_world(SMALL)


def test_same_seed_same_bytes_other_seed_other_bytes(world):
    again = W.make_world(SMALL)
    for name in ("generic_train", "generic_val", "generic_test", "text_test", "fine_train", "fine_val", "fine_test"):
        a, b = getattr(world, name), getattr(again, name)
        assert torch.equal(a.images, b.images), name
        np.testing.assert_array_equal(a.labels, b.labels)
        assert a.captions == b.captions
    other = W.make_world(W.WorldConfig(**{**SMALL.__dict__, "seed": 4}))
    assert not torch.equal(world.fine_train.images, other.fine_train.images)


def test_fine_grained_splits_are_class_disjoint(world):
    tr, va, te = (set(s.labels) for s in (world.fine_train, world.fine_val, world.fine_test))
    assert not (tr & va) and not (tr & te) and not (va & te)
    assert (len(tr), len(va), len(te)) == (40, 10, 40)
    assert all(np.bincount(world.fine_test.labels)[list(te)] == 3)


def test_generic_held_out_combinations_do_not_overlap(world):
    va, te, tx = set(world.generic_val.labels), set(world.generic_test.labels), set(world.text_test.labels)
    assert not (va & te) and not (va & tx) and not (te & tx)
    assert len(tx) == len(world.text_test), "image-text pairs must be distinct combinations"
    assert all(np.bincount(world.generic_test.labels)[list(te)] == SMALL.renders_per_combo)


def test_captions_name_exactly_the_rendered_attributes(world):
    t = world.text_test
    assert len(t.captions) == 2 * len(t) and len(t.caption_image) == len(t.captions)
    for text, img in zip(t.captions, t.caption_image):
        np.testing.assert_array_equal(W.parse_caption(text), W.combo_to_attributes(t.labels[img]))


def test_attribute_is_visible_in_pixels():
    # colour: the brightest-channel of a plain large centred shape on a dark background is its colour's
    for colour, rgb in enumerate(W.COLOURS.values()):
        combo = W.attributes_to_combo(np.array([[0, colour, 1, 4, 0, 0]]))
        img = W.render_generic(combo, seed=0)[0].float()
        centre = img[:, 14:18, 14:18].mean((1, 2))
        assert torch.allclose(centre, torch.tensor(rgb, dtype=torch.float32), atol=30), (colour, centre)


def test_fine_class_is_the_mark_pattern():
    codes = W.fine_codes()
    assert len(set(codes)) == W.N_FINE_CLASSES
    hamming = np.array([[bin(a ^ b).count("1") for b in codes[:60]] for a in codes[:60]])
    assert hamming[~np.eye(60, dtype=bool)].min() >= 3
    # same seed -> same colours and noise, so two classes differ by their marks only: 2x2 px per differing bit
    a = W.render_fine(np.array([5, 5]), seed=1, jitter=0).float()
    b = W.render_fine(np.array([5, 17]), seed=1, jitter=0).float()
    diff = (a - b).abs().sum(1) > 60
    assert diff[0].sum() == 0 and diff[1].sum() == 4 * bin(int(codes[5] ^ codes[17])).count("1")


def test_tokenizer_round_trip_and_vocab_matches_model_config():
    import json
    from infusing_kit.models import CONFIG_DIR
    tok = W.ToyTokenizer()
    ids = tok(["a small red plain square at the top left on a dark background"])
    assert ids.shape == (1, 16) and ids[0, 13] == tok.eot_id and (ids[0, 14:] == 0).all()
    assert int(ids.argmax()) == 13, "open_clip's argmax pooling must find the end-of-text token"
    for f in CONFIG_DIR.glob("*.json"):
        assert json.loads(f.read_text())["text_cfg"]["vocab_size"] == tok.vocab_size, f.name
    with pytest.raises(ValueError, match="not in the toy world's vocabulary"):
        tok(["a fluffy dog"])


def test_impossible_world_config_is_refused():
    with pytest.raises(ValueError, match="fine-grained classes"):
        W.make_world(W.WorldConfig(fine_train_classes=500))


@pytest.fixture(scope="module")
def near():
    return W.make_world(W.WorldConfig())


def test_validation_is_built_like_the_test(near):
    """Design 2: a validation query meets what a test query meets (near-duplicates in the generic domain, sibling
    shades and unseen shapes in the fine-grained one); design 1's validation did not (the review's numbers)."""
    shape, colour, _ = W.shade_table()
    group = shape * len(W.COLOURS) + colour

    def fine(split, cfg):
        c = np.unique(split.labels)
        alone = np.array([(group[c] == group[x]).sum() == 1 for x in c])
        return np.isin(shape[c], cfg.fine_unseen_shapes).mean(), alone.mean()

    def generic(split):
        d = W.one_attribute_neighbours(np.unique(split.labels))
        return d.mean(), (d > 0).mean()

    cfg = near.config
    (u_val, alone_val), (u_test, alone_test) = fine(near.fine_val, cfg), fine(near.fine_test, cfg)
    assert abs(u_val - u_test) < 0.05 and alone_val == 0 and alone_test < 0.01
    (d_val, n_val), (d_test, n_test) = generic(near.generic_val), generic(near.generic_test)
    assert abs(d_val - d_test) < 0.1 * d_test and n_val > 0.97 and n_test > 0.97, (d_val, d_test, n_val, n_test)
    assert len(near.generic_val.labels) >= 1000, "enough validation images that a score is not one query's luck"
    # the image-text test: >= 1,000 images, captions with many one-word neighbours (not at the ceiling)
    t = near.text_test
    assert len(t) >= 1000 and W.one_attribute_neighbours(t.labels).mean() > 8
    old = W.make_world(W.NEAR_V1)
    assert fine(old.fine_val, cfg)[1] > 0.3 and generic(old.generic_val)[1] < 0.5   # what design 1 had


def test_design_1_is_the_first_near_world_bit_for_bit():
    """Runs recorded before `design` existed reopen on the world they were made on (their metrics.json has no
    "design": config_from_dict reads it as 1). The fingerprints are those of the near world at e4ddccf."""
    w = W.make_world(W.config_from_dict({**{k: v for k, v in W.NEAR_V1.__dict__.items() if k != "design"}}))
    assert w.config.design == 1
    assert {n: getattr(w, n).fingerprint() for n in ("generic_val", "text_test", "fine_val", "fine_test")} == {
        "generic_val": "b3ebb92a9ad0b806", "text_test": "b49d68e2018b0b68", "fine_val": "6111f2b2922780b7",
        "fine_test": "df41e39acb97f1e5"}
