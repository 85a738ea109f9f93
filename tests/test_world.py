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
